"""Atomic checkpoints, and where a run's checkpoints are.

A checkpoint is a directory that ``agentrl.models.loading.load_model(path)`` (or ``from_pretrained``) loads
as it is and that ``push_to_hub`` / ``hf upload`` takes as it is: the model, generation config
and tokenizer as ``save_pretrained`` writes them (safetensors), a model card ``README.md``
(:mod:`agentrl.models.card`: recipe, env, metrics, agentrl version), plus ``training_state.pt`` (optimizer,
scheduler, step, RNG states) for resuming and ``training_state.json`` (the step and metadata, for people).
It is written into a hidden temporary directory beside its destination and renamed into place, so a
crash mid-write leaves the previous checkpoint at that path intact and never a half-written one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import ConfigError
from agentrl.learners.config import TrainConfig
from agentrl.learners.optim import Joint, restore_rng_state, rng_state
from agentrl.learners.policy_model import ADAPTER_DIR, saveable
from agentrl.models.card import write_model_card

__all__ = [
    "TrainingState",
    "checkpoint_dirs",
    "checkpoint_problem",
    "load_training_state",
    "save_checkpoint",
    "save_step",
    "step_dir",
]

STATE_FILE = "training_state.pt"
STATE_JSON = "training_state.json"
CHECKPOINT_PREFIX = "step-"


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
        generation = getattr(model, "generation_config", None)
        if generation is not None and not (tmp / "generation_config.json").is_file():
            generation.save_pretrained(tmp)  # a Hub-ready folder carries its sampling defaults
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
        write_model_card(tmp, name=final.name)
        _fsync_tree(tmp)
        tmp.chmod(0o755)
        _replace_dir(tmp, final)
    except Exception as exc:
        if not isinstance(exc, OSError) and _out_of_space(exc, tmp):
            # the serializers (safetensors, torch.save) wrap the disk's ENOSPC in errors of their own
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from exc
        raise
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


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it looks whole.

    Reads only what tells a file cut short (a killed write, a full disk): ``training_state.json``, the zip
    directory at the end of ``training_state.pt``, each safetensors header and its size; no tensor is loaded.
    """
    root = Path(path)
    try:
        int(json.loads((root / STATE_JSON).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_JSON} is unreadable ({type(exc).__name__}: {exc})"
    try:
        with zipfile.ZipFile(root / STATE_FILE):
            pass
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{STATE_FILE} is damaged ({exc})"
    for file in sorted(root.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.relative_to(root)} {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"is truncated ({size} bytes, cut inside its header)"
        try:
            header = json.loads(f.read(length))
            end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "has a damaged header"
    if 8 + length + end > size:
        return f"is truncated ({size} of {8 + length + end} bytes)"
    return None


def step_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``<output_dir>/step-000123``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def _out_of_space(exc: Exception, where: Path) -> bool:
    """Whether ``exc`` (a serializer's own error type) came from a full disk or quota."""
    text = str(exc)
    if any(mark in text for mark in ("os error 28", "os error 122", "No space left", "quota exceeded")):
        return True
    try:  # torch.save says only "file write failed"
        return "write failed" in text and shutil.disk_usage(where).free < 16 << 20
    except OSError:
        return False


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


def save_step(
    config: TrainConfig, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any, step: int,
    meta: Any, extras: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write ``<output_dir>/step-NNNNNN`` atomically (LoRA: merged weights + ``adapter/``), then drop
    checkpoints beyond ``keep_last`` and the temporaries of writes that were killed midway (a run owns its
    output directory, so no other writer's temporary is there)."""
    assert config.output_dir is not None
    full, adapter = saveable(model)
    extras = {**(extras or {}), **({ADAPTER_DIR: adapter} if adapter is not None else {})}
    path = save_checkpoint(
        step_dir(config.output_dir, step), full, tokenizer,
        optimizer=optimizer, scheduler=scheduler, step=step, meta=meta, extras=extras,
    )  # fmt: skip
    stale = [p for p in Path(config.output_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp-*") if p.is_dir()]
    if config.keep_last is not None:
        stale += checkpoint_dirs(config.output_dir)[: -config.keep_last]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return path
