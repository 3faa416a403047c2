"""Trajectory groups, the buffer learners read, and the small pure functions around them.

The runner returns one :class:`TrajectoryGroup` per task (G samples of the same task, the unit GRPO-style
advantages are computed over). A :class:`TrajectoryBuffer` holds groups, filters them (dynamic sampling:
drop groups whose rewards all agree; overlong filtering or DAPO's soft overlong penalty), collates
minibatches as arrays named by dimension (``token_ids_B_T``, ``loss_mask_B_T``, ...), persists to JSONL
(the same file the offline learners and the eval harness read), mines preference pairs for the DPO
family, and records the sampler/learner logprob mismatch per batch.

Arrays are numpy; :meth:`Batch.to_torch` turns a batch into tensors on a device.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agentrl.data.trajectory import Trajectory, TurnSpan, read_jsonl, write_jsonl
from agentrl.errors import ConfigError
from agentrl.types import Message, StopReason

__all__ = [
    "SHARED_SEGMENT",
    "Batch",
    "MismatchStats",
    "PreferencePair",
    "TrajectoryBuffer",
    "TrajectoryGroup",
    "collate",
    "collate_shared",
    "drop_zero_variance",
    "is_overlong",
    "logprob_mismatch",
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


# ---------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """A minibatch of trajectories as ``(B, T)`` arrays; padding is 0 in every array (mask 0 there).

    Attributes:
        token_ids_B_T: token ids (``pad_id`` on padding).
        loss_mask_B_T: 1 on policy-sampled tokens.
        sampler_logprobs_B_T: the sampler's logprob of each sampled token (0 elsewhere).
        attention_mask_B_T: 1 on real tokens.
        position_ids_B_T: positions, restarting at 0 for each packed sequence.
        segment_ids_B_T: which trajectory of the batch (index into ``trajectories``) each token belongs to;
            -1 on padding. With packing, a row holds several segments: attend within a segment only. In a
            prompt-shared row (:func:`collate_shared`), the shared prompt is :data:`SHARED_SEGMENT`: every
            segment of the row attends to it.
        turn_rewards_B_T: each turn's reward placed at its last sampled token (0 elsewhere).
        rewards_B: each trajectory's total reward, shape ``(N,)`` with N = len(trajectories).
        trajectories: the trajectories, in segment order.
        shared_prefix: how many leading tokens every row holds alike, none of them predicting a policy token
            (padded rows only; see :func:`collate`'s ``share_prefix``). The rows still hold them in full; a
            forward may run them once for all rows and let every row attend to their keys and values.
    """

    token_ids_B_T: Any
    loss_mask_B_T: Any
    sampler_logprobs_B_T: Any
    attention_mask_B_T: Any
    position_ids_B_T: Any
    segment_ids_B_T: Any
    turn_rewards_B_T: Any
    rewards_B: Any
    trajectories: tuple[Trajectory, ...] = field(repr=False, default=())
    shared_prefix: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.token_ids_B_T.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask_B_T.sum())

    def to_torch(self, device: Any = "cpu") -> Batch:
        """The same batch with every array a ``torch.Tensor`` on ``device`` (ids and masks int64)."""
        import torch

        arrays = {
            f.name: torch.as_tensor(getattr(self, f.name), device=device)
            for f in dataclasses.fields(self)
            if f.name not in ("trajectories", "shared_prefix")
        }
        return Batch(**arrays, trajectories=self.trajectories, shared_prefix=self.shared_prefix)

    def model_inputs(self) -> dict[str, Any]:
        """How the rows are attended, as model keyword arguments (torch batches only): padded rows take their
        attention mask; packed rows take position ids (transformers builds the block-diagonal mask where they
        restart, without a KV cache); prompt-shared rows take a 4-D boolean mask (each segment sees itself
        causally and the shared prompt) and position ids."""
        import torch

        segments = self.segment_ids_B_T
        if bool((segments == SHARED_SEGMENT).any()):
            T = segments.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
            same = segments[:, :, None] == segments[:, None, :]
            to_shared = (segments == SHARED_SEGMENT)[:, None, :]
            allowed = causal & (same | to_shared) & (segments != -1)[:, None, :]
            allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)  # padding sees itself: no empty row
            return {"attention_mask": allowed[:, None], "position_ids": self.position_ids_B_T}
        if bool(((segments != segments[:, :1]) & (segments != -1)).any()):  # a row holds several segments
            return {"position_ids": self.position_ids_B_T}
        return {"attention_mask": self.attention_mask_B_T}


def _pack(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of sequences per row, each row at most ``row_tokens`` long."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(row_tokens - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def collate(
    trajectories: Sequence[Trajectory],
    *,
    pad_id: int = 0,
    packing: bool = False,
    row_tokens: int | None = None,
    share_prefix: bool = False,
) -> Batch:
    """Lay trajectories out as a :class:`Batch`.

    Args:
        trajectories: what to collate (at least one).
        pad_id: the token id written on padding.
        packing: False: one trajectory per row, right-padded to the longest. True: padding-free packing,
            several trajectories per row (first-fit decreasing) up to ``row_tokens`` tokens each.
        row_tokens: the packed row length; defaults to the longest trajectory.
        share_prefix: padded rows only: record in :attr:`Batch.shared_prefix` the tokens all rows open with
            (system prompt, tool schemas) up to the position before the first that predicts a policy token.

    Raises:
        ConfigError: no trajectories, or one longer than ``row_tokens``.
    """
    if not trajectories:
        raise ConfigError("collate needs at least one trajectory")
    lengths = [len(t.token_ids) for t in trajectories]
    if packing:
        row_tokens = row_tokens or max(lengths)
        if max(lengths) > row_tokens:
            raise ConfigError(
                f"a trajectory of {max(lengths)} tokens does not fit packed rows of {row_tokens}"
            )
        rows = _pack(lengths, row_tokens)
    else:
        rows = [[i] for i in range(len(trajectories))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    mask, attn, pos = (np.zeros(shape, dtype=np.int64) for _ in range(3))
    segments = np.full(shape, -1, dtype=np.int64)
    sampler_lp, turn_rewards = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            t, n = trajectories[i], lengths[i]
            ids[b, at : at + n] = t.token_ids
            mask[b, at : at + n] = t.loss_mask
            sampler_lp[b, at : at + n] = t.logprobs
            attn[b, at : at + n] = 1
            pos[b, at : at + n] = np.arange(n)
            segments[b, at : at + n] = i
            for turn in t.turns:
                turn_rewards[b, at + turn.last_token] = turn.reward
            at += n
    rewards = np.array([t.total_reward for t in trajectories], dtype=np.float32)
    shared = _common_prefix(ids, mask, attn) if share_prefix and not packing else 0
    return Batch(ids, mask, sampler_lp, attn, pos, segments, turn_rewards, rewards, tuple(trajectories), shared)


def _common_prefix(ids: np.ndarray, mask: np.ndarray, attn: np.ndarray) -> int:
    """How many leading tokens all rows hold alike, stopping before the position that predicts the earliest
    policy token of any row (0 for a single row: nothing to share)."""
    if ids.shape[0] < 2:
        return 0
    same_T = (ids == ids[:1]).all(axis=0) & (attn != 0).all(axis=0)
    common = int(np.cumprod(same_T).sum())
    targets = np.flatnonzero(mask.any(axis=0))
    return max(0, min(common, int(targets[0]) - 1)) if len(targets) else common


SHARED_SEGMENT = -2
"""``segment_ids`` value of a prompt that the other segments of its row share (see :func:`collate_shared`)."""


def collate_shared(trajectories: Sequence[Trajectory], *, pad_id: int = 0) -> Batch:
    """Lay trajectories out with each distinct prompt computed once: one row per prompt.

    A row holds the prompt's tokens but its last (segment :data:`SHARED_SEGMENT`), then each trajectory
    that starts with that prompt from its last prompt token on (that token's logits predict the first
    sampled token), positions continuing from the prompt. Attend causally within a segment and to the
    shared prompt (:meth:`Batch.model_inputs` builds that mask). A GRPO group of G
    samples of a P-token prompt then costs P + G * (1 + completion) tokens instead of G * (P + completion).
    Segment ``i`` is ``trajectories[i]``, in the order given.

    Raises:
        ConfigError: no trajectories.
    """
    if not trajectories:
        raise ConfigError("collate_shared needs at least one trajectory")
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(trajectories):
        buckets.setdefault(tuple(t.token_ids[: t.prompt_length]), []).append(i)
    layouts = []
    for prompt, members in buckets.items():
        shared = len(prompt) - 1 if len(members) > 1 and len(prompt) > 1 else 0
        layouts.append((prompt[:shared], members, sum(len(trajectories[i].token_ids) - shared for i in members)))
    width = max(len(prefix) + rest for prefix, _, rest in layouts)
    shape = (len(layouts), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    mask, attn, pos = (np.zeros(shape, dtype=np.int64) for _ in range(3))
    segments = np.full(shape, -1, dtype=np.int64)
    sampler_lp, turn_rewards = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    for b, (prefix, members, _) in enumerate(layouts):
        shared = len(prefix)
        ids[b, :shared], attn[b, :shared], pos[b, :shared] = prefix, 1, np.arange(shared)
        segments[b, :shared] = SHARED_SEGMENT
        at = shared
        for i in members:
            t = trajectories[i]
            n = len(t.token_ids) - shared
            ids[b, at : at + n] = t.token_ids[shared:]
            mask[b, at : at + n] = t.loss_mask[shared:]
            sampler_lp[b, at : at + n] = t.logprobs[shared:]
            attn[b, at : at + n] = 1
            pos[b, at : at + n] = np.arange(shared, shared + n)
            segments[b, at : at + n] = i
            for turn in t.turns:
                turn_rewards[b, at + turn.last_token - shared] = turn.reward
            at += n
    rewards = np.array([t.total_reward for t in trajectories], dtype=np.float32)
    return Batch(ids, mask, sampler_lp, attn, pos, segments, turn_rewards, rewards, tuple(trajectories))


# ---------------------------------------------------------------------------------------------- mismatch
@dataclass(frozen=True)
class MismatchStats:
    """How far the learner's logprobs are from the sampler's on the sampled tokens of one batch.

    Attributes:
        mean_abs: mean ``|learner - sampler|`` over sampled tokens.
        max_abs: the largest such difference.
        k3_kl: the k3 estimate of KL(sampler || learner): mean of ``r - 1 - log r``, ``r = p_learner / p_sampler``
            (non-negative, unbiased for samples drawn from the sampler).
        tokens: how many tokens were compared.
    """

    mean_abs: float
    max_abs: float
    k3_kl: float
    tokens: int


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; numpy cannot take bf16, so widen first
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def logprob_mismatch(sampler_logprobs: Any, learner_logprobs: Any, mask: Any) -> MismatchStats:
    """Compare sampler and learner logprobs over the tokens where ``mask`` is nonzero.

    Accepts numpy arrays or torch tensors of one shape (e.g. ``(B, T)``).

    Raises:
        ValueError: the shapes differ.
    """
    sampler, learner, keep = _as_numpy(sampler_logprobs), _as_numpy(learner_logprobs), _as_numpy(mask) != 0
    if not sampler.shape == learner.shape == keep.shape:
        raise ValueError(
            f"shapes differ: sampler {sampler.shape}, learner {learner.shape}, mask {keep.shape}"
        )
    if not keep.any():
        return MismatchStats(0.0, 0.0, 0.0, 0)
    log_ratio = learner[keep] - sampler[keep]
    k3 = np.expm1(log_ratio) - log_ratio
    return MismatchStats(
        float(np.abs(log_ratio).mean()), float(np.abs(log_ratio).max()), float(k3.mean()), int(keep.sum())
    )


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
