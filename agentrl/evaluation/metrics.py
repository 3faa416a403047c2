"""The eval harness's numbers, as pure functions over finished episodes.

- :func:`pass_at_k`: the unbiased estimator of the Codex paper, ``1 - C(n-c, k) / C(n, k)`` for ``c``
  passing samples out of ``n``, computed as a product (no huge binomials). Never "best of the first k".
- :func:`bootstrap_ci` / :func:`paired_bootstrap`: seeded percentile intervals over tasks (tasks are the
  unit that was sampled; the samples of one task are not independent draws of the benchmark).
- :class:`PassRule`: what counts as a passed episode, stated once and printed with every result.
- :func:`episode_stats` / :func:`summarize`: one flat record per episode, then every metric of a run.

Per-task sample lists are kept (:class:`TaskResult`), in sample order, for the test-time selection metrics
beside pass@k (best-of-N with a scorer, majority vote) in :mod:`agentrl.evaluation.selection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.rewards.monitors import component_means, stop_reason_shares
from agentrl.tools import parse_tool_calls

__all__ = [
    "EpisodeStats",
    "PassRule",
    "TaskResult",
    "bootstrap_ci",
    "distribution",
    "episode_stats",
    "group_tasks",
    "paired_bootstrap",
    "pass_at_k",
    "pass_at_k_tasks",
    "summarize",
    "task_cluster",
    "tool_call_counts",
    "unpaired_bootstrap",
]

TOLERANCE = 1e-9
"""Slack of a pass threshold, so a reward summed from float parts (0.1 + 0.2 + 0.7) still reaches 1.0."""


# ---------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one task: ``1 - C(n-c, k) / C(n, k)``.

    The probability that a random size-``k`` subset of the ``n`` samples holds at least one of the ``c``
    passing ones, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which stays exact in floating point
    where the binomials would overflow.

    Args:
        n: samples drawn for the task.
        c: how many of them passed, ``0 <= c <= n``.
        k: the budget, ``1 <= k <= n``.

    Raises:
        ValueError: ``k`` outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c={c} passing samples must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be between 1 and the n={n} samples drawn; draw more samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_tasks(n_T: Sequence[int], c_T: Sequence[int], k: int) -> np.ndarray:
    """:func:`pass_at_k` of each task, shape ``(T,)``; every task needs ``n >= k``."""
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(n_T, c_T, strict=True)], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- bootstrap
def _check_bootstrap(resamples: int, confidence: float) -> None:
    if not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"bootstrap resamples must be a positive integer (e.g. 1000), got {resamples!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1) (e.g. 0.95), got {confidence!r}")


def bootstrap_ci(
    values_T: Sequence[float] | np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters_T: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-task values, resampling tasks with replacement.

    Args:
        values_T: one value per task (e.g. each task's pass@k estimate or mean reward).
        resamples: bootstrap resamples.
        confidence: the interval's nominal coverage.
        seed: the resampling seed (the same seed gives the same interval).
        clusters_T: a label per task; tasks with one label are one cluster (the same underlying problem
            drawn twice), resampled together, so repeats do not narrow the interval. None: every task its own.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no tasks, the value itself twice for one cluster.
    """
    _check_bootstrap(resamples, confidence)
    values = np.asarray(values_T, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    if clusters_T is None:
        means_R = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    else:
        means_R = _cluster_means(values, clusters_T, rng, resamples)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means_R, [tail, 1 - tail])
    return float(low), float(high)


def _cluster_means(values: np.ndarray, clusters_T: Sequence[Any], rng: np.random.Generator, resamples: int
                   ) -> np.ndarray:  # fmt: skip
    """Means of ``resamples`` cluster bootstrap draws: C clusters drawn with replacement, each bringing all
    its tasks (the estimate is the mean over the tasks drawn)."""
    labels = {label: i for i, label in enumerate(dict.fromkeys(clusters_T))}
    index_T = np.array([labels[label] for label in clusters_T])
    sums_C = np.bincount(index_T, weights=values, minlength=len(labels))
    counts_C = np.bincount(index_T, minlength=len(labels)).astype(np.float64)
    drawn_R_C = rng.integers(0, len(labels), size=(resamples, len(labels)))
    return np.asarray(sums_C[drawn_R_C].sum(axis=1) / counts_C[drawn_R_C].sum(axis=1))


