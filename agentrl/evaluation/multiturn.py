"""Multi-turn figures of finished episodes: did the first attempt pass, did a failed one recover, how many
turns, attempts and tool calls it took. Pure functions over trajectories; any env can feed them.

An env reports each turn in its ``step`` info as ``info["turn_metrics"]``, numbers by name, which the runner
keeps per turn (:attr:`~agentrl.data.trajectory.Trajectory.turn_metrics`). The names read here:

- ``attempt``: 1 when the turn made a graded attempt (e.g. submitted code), else 0 or absent;
- ``attempt_passed``: 1 when that attempt passed (e.g. all hidden tests), else 0;
- ``tool_calls``: how many tool calls the turn made, well-formed or not;
- ``tool_errors``: how many of them errored (malformed, bad arguments, or the tool failed).

Other names are carried along untouched. Whether an episode *passed* is the run's pass rule on the whole
episode (e.g. :class:`~agentrl.evaluation.metrics.PassRule`), not its last attempt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.data.trajectory import Trajectory

__all__ = [
    "ATTEMPT",
    "ATTEMPT_PASSED",
    "TOOL_CALLS",
    "TOOL_ERRORS",
    "EpisodeTurns",
    "episode_turns",
    "first_attempt",
    "multi_turn_metrics",
    "multi_turn_section",
    "summarize_turns",
]

ATTEMPT, ATTEMPT_PASSED, TOOL_CALLS, TOOL_ERRORS = "attempt", "attempt_passed", "tool_calls", "tool_errors"
WITH_INTERVALS = ("final_pass", "first_attempt_pass", "recovery")
"""The figures :func:`multi_turn_section` gives a bootstrap interval (shares of episodes)."""


def first_attempt(trajectory: Trajectory) -> bool | None:
    """Whether the episode's first graded attempt passed; None when it made no attempt."""
    for metrics in trajectory.turn_metrics:
        if metrics.get(ATTEMPT, 0.0) > 0:
            return metrics.get(ATTEMPT_PASSED, 0.0) > 0
    return None


@dataclass(frozen=True)
class EpisodeTurns:
    """One episode's multi-turn record.

    Attributes:
        turns: assistant turns played.
        attempts: turns that made a graded attempt.
        first_attempt: whether the first attempt passed; None: no attempt.
        passed: the run's pass rule on the whole episode.
        tool_calls, tool_errors: summed over the turns (0 where none were reported).
        reports_attempts: some turn reported ``attempt`` or ``attempt_passed``.
        reports_tools: some turn reported ``tool_calls``.
    """

    turns: int
    attempts: int
    first_attempt: bool | None
    passed: bool
    tool_calls: float
    tool_errors: float
    reports_attempts: bool
    reports_tools: bool

    @property
    def first_attempt_failed(self) -> bool:
        """It made an attempt and the first one failed (what :attr:`recovered` starts from)."""
        return self.first_attempt is False

    @property
    def recovered(self) -> bool:
        """The first attempt failed and the episode ended passing."""
        return self.first_attempt is False and self.passed


def episode_turns(trajectory: Trajectory, passed: Callable[[Trajectory], bool]) -> EpisodeTurns:
    """Flatten one trajectory's per-turn metrics; ``passed`` is the run's pass rule."""
    per_turn = trajectory.turn_metrics
    return EpisodeTurns(
        turns=len(trajectory.turns),
        attempts=sum(m.get(ATTEMPT, 0.0) > 0 for m in per_turn),
        first_attempt=first_attempt(trajectory),
        passed=bool(passed(trajectory)),
        tool_calls=math.fsum(m.get(TOOL_CALLS, 0.0) for m in per_turn),
        tool_errors=math.fsum(m.get(TOOL_ERRORS, 0.0) for m in per_turn),
        reports_attempts=any(ATTEMPT in m or ATTEMPT_PASSED in m for m in per_turn),
        reports_tools=any(TOOL_CALLS in m for m in per_turn),
    )


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def summarize_turns(episodes: Sequence[EpisodeTurns]) -> dict[str, float]:
    """The figures of :func:`multi_turn_metrics` from flattened episodes (pooled over episodes)."""
    if not episodes:
        return {}
    out = {"turns_per_episode": sum(e.turns for e in episodes) / len(episodes)}
    if any(e.reports_attempts for e in episodes):
        out["final_pass"] = _share([e.passed for e in episodes])
        out["first_attempt_pass"] = _share([e.first_attempt is True for e in episodes])
        out["recovery"] = _share([e.passed for e in episodes if e.first_attempt_failed])
        out["attempts_per_episode"] = sum(e.attempts for e in episodes) / len(episodes)
    if any(e.reports_tools for e in episodes):
        turns, calls = sum(e.turns for e in episodes), math.fsum(e.tool_calls for e in episodes)
        out["tool_calls_per_turn"] = calls / turns if turns else 0.0
        out["tool_error_rate"] = math.fsum(e.tool_errors for e in episodes) / calls if calls else 0.0
    return out


