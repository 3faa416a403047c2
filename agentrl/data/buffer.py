"""Trajectory groups, the buffer learners read, and the small pure functions around them.

The runner returns one :class:`TrajectoryGroup` per task (G samples of the same task, the unit GRPO-style
advantages are computed over). A :class:`TrajectoryBuffer` holds groups, filters them (dynamic sampling:
drop groups whose rewards all agree; overlong filtering or DAPO's soft overlong penalty), collates
minibatches (:mod:`agentrl.data.batch`), persists to JSONL (the same file the offline learners and the eval
harness read), and mines preference pairs for the DPO family.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentrl.data.batch import Batch, MismatchStats, collate, logprob_mismatch
from agentrl.data.trajectory import Trajectory, TurnSpan, read_jsonl, write_jsonl
from agentrl.errors import ConfigError
from agentrl.types import Message, StopReason

__all__ = [
    "PreferencePair",
    "TrajectoryBuffer",
    "TrajectoryGroup",
    "drop_zero_variance",
    "is_overlong",
    "mine_pair",
    "soft_overlong_penalty",
    "with_final_reward",
]

GROUP_KEY = "group_id"
"""``Trajectory.meta`` key naming the group a trajectory belongs to (set by the runner)."""


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class TrajectoryGroup:
    """The G trajectories sampled for one task.

    Attributes:
        group_id: a stable name for the task within the run (the runner uses ``"<task id>"``).
        trajectories: the samples, in sample order.
    """

    group_id: str
    trajectories: tuple[Trajectory, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trajectories", tuple(self.trajectories))

    def __len__(self) -> int:
        return len(self.trajectories)

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.trajectories)

    @property
    def rewards_G(self) -> np.ndarray:
        """Each sample's total reward, shape ``(G,)``."""
        return np.array([t.total_reward for t in self.trajectories], dtype=np.float64)

    @property
    def reward_std(self) -> float:
        return float(self.rewards_G.std()) if self.trajectories else 0.0

    def replace(self, trajectories: Iterable[Trajectory]) -> TrajectoryGroup:
        """The same group with other trajectories (e.g. after a filter)."""
        return TrajectoryGroup(self.group_id, tuple(trajectories))


def drop_zero_variance(groups: Iterable[TrajectoryGroup], eps: float = 1e-6) -> list[TrajectoryGroup]:
    """Dynamic sampling (DAPO): keep groups whose rewards differ, the only ones a group baseline learns from.

    A group with one sample, or whose rewards all lie within ``eps`` of each other, is dropped.
    """
    return [g for g in groups if len(g) > 1 and float(np.ptp(g.rewards_G)) > eps]


# ---------------------------------------------------------------------------------------------- overlong
def is_overlong(trajectory: Trajectory) -> bool:
    """True when the episode's last turn was cut by a length limit rather than ended by the policy.

    That is a ``MAX_TOKENS`` or ``CONTEXT_OVERFLOW`` stop, or a last turn whose sample hit its per-turn
    ``max_tokens`` (the runner records per-turn ``finish_reasons`` in ``meta``).
    """
    if trajectory.stop_reason in (StopReason.MAX_TOKENS, StopReason.CONTEXT_OVERFLOW):
        return True
    reasons: Sequence[str] = trajectory.meta.get("finish_reasons") or []
    return bool(reasons) and reasons[-1] == "length"


