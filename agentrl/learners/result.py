"""What every learner returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """A finished training run.

    Attributes:
        model: the trained model, in train mode (PPO's actor; a reward model's :class:`ValueModel`).
        tokenizer: its tokenizer.
        history: one step log per optimizer step or round, in order (the learner's own ``*StepLog`` type).
        checkpoint: the last checkpoint written, or None without ``output_dir``.
        extras: what only some learners have, named by them (PPO: ``critic``, ``kl_coef``; DPO: data sizes).
    """

    model: Any
    tokenizer: Any
    history: tuple[Any, ...]
    checkpoint: Path | None
    extras: Mapping[str, Any] = field(default_factory=dict)
