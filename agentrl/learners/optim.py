"""Pieces every learner's update shares: seeding and RNG state, AdamW with warm-up + cosine, autocast,
gradient clipping, and the seeded batch order of the offline learners."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from agentrl.errors import ConfigError

__all__ = [
    "Joint",
    "autocast",
    "check_precision",
    "clip_and_step",
    "cpu_bf16_error",
    "iterate_batches",
    "make_optimizer",
    "make_scheduler",
    "restore_rng_state",
    "rng_state",
    "seed_everything",
    "warmup_cosine",
]


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
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float,
    max_seconds: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine`; call ``step()`` once after each optimizer step.

    With ``max_seconds`` (a phase that stops at a time budget) the schedule follows whichever is further
    along, the steps taken or the share of ``max_seconds`` spent (as a share of ``total_steps``), so a phase
    that runs out of time on a slow machine still ends at the low rate instead of mid-schedule.
    """
    started = time.perf_counter()

    def multiplier(step: int) -> float:
        if max_seconds is not None and step > 0:
            spent = (time.perf_counter() - started) / max_seconds
            step = max(step, min(total_steps, int(spent * total_steps)))
        return warmup_cosine(step, warmup_steps, total_steps, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's precision context: ``"fp32"`` (nothing) or ``"bf16"`` autocast.

    Weights, gradients and optimizer state stay fp32 either way; only matmuls run in bf16.

    Raises:
        ConfigError: as :func:`check_precision`.
    """
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def check_precision(precision: str, device: torch.device | str) -> None:
    """Fail before any work where ``device`` cannot train in ``precision``; learners call it before loading.

    Raises:
        ConfigError: an unknown precision; bf16 on a GPU without bf16, or on a CPU whose kernels cannot run a
            bf16 attention forward and backward (torch's CPU bf16 attention needs AVX-512; see
            :func:`cpu_bf16_error`).
    """
    if precision == "fp32":
        return
    if precision != "bf16":
        raise ConfigError(f"precision {precision!r} is not one of 'fp32', 'bf16'")
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; set precision='fp32'")
    if device_type == "cpu" and (reason := cpu_bf16_error()) is not None:
        raise ConfigError(
            f"bf16 does not run on this CPU (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
            f"a bf16 attention step fails with {reason!r}); set precision='fp32'"
        )


@functools.cache
def cpu_bf16_error() -> str | None:
    """Why a small bf16-autocast attention forward and backward fails on this CPU, or None where it runs.

    Shapes matter: torch's fused CPU attention takes another path for very short sequences, so the probe uses
    64 positions, as a real batch would.
    """
    query_B_H_T_D = torch.randn(1, 2, 64, 16, requires_grad=True)
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.scaled_dot_product_attention(
                query_B_H_T_D, query_B_H_T_D, query_B_H_T_D, is_causal=True
            )
        out.float().sum().backward()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


class Joint:
    """Several optimizers (or schedulers) saved and restored as one ``state_dict`` (e.g. actor and critic)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The first part's (the policy's): what a step log reports as the learning rate."""
        return list(self.parts[0].param_groups)

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


def iterate_batches(
    num_rows: int, batch_size: int, seed: int, start_step: int = 0, lengths: Sequence[int] | None = None
) -> Iterator[list[int]]:
    """Row indices of each batch from ``start_step`` on: a fresh seeded shuffle per epoch, last batch short.

    With ``lengths`` (one per row), rows of similar length share a batch, so less of it is padding: the
    epoch's shuffle is cut into windows of :data:`LENGTH_WINDOW` batches, each window is sorted by length and
    cut into batches, and the epoch's batches are shuffled. Every row still comes once per epoch.

    The order depends only on ``(seed, step)``, so a resumed run sees the batches the straight run would.
    """
    if lengths is not None and len(lengths) != num_rows:
        raise ValueError(f"iterate_batches: {len(lengths)} lengths for {num_rows} rows")
    per_epoch = math.ceil(num_rows / batch_size)
    step, shuffled = start_step, -1
    while True:
        epoch, k = divmod(step, per_epoch)
        if epoch != shuffled:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(num_rows, generator=generator).tolist()
            batches = ([order[i : i + batch_size] for i in range(0, num_rows, batch_size)] if lengths is None
                       else _length_grouped(order, lengths, batch_size, generator))  # fmt: skip
            shuffled = epoch
        yield batches[k]
        step += 1


LENGTH_WINDOW = 32
"""Batches per window of :func:`iterate_batches` with ``lengths``: wider groups lengths closer, narrower
keeps the batches of an epoch more mixed."""


def _length_grouped(
    order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    window = LENGTH_WINDOW * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
