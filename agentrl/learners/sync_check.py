"""The identity check after a weight sync: does the rollout engine now sample with the weights being trained?

After every sync to a backend that holds its own copy of the weights (``vllm``, engines on Ray), a fixed probe
(a few token sequences, the same every time) is scored by the engine and by the learner: each token's
log-probability given the tokens before it, untempered. Both sides hold the same weights exactly when the
engine's numbers match the learner's up to numerics. The runs the field reports as silently training
nothing (an adapter never merged or synced, an engine that kept its old weights, a checkpoint in another
dtype or of another model) all show up here as a gap far above numerics, and the run stops at once with
:class:`~agentrl.errors.WeightSyncError` instead of training on samples from other weights.

The statistic is the mean absolute logprob difference over the probe's tokens (its maximum is logged too):
a kernel's rounding moves a few tokens a little, a wrong weight moves most of them. The default tolerance
follows the learner's precision: ``2e-4`` in fp32 (the ``vllm`` backend on CPU agrees with the learner to
about ``1e-6``), ``5e-2`` when either side computes in bf16/fp16. A backend that cannot score (an
OpenAI-compatible server) or that shares the learner's model (``hf`` in one process) is not checked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.errors import WeightSyncError

__all__ = ["SyncCheck", "check_sync", "default_tolerance", "gap", "learner_scores", "probe_sequences"]

_PROBE_TEXTS = (
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    '{"name": "run_python", "arguments": {"code": "print(sum(range(10)))"}}',
)


def probe_sequences(tokenizer: Any, length: int = 48, random_rows: int = 1, seed: int = 0) -> list[list[int]]:
    """The fixed probe: a few texts (code, prose, a tool call) and ``random_rows`` rows of random token ids
    (reaching rows of the embedding that text does not), each ``length`` tokens at most."""
    import torch

    rows = [list(tokenizer.encode(text, add_special_tokens=False))[:length] for text in _PROBE_TEXTS]
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    rows += [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(random_rows)]
    return [row for row in rows if len(row) >= 2]


def learner_scores(model: Any, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """Each token's log-probability given the ones before it (from the second token on), under ``model``."""
    import torch

    device = next(model.parameters()).device
    scores = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in sequences:
                ids = torch.tensor([list(row)], device=device)
                logits = model(ids).logits[0, :-1].float()
                picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
                scores.append(picked.tolist())
    finally:
        model.train(was_training)
    return scores


def gap(ours: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """``(mean, max)`` absolute difference of two scorings of the same probe.

    Raises:
        WeightSyncError: the two scorings do not cover the same tokens.
    """
    if [len(r) for r in ours] != [len(r) for r in theirs]:
        raise WeightSyncError(
            f"the engine scored {[len(r) for r in theirs]} probe tokens where the learner scored "
            f"{[len(r) for r in ours]}: they read the probe differently (another tokenizer or context length?)"
        )
    diffs = [abs(a - b) for row_a, row_b in zip(ours, theirs, strict=True) for a, b in zip(row_a, row_b, strict=True)]
    return (sum(diffs) / len(diffs), max(diffs)) if diffs else (0.0, 0.0)


def default_tolerance(precision: str, engine_dtype: str | None) -> float:
    """The mean-gap tolerance for a learner in ``precision`` and an engine in ``engine_dtype`` (None: the
    checkpoint's, taken as fp32)."""
    engine_half = engine_dtype is not None and engine_dtype.removeprefix("torch.") not in ("float32", "float", "fp32")
    return 5e-2 if precision != "fp32" or engine_half else 2e-4


@dataclass(frozen=True)
class SyncCheck:
    """One check's outcome: the worst engine's mean and max gap, and the seconds it took."""

    mean_gap: float
    max_gap: float
    seconds: float

    def as_stats(self) -> dict[str, float]:
        return {"sync_gap": self.mean_gap, "sync_gap_max": self.max_gap, "sync_check_s": self.seconds}


async def check_sync(
    policy: Any, model: Any, probe: Sequence[Sequence[int]], tolerance: float, version: int
) -> SyncCheck | None:
    """Score ``probe`` on every engine of ``policy`` and on ``model``; None where ``policy`` cannot score.

    Raises:
        WeightSyncError: an engine's mean gap exceeds ``tolerance``; the message names the likely causes.
    """
    started = time.perf_counter()
    if hasattr(policy, "score_engines"):
        scorings = [s for s in await policy.score_engines(probe) if s is not None]
    elif hasattr(policy, "score"):
        scorings = [await policy.score(probe)]
    else:
        scorings = []
    if not scorings:
        return None
    ours = learner_scores(model, probe)
    gaps = [gap(ours, theirs) for theirs in scorings]
    seconds = time.perf_counter() - started
    worst = max(range(len(gaps)), key=lambda i: gaps[i][0])
    mean, largest = gaps[worst]
    if mean > tolerance:
        raise WeightSyncError(_message(mean, largest, tolerance, version, worst, len(gaps)))
    return SyncCheck(mean, largest, seconds)


def _message(mean: float, largest: float, tolerance: float, version: int, engine: int, engines: int) -> str:
    where = f"engine {engine} of {engines}" if engines > 1 else "the rollout engine"
    return (
        f"after the weight sync to version {version}, {where} scores a fixed probe {mean:.3g} nats per token "
        f"away from the learner on average (at most {largest:.3g}; tolerance {tolerance:.3g}): it does not "
        "sample with the weights being trained, so training would learn from another policy's samples. "
        "Likely causes: a LoRA adapter not merged into the exported weights, or not synced; a dtype mismatch "
        "(e.g. the engine in bf16 and the learner in fp32: match them, or raise learner.sync_check_tolerance); "
        "a stale engine that kept its old weights; another model or tokenizer on the engine than the learner's "
        "(rollout_options.model / tokenizer vs --model). Set learner.sync_check=false to train anyway."
    )
