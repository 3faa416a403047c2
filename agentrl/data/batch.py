"""Trajectories as a minibatch: ``(B, T)`` arrays named by dimension (``token_ids_B_T``, ``loss_mask_B_T``,
...), padded, packed or prompt-shared, the one batch type every learner reads; and the sampler/learner
logprob mismatch of a batch.

Arrays are numpy; :meth:`Batch.to_torch` turns a batch into tensors on a device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError

__all__ = ["SHARED_SEGMENT", "Batch", "MismatchStats", "collate", "collate_shared", "logprob_mismatch"]


# ---------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """A minibatch of trajectories as ``(B, T)`` arrays; padding is 0 in every array (mask 0 there).

    Attributes:
        token_ids_B_T: token ids (``pad_id`` on padding).
        loss_mask_B_T: 1 on policy-sampled tokens.
        sampler_logprobs_B_T: the sampler's logprob of each sampled token (0 elsewhere).
        attention_mask_B_T: 1 on real tokens.
        position_ids_B_T: the model's positions, restarting at 0 for each packed sequence and for each turn
            of a turn-split trajectory (:attr:`~agentrl.data.trajectory.Trajectory.sequence_starts`).
        segment_ids_B_T: which trajectory of the batch (index into ``trajectories``) each token belongs to;
            -1 on padding. With packing, a row holds several segments: attend within a segment only. In a
            prompt-shared row (:func:`collate_shared`), the shared prompt is :data:`SHARED_SEGMENT`: every
            segment of the row attends to it.
        turn_rewards_B_T: each turn's reward placed at its last sampled token (0 elsewhere).
        rewards_B: each trajectory's total reward, shape ``(N,)`` with N = len(trajectories).
        trajectories: the trajectories, in segment order.
        token_index_B_T: which token of its trajectory each position holds (an index into ``token_ids``; 0 on
            padding): how per-trajectory arrays are laid onto the batch and read back.
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
    token_index_B_T: Any
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
        restart, without a KV cache), as do rows of turn-split trajectories; prompt-shared rows take a 4-D
        boolean mask (each segment sees itself causally and the shared prompt, a turn-split sequence only
        itself) and position ids."""
        import torch

        segments, positions = self.segment_ids_B_T, self.position_ids_B_T
        restarts = bool(((positions[:, 1:] == 0) & (self.attention_mask_B_T[:, 1:] != 0)).any())
        if bool((segments == SHARED_SEGMENT).any()):
            T = segments.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
            same = segments[:, :, None] == segments[:, None, :]
            to_shared = (segments == SHARED_SEGMENT)[:, None, :]
            # A turn-split trajectory's later sequences (positions restart inside a segment) see only themselves.
            new_segment = torch.ones_like(segments, dtype=torch.bool)
            new_segment[:, 1:] = segments[:, 1:] != segments[:, :-1]
            block = ((positions == 0) & ~new_segment).cumsum(-1)
            first = block == torch.where(new_segment, block, -1).cummax(-1).values
            same_block = block[:, :, None] == block[:, None, :]
            allowed = causal & ((same & same_block) | (to_shared & first[:, :, None])) & (segments != -1)[:, None, :]
            allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)  # padding sees itself: no empty row
            return {"attention_mask": allowed[:, None], "position_ids": self.position_ids_B_T}
        if restarts or bool(((segments != segments[:, :1]) & (segments != -1)).any()):  # several sequences
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
    mask, attn, pos, index = (np.zeros(shape, dtype=np.int64) for _ in range(4))
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
            pos[b, at : at + n] = t.positions if t.sequence_starts else np.arange(n)
            index[b, at : at + n] = np.arange(n)
            segments[b, at : at + n] = i
            for turn in t.turns:
                turn_rewards[b, at + turn.last_token] = turn.reward
            at += n
    rewards = np.array([t.total_reward for t in trajectories], dtype=np.float32)
    shared = _common_prefix(ids, mask, attn) if share_prefix and not packing else 0
    if any(t.sequence_starts for t in trajectories):  # rows attended by position ids: no shared-prefix cache
        shared = 0
    return Batch(ids, mask, sampler_lp, attn, pos, segments, turn_rewards, rewards, index, tuple(trajectories), shared)



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
    Segment ``i`` is ``trajectories[i]``, in the order given. A turn-split trajectory shares its first
    prompt like any other; its later sequences restart their positions and see only themselves.

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
    mask, attn, pos, index = (np.zeros(shape, dtype=np.int64) for _ in range(4))
    segments = np.full(shape, -1, dtype=np.int64)
    sampler_lp, turn_rewards = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    for b, (prefix, members, _) in enumerate(layouts):
        shared = len(prefix)
        ids[b, :shared], attn[b, :shared], pos[b, :shared] = prefix, 1, np.arange(shared)
        index[b, :shared] = np.arange(shared)
        segments[b, :shared] = SHARED_SEGMENT
        at = shared
        for i in members:
            t = trajectories[i]
            n = len(t.token_ids) - shared
            ids[b, at : at + n] = t.token_ids[shared:]
            mask[b, at : at + n] = t.loss_mask[shared:]
            sampler_lp[b, at : at + n] = t.logprobs[shared:]
            attn[b, at : at + n] = 1
            pos[b, at : at + n] = t.positions[shared:] if t.sequence_starts else np.arange(shared, shared + n)
            index[b, at : at + n] = np.arange(shared, shared + n)
            segments[b, at : at + n] = i
            for turn in t.turns:
                turn_rewards[b, at + turn.last_token - shared] = turn.reward
            at += n
    rewards = np.array([t.total_reward for t in trajectories], dtype=np.float32)
    return Batch(ids, mask, sampler_lp, attn, pos, segments, turn_rewards, rewards, index, tuple(trajectories))


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
