"""Reward-hacking monitors: cheap statistics a trainer logs every step to catch a policy gaming its reward.

Each monitor is a pure function over plain arrays; :func:`trajectory_monitors` applies them all to a batch of
:class:`~agentrl.data.trajectory.Trajectory` records and returns flat ``{"name": value}`` metrics.

What each one catches:
    - reward–length correlation: a reward that pays for length (or brevity) instead of correctness;
    - repeated n-gram rate: degenerate, looping samples;
    - per-component means: one component (often format) rising while correctness stays flat;
    - error / truncation shares: episodes that end by crashing a tool or running out the clock;
    - over-optimisation (:func:`overoptimisation`): the training reward still rising while a held-out "gold"
      score (another verifier or judge) falls from its best: the policy is exploiting the training reward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentrl.types import StopReason

if TYPE_CHECKING:
    from agentrl.data.trajectory import Trajectory

__all__ = [
    "Divergence",
    "component_means",
    "overoptimisation",
    "pearson",
    "repeated_ngram_rate",
    "stop_reason_shares",
    "trajectory_monitors",
]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences.

    Returns:
        The correlation in [-1, 1]; 0.0 when it is undefined (fewer than two points, or either sequence is
        constant), since then no linear relation can be shown.

    Raises:
        ValueError: The sequences differ in length.
    """
    if len(xs) != len(ys):
        raise ValueError(f"pearson: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x, mean_y = math.fsum(xs) / n, math.fsum(ys) / n
    dx = [x - mean_x for x in xs]
    dy = [y - mean_y for y in ys]
    sxx, syy = math.fsum(d * d for d in dx), math.fsum(d * d for d in dy)
    if sxx == 0.0 or syy == 0.0:
        return 0.0
    r = math.fsum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def _ngram_counts(tokens: Sequence[int], n: int) -> tuple[int, int]:
    """(repeated, total) n-grams of one sequence; an n-gram is repeated when it occurred earlier in it."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    total = max(0, len(tokens) - n + 1)
    for i in range(total):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeated += 1
        else:
            seen.add(gram)
    return repeated, total


def repeated_ngram_rate(sequences: Iterable[Sequence[int]], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sequence, pooled over all sequences.

    Args:
        sequences: Token ids, one sequence per sample (e.g. one assistant turn's sampled tokens).
        n: The n-gram length.

    Returns:
        ``repeated / total`` over all sequences; 0.0 when no sequence is at least ``n`` long.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"repeated_ngram_rate: n must be at least 1, got {n}")
    repeated = total = 0
    for tokens in sequences:
        r, t = _ngram_counts(tokens, n)
        repeated += r
        total += t
    return repeated / total if total else 0.0


def component_means(episodes: Iterable[Iterable[Mapping[str, float]]]) -> dict[str, float]:
    """Mean per episode of each reward component, summed over the episode's turns.

    Args:
        episodes: For each episode, the ``reward_components`` of each of its turns.

    Returns:
        ``{name: mean}``. An episode in which a component never appears counts as 0 for it, so the mean is
        over all episodes and the means add up to the mean episode return. Empty for no episodes.
    """
    totals: list[dict[str, float]] = []
    for turns in episodes:
        episode: dict[str, float] = {}
        for components in turns:
            for name, value in components.items():
                episode[name] = episode.get(name, 0.0) + float(value)
        totals.append(episode)
    names = sorted({name for episode in totals for name in episode})
    if not totals:
        return {}
    return {name: math.fsum(e.get(name, 0.0) for e in totals) / len(totals) for name in names}


def stop_reason_shares(stop_reasons: Iterable[StopReason | str]) -> dict[str, float]:
    """Share of episodes by how they ended.

    Returns:
        ``{"error": ..., "truncated": ...}`` (truncated = every limit: env truncation, turns, tokens, context,
        deadline) plus one ``"stop/<reason>"`` entry per :class:`~agentrl.types.StopReason`; all 0.0 for no
        episodes.

    Raises:
        ValueError: A string that is no StopReason value.
    """
    reasons = [StopReason(r) for r in stop_reasons]
    n = len(reasons)
    shares = {f"stop/{r.value}": (sum(x is r for x in reasons) / n if n else 0.0) for r in StopReason}
    shares["error"] = shares[f"stop/{StopReason.ERROR.value}"]
    shares["truncated"] = sum(r.is_truncation for r in reasons) / n if n else 0.0
    return shares


def trajectory_monitors(trajectories: Sequence[Trajectory], n: int = 4) -> dict[str, float]:
    """Every monitor over a batch of trajectories, as flat metrics for a tracker.

    Length is the number of sampled tokens; n-grams are counted within each assistant turn.

    Returns:
        ``reward_length_corr``, ``repeated_ngram_rate``, ``reward/<component>`` means, ``error``,
        ``truncated`` and ``stop/<reason>`` shares; empty for an empty batch.
    """
    if not trajectories:
        return {}
    metrics = {
        "reward_length_corr": pearson(
            [t.total_reward for t in trajectories], [float(t.num_sampled) for t in trajectories]
        ),
        "repeated_ngram_rate": repeated_ngram_rate(
            (t.token_ids[span.start : span.end] for t in trajectories for span in t.turns), n
        ),
    }
    means = component_means([span.reward_components for span in t.turns] for t in trajectories)
    metrics.update({f"reward/{name}": value for name, value in means.items()})
    metrics.update(stop_reason_shares(t.stop_reason for t in trajectories))
    return metrics


@dataclass(frozen=True)
class Divergence:
    """Where a training reward (the proxy) and a held-out gold score part ways.

    Attributes:
        flags: per point, whether gold is more than ``tolerance`` below its best so far while the proxy is
            above its value at that best.
        diverged_at: the index of the first point of the first run of ``patience`` flagged points, or None.
        best: the index of the gold score's best point so far at the last point.
        gold_drop: the last point's gold below that best (>= 0). proxy_gain: the last point's proxy above
            its value at that best (negative when below).
        correlation: Pearson correlation of proxy and gold over all points (0 when undefined).
    """

    flags: tuple[bool, ...]
    diverged_at: int | None
    best: int
    gold_drop: float
    proxy_gain: float
    correlation: float

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


def overoptimisation(
    proxy: Sequence[float], gold: Sequence[float], tolerance: float = 0.05, patience: int = 2
) -> Divergence:
    """Flag over-optimisation: points where gold has fallen from its best while the proxy kept its gain.

    Early in training both rise together; once the policy exploits the proxy, the proxy keeps rising and
    the gold score falls (Gao et al., 2022). A point is flagged when gold is more than ``tolerance`` below
    its best so far and the proxy is above its value at that best; ``patience`` consecutive flags make a
    divergence, so one noisy gold measurement does not.

    Args:
        proxy: the training reward at each gold measurement (e.g. its mean over the steps since the last).
        gold: the held-out gold score at the same points.
        tolerance: the gold drop that counts (set it above the gold measurement's noise).
        patience: consecutive flagged points that make a divergence.

    Raises:
        ValueError: unequal lengths, no points, a negative tolerance or ``patience`` < 1.
    """
    if len(proxy) != len(gold) or not gold:
        raise ValueError(
            f"overoptimisation: {len(proxy)} proxy and {len(gold)} gold values; give equal, non-zero counts"
        )
    if tolerance < 0 or patience < 1:
        raise ValueError(
            f"overoptimisation: tolerance must be >= 0 and patience >= 1, got {tolerance}, {patience}"
        )
    flags: list[bool] = []
    best = 0
    run = 0
    diverged_at: int | None = None
    for i, (p, g) in enumerate(zip(proxy, gold, strict=True)):
        if g > gold[best]:
            best = i
        flag = gold[best] - g > tolerance and p > proxy[best]
        flags.append(flag)
        run = run + 1 if flag else 0
        if run == patience and diverged_at is None:
            diverged_at = i - patience + 1
    return Divergence(
        tuple(flags), diverged_at, best, gold[best] - gold[-1], proxy[-1] - proxy[best], pearson(proxy, gold)
    )