def soft_overlong_penalty(length: int, max_length: int, cache: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment for a response of ``length`` sampled tokens.

    0 up to ``max_length - cache``; then falls linearly to ``-factor`` at ``max_length``; ``-factor`` beyond.

    Raises:
        ConfigError: ``cache`` is not in ``[0, max_length]``.
    """
    if not 0 <= cache <= max_length:
        raise ConfigError(f"overlong cache must be in [0, max_length={max_length}], got {cache}")
    free = max_length - cache
    if length <= free:
        return 0.0
    if length > max_length or cache == 0:
        return -factor
    return -factor * (length - free) / cache


def with_final_reward(trajectory: Trajectory, name: str, value: float) -> Trajectory:
    """A copy whose last turn's reward has ``value`` added as the component ``name`` (e.g. a penalty, a
    judge's score); the trajectory itself when it has no turn or ``value`` is 0."""
    if not trajectory.turns or value == 0.0:
        return trajectory
    last = trajectory.turns[-1]
    components = {**last.reward_components, name: last.reward_components.get(name, 0.0) + value}
    turns = (*trajectory.turns[:-1], TurnSpan(last.start, last.end, last.reward + value, components))
    return dataclasses.replace(trajectory, turns=turns)


# ---------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PreferencePair:
    """Best vs worst trajectory of a group, split at the first assistant turn where they differ.

    Both share every token before ``prefix_length`` (the opening prompt and the turns they agree on, with
    the env's answers); from there on each has its own turns. DPO-family losses sum logprobs over
    :meth:`completion_mask` only.

    Attributes:
        chosen: the higher-reward trajectory. rejected: the lower-reward one.
        split_turn: index of the first assistant turn that differs.
        prefix_length: tokens before that turn (identical in both).
    """

    chosen: Trajectory
    rejected: Trajectory
    split_turn: int
    prefix_length: int

    @property
    def margin(self) -> float:
        return self.chosen.total_reward - self.rejected.total_reward

    def completion_mask(self, which: str) -> list[int]:
        """``loss_mask`` of ``"chosen"`` or ``"rejected"`` with the shared prefix zeroed."""
        trajectory = self.chosen if which == "chosen" else self.rejected
        return [0] * self.prefix_length + list(trajectory.loss_mask[self.prefix_length :])

    def to_messages(self) -> dict[str, list[Message]]:
        """OpenAI-messages form: ``{"prompt", "chosen", "rejected"}`` split at ``split_turn``."""
        cut = _assistant_message_index(self.chosen.messages, self.split_turn)
        cut_r = _assistant_message_index(self.rejected.messages, self.split_turn)
        return {
            "prompt": list(self.chosen.messages[:cut]),
            "chosen": list(self.chosen.messages[cut:]),
            "rejected": list(self.rejected.messages[cut_r:]),
        }


def _assistant_message_index(messages: Sequence[Message], turn: int) -> int:
    seen = -1
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            seen += 1
            if seen == turn:
                return i
    return len(messages)


def _first_divergent_turn(a: Trajectory, b: Trajectory) -> int | None:
    """Index of the first turn whose position or sampled ids differ; None if one is a prefix of the other."""
    for k, (ta, tb) in enumerate(zip(a.turns, b.turns, strict=False)):
        if ta.start != tb.start or a.token_ids[: ta.end] != b.token_ids[: tb.end]:
            return k
    return None


def mine_pair(
    group: TrajectoryGroup, min_margin: float = 0.0, scores: Sequence[float] | None = None
) -> PreferencePair | None:
    """The best and worst trainable trajectories of ``group`` as a pair, or None.

    Args:
        group: the samples of one task.
        min_margin: the least score difference that makes a pair.
        scores: one score per trajectory of ``group`` (e.g. from a reward model or a judge) to rank by
            instead of each trajectory's total reward.

    Episodes that ended in an error (a crashed tool or env, a failed backend call) are left out: their low
    score is not the policy's doing. None when fewer than two such trajectories, the score margin is not
    above ``min_margin``, or the two agree on every turn they share (no turn to prefer).

    Raises:
        ConfigError: ``scores`` does not have one value per trajectory.
    """
    if scores is None:
        scores = [t.total_reward for t in group]
    if len(scores) != len(group):
        raise ConfigError(f"mine_pair: {len(scores)} scores for a group of {len(group)} trajectories")
    ranked = sorted(
        (s, i)
        for i, (t, s) in enumerate(zip(group, scores, strict=True))
        if t.trainable and t.turns and t.stop_reason is not StopReason.ERROR  # a crash is not the policy's doing
    )
    if len(ranked) < 2:
        return None
    (low, worst_i), (high, best_i) = ranked[0], ranked[-1]
    if high - low <= min_margin:
        return None
    best, worst = group.trajectories[best_i], group.trajectories[worst_i]
    k = _first_divergent_turn(best, worst)
    if k is None:
        return None
    # The prefix ends where the divergent turn starts in both (a position mismatch means an earlier token
    # differs, which the comparison of earlier turns rules out unless the env answered differently).
    start = min(best.turns[k].start, worst.turns[k].start)
    prefix = next((i for i in range(start) if best.token_ids[i] != worst.token_ids[i]), start)
    return PreferencePair(best, worst, k, prefix)


# ---------------------------------------------------------------------------------------------- buffer
class TrajectoryBuffer:
    """Trajectory groups for learners: filter, batch, persist, mine pairs, record logprob mismatch.

    Attributes:
        groups: the groups held, in insertion order.
        mismatch_history: one :class:`MismatchStats` per call of :meth:`record_mismatch`.
    """

    def __init__(self, groups: Iterable[TrajectoryGroup] = ()):
        self.groups: list[TrajectoryGroup] = list(groups)
        self.mismatch_history: list[MismatchStats] = []

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def add(self, groups: TrajectoryGroup | Iterable[TrajectoryGroup]) -> None:
        self.groups.extend([groups] if isinstance(groups, TrajectoryGroup) else groups)

    def trajectories(self, *, trainable_only: bool = True) -> list[Trajectory]:
        """Every trajectory, group by group (only trainable ones with at least one turn by default)."""
        return [t for g in self.groups for t in g if not trainable_only or (t.trainable and t.turns)]

    def clear(self) -> None:
        self.groups.clear()

    # ---- filters (each returns how many trajectories it removed) ---------------------------------------
    def filter_zero_variance(self, eps: float = 1e-6) -> int:
        """Drop groups whose rewards all agree (dynamic sampling)."""
        before = len(self)
        self.groups = drop_zero_variance(self.groups, eps)
        return before - len(self)

    def filter_overlong(self) -> int:
        """Drop trajectories whose last turn was cut by a length limit (:func:`is_overlong`)."""
        return self.keep(lambda t: not is_overlong(t))

    def apply_overlong_penalty(self, max_length: int, cache: int, factor: float = 1.0) -> None:
        """Add DAPO's soft overlong penalty (on sampled-token count) to each trajectory's last turn."""
        self.groups = [
            g.replace(
                with_final_reward(
                    t, "overlong", soft_overlong_penalty(t.num_sampled, max_length, cache, factor)
                )
                for t in g
            )
            for g in self.groups
        ]

    def keep(self, predicate: Callable[[Trajectory], bool]) -> int:
        """Keep the trajectories ``predicate`` accepts (groups left empty go); returns how many were dropped."""
        before = len(self)
        kept = (g.replace(t for t in g if predicate(t)) for g in self.groups)
        self.groups = [g for g in kept if len(g)]
        return before - len(self)

    # ---- batches -----------------------------------------------------------------------------------------
    def minibatches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        packing: bool = False,
        row_tokens: int | None = None,
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` es of ``batch_size`` trainable trajectories (the last may be smaller).

        Raises:
            ConfigError: ``batch_size`` < 1.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        pool = self.trajectories()
        if shuffle:
            random.Random(seed).shuffle(pool)
        for i in range(0, len(pool), batch_size):
            yield collate(pool[i : i + batch_size], pad_id=pad_id, packing=packing, row_tokens=row_tokens)

    # ---- preference pairs ----------------------------------------------------------------------------------
    def preference_pairs(self, min_margin: float = 0.0) -> list[PreferencePair]:
        """One best-vs-worst pair per group where :func:`mine_pair` finds one."""
        return [p for p in (mine_pair(g, min_margin) for g in self.groups) if p is not None]

    # ---- mismatch ------------------------------------------------------------------------------------------
    def record_mismatch(self, sampler_logprobs: Any, learner_logprobs: Any, mask: Any) -> MismatchStats:
        """Compute :func:`logprob_mismatch` for one batch, keep it in :attr:`mismatch_history`, return it."""
        stats = logprob_mismatch(sampler_logprobs, learner_logprobs, mask)
        self.mismatch_history.append(stats)
        return stats

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, append: bool = False) -> int:
        """Write every trajectory as one JSONL line, its group in ``meta["group_id"]``; returns the count."""
        return write_jsonl(
            path,
            (_tag_group(t, g.group_id) for g in self.groups for t in g),
            append=append,
        )

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryBuffer:
        """Read a JSONL file written by :meth:`save` (or the runner); groups rebuilt from ``meta["group_id"]``.

        Trajectories without a group id each form a group of their own.
        """
        grouped: dict[str, list[Trajectory]] = {}
        for n, trajectory in enumerate(read_jsonl(path)):
            key = str(trajectory.meta.get(GROUP_KEY, f"ungrouped-{n}"))
            grouped.setdefault(key, []).append(trajectory)
        return cls(TrajectoryGroup(k, tuple(v)) for k, v in grouped.items())


def _tag_group(trajectory: Trajectory, group_id: str) -> Trajectory:
    if trajectory.meta.get(GROUP_KEY) == group_id:
        return trajectory
    meta: Mapping[str, Any] = {**trajectory.meta, GROUP_KEY: group_id}
    return dataclasses.replace(trajectory, meta=meta)
