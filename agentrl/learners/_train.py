"""Pieces every learner shares: seeding, AdamW with warmup + cosine, autocast, and atomic checkpoints.

A checkpoint is a directory that ``agentrl.models.loading.load_model(path)`` loads as it is: the model and
tokenizer as ``save_pretrained`` writes them (safetensors), plus ``training_state.pt`` (optimizer,
scheduler, step, RNG states) for resuming and ``training_state.json`` (the step and metadata, for people).
It is written into a hidden temporary directory beside its destination and renamed into place, so a
crash mid-write leaves the previous checkpoint at that path intact and never a half-written one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import ConfigError

__all__ = [
    "Joint",
    "TrainingState",
    "autocast",
    "checkpoint_dirs",
    "clip_and_step",
    "iterate_batches",
    "load_training_state",
    "make_optimizer",
    "make_scheduler",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "step_dir",
    "warmup_cosine",
]

STATE_FILE = "training_state.pt"
STATE_JSON = "training_state.json"
CHECKPOINT_PREFIX = "step-"


# ---- seeding and RNG state ------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global generators (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        numpy_state: Any = np.random.get_state()
        kind, keys, pos, has_gauss, gauss = numpy_state
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`rng_state`: set every generator it recorded back to where it was."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ---- optimizer, schedule, precision -------------------------------------------------------------
def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; biases, norms (1-D parameters) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass (CPU and CUDA); the per-tensor loop is the fallback.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning-rate multiplier at ``step``: linear from 1/warmup to 1, then cosine down to ``min_ratio``.

    Args:
        step: optimizer steps taken so far (0 for the first update).
        warmup_steps: steps of linear warm-up; 0 starts at the full rate.
        total_steps: the step at which the cosine reaches ``min_ratio`` (it stays there after).
        min_ratio: the final multiplier, in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine`; call ``step()`` once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's precision context: ``"fp32"`` (nothing) or ``"bf16"`` autocast.

    Weights, gradients and optimizer state stay fp32 either way; only matmuls run in bf16.

    Raises:
        ConfigError: bf16 on a CUDA device without bf16 support, or an unknown precision.
    """
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"precision {precision!r} is not one of 'fp32', 'bf16'")
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; set precision='fp32'")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class Joint:
    """Several optimizers (or schedulers) saved and restored as one ``state_dict`` (e.g. actor and critic)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["parts"]) != len(self.parts):
            raise ConfigError(
                f"the checkpoint holds {len(state['parts'])} optimizer states, this run has {len(self.parts)}"
            )
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def clip_and_step(model: torch.nn.Module, optimizer: Any, scheduler: Any, grad_clip: float | None) -> float:
    """Clip the trainable parameters' gradients to ``grad_clip`` (None: no clipping), take the optimizer and
    scheduler steps, and return the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(
        torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf)
    )
    optimizer.step()
    scheduler.step()
    return grad_norm


# ---- checkpoints --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingState:
    """What a resumed run needs besides the weights: the step reached and free-form metadata."""

    step: int
    meta: Mapping[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Any,
    tokenizer: Any = None,
    *,
    optimizer: torch.optim.Optimizer | Joint | None = None,
    scheduler: Any = None,
    step: int = 0,
    meta: Mapping[str, Any] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write a loadable, resumable checkpoint to ``path`` atomically (replacing one already there).

    Args:
        path: the checkpoint directory; its parent is created if missing.
        model: a ``PreTrainedModel`` (``save_pretrained`` writes safetensors).
        tokenizer: saved beside the model when given, so the directory loads on its own.
        optimizer / scheduler: their ``state_dict`` goes into ``training_state.pt`` for resuming.
        step: optimizer steps taken.
        meta: JSON-serialisable metadata (e.g. the config) kept in both state files.
        extras: more objects with ``save_pretrained`` (a LoRA adapter, a critic), each written into the
            subdirectory of its name.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        Whatever writing raised; the temporary directory is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, extra in (extras or {}).items():
            extra.save_pretrained(tmp / name, safe_serialization=True)
        state = {
            "step": step,
            "meta": dict(meta or {}),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
        }
        torch.save(state, tmp / STATE_FILE)
        summary = {"step": step, "meta": dict(meta or {})}
        (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        tmp.chmod(0o755)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after success it holds the previous checkpoint, or nothing
    return final


def load_training_state(
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | Joint | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
) -> TrainingState:
    """Load a checkpoint's optimizer/scheduler state into the given objects and restore the RNGs.

    The weights are not touched: load them with ``load_model(path)`` before building the optimizer.

    Raises:
        ConfigError: ``path`` holds no ``training_state.pt`` (not a checkpoint written by
            :func:`save_checkpoint`).
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ConfigError(
            f"{path} has no {STATE_FILE}, so it cannot be resumed from; pass a directory written by a learner "
            "checkpoint (e.g. <output_dir>/step-000100), or start from it as a model without resuming"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return TrainingState(step=int(state["step"]), meta=state["meta"])


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete ``step-NNNNNN`` checkpoints under ``output_dir``, oldest first (temporaries are skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def step_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``<output_dir>/step-000123``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so the rename never exposes empty files after a power loss."""
    for file in root.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; an existing ``final`` ends up at ``new`` (for the caller to delete).

    Swapping with Linux's ``renameat2(RENAME_EXCHANGE)`` leaves no instant without a complete ``final``;
    elsewhere two renames leave a window of microseconds.
    """
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        return
    aside = new.with_name(new.name + "-old")
    os.rename(final, aside)
    os.rename(new, final)
    os.rename(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def iterate_batches(num_rows: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Row indices of each batch from ``start_step`` on: a fresh seeded shuffle per epoch, last batch short.

    The order depends only on ``(seed, step)``, so a resumed run sees the batches the straight run would.
    """
    per_epoch = math.ceil(num_rows / batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield order[k * batch_size : (k + 1) * batch_size].tolist()
        step += 1


def jsonl_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line of a JSONL data file.

    Raises:
        ConfigError: a line is not JSON; the message names file and line.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON ({exc}); write one JSON object per line") from None