def paired_bootstrap(
    a_T: Sequence[float] | np.ndarray,
    b_T: Sequence[float] | np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """The mean of ``b - a`` over tasks both runs played, with a bootstrap interval that resamples tasks.

    Resampling the task *pairs* keeps the difference's interval narrow where both runs find the same tasks
    hard; an interval that excludes 0 is a difference these tasks support.

    Returns:
        ``{"diff", "low", "high", "p_b_not_better"}``; the last is the share of resamples whose mean
        difference is <= 0 (a one-sided bootstrap p-value for "b is better").

    Raises:
        ValueError: ``a_T`` and ``b_T`` differ in length.
    """
    _check_bootstrap(resamples, confidence)
    a, b = np.asarray(a_T, dtype=np.float64), np.asarray(b_T, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"paired bootstrap needs one value per common task on each side: {a.size} vs {b.size}"
        )
    if a.size == 0:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "p_b_not_better": math.nan}
    diff_T = b - a
    rng = np.random.default_rng(seed)
    means_R = diff_T[rng.integers(0, diff_T.size, size=(resamples, diff_T.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means_R, [tail, 1 - tail])
    return {
        "diff": float(diff_T.mean()),
        "low": float(low),
        "high": float(high),
        "p_b_not_better": float((means_R <= 0).mean()),
    }


def unpaired_bootstrap(
    a_T: Sequence[float] | np.ndarray,
    b_T: Sequence[float] | np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``mean(b) - mean(a)`` for two runs on different task sets: each side's tasks resampled on their own.

    Returns:
        The same keys as :func:`paired_bootstrap` (NaN where either side has no tasks).
    """
    _check_bootstrap(resamples, confidence)
    a, b = np.asarray(a_T, dtype=np.float64), np.asarray(b_T, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "p_b_not_better": math.nan}
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    means_b = b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1)
    diff_R = means_b - means_a
    tail = (1 - confidence) / 2
    low, high = np.quantile(diff_R, [tail, 1 - tail])
    return {
        "diff": float(b.mean() - a.mean()),
        "low": float(low),
        "high": float(high),
        "p_b_not_better": float((diff_R <= 0).mean()),
    }


def distribution(values: Sequence[float]) -> dict[str, float]:
    """``mean, std, min, p50, p90, max`` of a list of numbers (NaN for an empty list)."""
    if not values:
        return {key: math.nan for key in ("mean", "std", "min", "p50", "p90", "max")}
    array = np.asarray(values, dtype=np.float64)
    p50, p90 = np.quantile(array, [0.5, 0.9])
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "p50": float(p50),
        "p90": float(p90),
        "max": float(array.max()),
    }


# ---------------------------------------------------------------------------------------------- episodes
@dataclass(frozen=True)
class PassRule:
    """What counts as a passed episode: ``value >= threshold``.

    Attributes:
        on: ``"reward"`` (the episode's total reward, summed over turns) or the name of a reward component
            (that component summed over the episode's turns, e.g. code-sandbox's ``correct`` or
            toy-guess's ``solved``).
        threshold: the least value that passes (a tolerance of 1e-9 absorbs float sums).
    """

    on: str = "reward"
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if not self.on:
            raise ConfigError("--pass-on must be 'reward' or the name of a reward component, got ''")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"--pass-threshold must be a finite number, got {self.threshold!r}")

    def value(self, trajectory: Trajectory) -> float:
        """The number the rule compares with the threshold."""
        if self.on == "reward":
            return trajectory.total_reward
        return math.fsum(float(t.reward_components.get(self.on, 0.0)) for t in trajectory.turns)

    def __call__(self, trajectory: Trajectory) -> bool:
        return self.value(trajectory) >= self.threshold - TOLERANCE

    def describe(self) -> str:
        subject = "total reward" if self.on == "reward" else f"reward component {self.on!r} summed over turns"
        return f"{subject} >= {self.threshold:g}"


@dataclass(frozen=True)
class EpisodeStats:
    """One finished episode, flattened for metrics (all that the report and ``results.json`` need)."""

    task_id: str
    task_index: int
    sample_index: int
    reward: float
    components: Mapping[str, float]
    passed: bool
    turns: int
    sampled_tokens: int
    total_tokens: int
    stop_reason: str
    error: str | None
    latency_s: float
    tool_calls: int
    tool_errors: int
    env_task_id: str | None = None  # the env's own id of the task (None where it reports none)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample_index,
            "reward": self.reward,
            "passed": self.passed,
            "turns": self.turns,
            "sampled_tokens": self.sampled_tokens,
            "total_tokens": self.total_tokens,
            "stop_reason": self.stop_reason,
            "latency_s": self.latency_s,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "components": dict(self.components),
            "error": self.error,
        }


def tool_call_counts(messages: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """``(calls, failed)`` tool calls in a transcript.

    Calls: every ``<tool_call>`` block of the assistant turns, well-formed or not. Failed: the malformed
    blocks, plus the tool replies that answer a well-formed call (they carry its ``tool_call_id``) with
    ``Error: ...``, the project's form for an unknown tool, invalid arguments or a tool that raised
    (:func:`agentrl.tools.tool_error_message`). A program that runs and fails (e.g. ``run_python`` with a
    traceback) is a working tool call, not a failed one.
    """
    calls = failed = 0
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") == "assistant":
            parsed = parse_tool_calls(content)
            calls += len(parsed.calls) + len(parsed.errors)
            failed += len(parsed.errors)
        elif message.get("role") == "tool" and message.get("tool_call_id") and content.startswith("Error:"):
            failed += 1
    return calls, min(failed, calls)


def episode_stats(trajectory: Trajectory, rule: PassRule) -> EpisodeStats:
    """Flatten one trajectory written by the harness (its ``meta`` names the task and sample)."""
    meta = trajectory.meta
    components: dict[str, float] = {}
    for turn in trajectory.turns:
        for name, value in turn.reward_components.items():
            components[name] = components.get(name, 0.0) + float(value)
    calls, failed = tool_call_counts(trajectory.messages)
    return EpisodeStats(
        task_id=str(meta.get("group_id", f"task-{meta.get('task_index', 0)}")),
        task_index=int(meta.get("task_index", 0)),
        sample_index=int(meta.get("sample_index", 0)),
        reward=trajectory.total_reward,
        components=components,
        passed=rule(trajectory),
        turns=len(trajectory.turns),
        sampled_tokens=trajectory.num_sampled,
        total_tokens=len(trajectory.token_ids),
        stop_reason=trajectory.stop_reason.value,
        error=trajectory.error,
        latency_s=float(meta.get("elapsed_s", math.nan)),
        tool_calls=calls,
        tool_errors=failed,
        env_task_id=None if meta.get("env_task_id") is None else str(meta["env_task_id"]),
    )


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskResult:
    """The samples of one task, in sample order (kept whole for selection metrics such as maj@k)."""

    task_id: str
    task_index: int
    samples: tuple[EpisodeStats, ...] = field(default_factory=tuple)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def passed(self) -> int:
        return sum(s.passed for s in self.samples)

    @property
    def mean_reward(self) -> float:
        return math.fsum(s.reward for s in self.samples) / self.n if self.samples else math.nan

    def to_dict(self, ks: Sequence[int]) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "task_index": self.task_index,
            "n": self.n,
            "passed": self.passed,
            "mean_reward": self.mean_reward,
            "pass_at_k": {str(k): pass_at_k(self.n, self.passed, k) for k in ks if k <= self.n},
            "samples": [s.to_dict() for s in self.samples],
        }


def group_tasks(episodes: Sequence[EpisodeStats]) -> list[TaskResult]:
    """Episodes grouped by task, tasks by index, samples by index."""
    by_task: dict[tuple[int, str], list[EpisodeStats]] = {}
    for episode in episodes:
        by_task.setdefault((episode.task_index, episode.task_id), []).append(episode)
    return [
        TaskResult(task_id, index, tuple(sorted(samples, key=lambda s: s.sample_index)))
        for (index, task_id), samples in sorted(by_task.items())
    ]


def task_cluster(task: TaskResult) -> str:
    """What makes two evaluation tasks the same problem: the env's task id where it reports one (tasks drawn
    by seed can repeat), else the evaluation's own task id."""
    env_ids = {s.env_task_id for s in task.samples if s.env_task_id is not None}
    return f"env:{min(env_ids)}" if env_ids else f"eval:{task.task_id}"


def _with_ci(values_T: np.ndarray, ci: Callable[[np.ndarray], tuple[float, float]]) -> dict[str, Any]:
    low, high = ci(values_T)
    mean = float(values_T.mean()) if values_T.size else math.nan
    return {"value": mean, "ci": [low, high], "tasks": int(values_T.size)}


def summarize(
    episodes: Sequence[EpisodeStats],
    ks: Sequence[int],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of a run.

    pass@k uses the tasks with at least ``k`` samples (all of them in a finished run); its interval and
    the mean reward's come from :func:`bootstrap_ci` over tasks, clustered by :func:`task_cluster` where
    the env drew one problem more than once (``distinct_tasks`` < ``tasks``). Episode-level numbers (turns, tokens,
    latency, stop reasons, tool-call errors) pool all episodes.

    Returns:
        A JSON-ready dict: ``pass_at_k`` (by k: value, ci, tasks), ``reward`` (mean of the task means, ci,
        tasks, and the episodes' distribution), ``reward_components`` (mean per episode), ``pass_rate``,
        ``turns``, ``sampled_tokens``, ``total_tokens``, ``latency_s`` (distributions), ``tool_calls`` (calls, failed, error_rate),
        ``stop_reasons`` (counts), ``stop_shares``, ``errors`` (count and the most frequent messages),
        ``episodes`` and ``tasks``.
    """
    tasks = group_tasks(episodes)
    label = {t.task_index: task_cluster(t) for t in tasks}
    repeats = len(set(label.values())) < len(tasks)

    def ci_of(chosen: Sequence[TaskResult]) -> Callable[[np.ndarray], tuple[float, float]]:
        clusters = [label[t.task_index] for t in chosen] if repeats else None
        return lambda values_T: bootstrap_ci(values_T, resamples=resamples, confidence=confidence, seed=seed,
                                             clusters_T=clusters)  # fmt: skip

    pass_k: dict[str, Any] = {}
    for k in ks:
        eligible = [t for t in tasks if t.n >= k]
        values_T = pass_at_k_tasks([t.n for t in eligible], [t.passed for t in eligible], k)
        pass_k[str(k)] = _with_ci(values_T, ci_of(eligible))
    reward_T = np.array([t.mean_reward for t in tasks], dtype=np.float64)
    ci = ci_of(tasks)
    rewards = [e.reward for e in episodes]
    calls, failed = sum(e.tool_calls for e in episodes), sum(e.tool_errors for e in episodes)
    stops: dict[str, int] = {}
    for e in episodes:
        stops[e.stop_reason] = stops.get(e.stop_reason, 0) + 1
    errors: dict[str, int] = {}
    for e in episodes:
        if e.error:
            errors[e.error] = errors.get(e.error, 0) + 1
    return {
        "episodes": len(episodes),
        "tasks": len(tasks),
        "distinct_tasks": len(set(label.values())),
        "pass_at_k": pass_k,
        "pass_rate": sum(e.passed for e in episodes) / len(episodes) if episodes else math.nan,
        "reward": {**_with_ci(reward_T, ci), "distribution": distribution(rewards)},
        "reward_components": component_means([e.components] for e in episodes),
        "turns": distribution([float(e.turns) for e in episodes]),
        "sampled_tokens": distribution([float(e.sampled_tokens) for e in episodes]),
        "total_tokens": distribution([float(e.total_tokens) for e in episodes]),
        "latency_s": distribution([e.latency_s for e in episodes]),
        "tool_calls": {"calls": calls, "failed": failed, "error_rate": failed / calls if calls else 0.0},
        "stop_reasons": dict(sorted(stops.items(), key=lambda kv: -kv[1])),
        "stop_shares": stop_reason_shares(e.stop_reason for e in episodes),
        "errors": {
            "count": sum(errors.values()),
            "top": [{"error": m, "count": c} for m, c in sorted(errors.items(), key=lambda kv: -kv[1])[:5]],
        },
    }