def multi_turn_metrics(
    trajectories: Sequence[Trajectory], passed: Callable[[Trajectory], bool]
) -> dict[str, float]:
    """The multi-turn figures of a set of episodes, each a share or a mean pooled over them.

    Args:
        trajectories: finished episodes (failed ones included: they are data).
        passed: the run's pass rule on a whole episode.

    Returns:
        A flat dict; only the figures the episodes can support:

        - ``turns_per_episode``: always (for any episodes);
        - ``final_pass``: share of episodes that pass; ``first_attempt_pass``: share whose first attempt
          passed (no attempt counts as not passing); ``recovery``: among episodes whose first attempt failed,
          the share that end passing, **NaN when no first attempt failed**; ``attempts_per_episode``: only
          when some turn reported ``attempt`` (or ``attempt_passed``), so no first-attempt figure is invented
          for an env that does not grade attempts;
        - ``tool_calls_per_turn`` and ``tool_error_rate`` (errors / calls, **0.0 with no calls**): only when
          some turn reported ``tool_calls``.

        No episodes: ``{}``.
    """
    return summarize_turns([episode_turns(t, passed) for t in trajectories])


def multi_turn_section(
    trajectories: Sequence[Trajectory],
    passed: Callable[[Trajectory], bool],
    clusters: Sequence[Any],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any] | None:
    """``results.json``'s ``metrics.multi_turn``: the figures of :func:`multi_turn_metrics`, the three shares
    with a bootstrap interval; None when no episode reports attempts.

    The intervals come from :func:`~agentrl.evaluation.metrics.bootstrap_ci` over episodes clustered by
    ``clusters`` (one label per trajectory: its task, as pass@k's intervals resample tasks), so the samples
    of one task are drawn together and the point value is the pooled share.

    Returns:
        ``{"episodes": N, "final_pass" | "first_attempt_pass" | "recovery": {"value", "ci": [low, high],
        "episodes"}, "turns_per_episode": x, "attempts_per_episode": x, ...}`` where ``episodes`` of an
        entry counts the episodes it is a share of (for ``recovery``: those whose first attempt failed).
    """
    from agentrl.evaluation.metrics import bootstrap_ci

    episodes = [episode_turns(t, passed) for t in trajectories]
    if not any(e.reports_attempts for e in episodes):
        return None
    figures = summarize_turns(episodes)
    samples: Mapping[str, list[tuple[bool, Any]]] = {
        "final_pass": [(e.passed, c) for e, c in zip(episodes, clusters, strict=True)],
        "first_attempt_pass": [(e.first_attempt is True, c) for e, c in zip(episodes, clusters, strict=True)],
        "recovery": [(e.passed, c) for e, c in zip(episodes, clusters, strict=True) if e.first_attempt_failed],
    }
    section: dict[str, Any] = {"episodes": len(episodes)}
    for name, chosen in samples.items():
        low, high = bootstrap_ci(
            [float(flag) for flag, _ in chosen], resamples=resamples, confidence=confidence, seed=seed,
            clusters_T=[label for _, label in chosen],
        )  # fmt: skip
        section[name] = {"value": figures[name], "ci": [low, high], "episodes": len(chosen)}
    section.update({k: v for k, v in figures.items() if k not in WITH_INTERVALS})
    return section
