"""How the online learners lay trajectories out for the update: shuffled minibatches and micro-batches,
collation on the learner's device, and per-trajectory values (advantages, old logprobs, critic values)
placed onto batches and read back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from agentrl.data.batch import Batch, collate, collate_shared
from agentrl.data.trajectory import Trajectory
from agentrl.learners.data_parallel import is_filler
from agentrl.learners.logprobs import policy_logprobs, reference_logprobs
from agentrl.learners.optim import autocast
from agentrl.learners.rl import RLConfig

__all__ = ["logprob_arrays", "micro_scale", "microbatches", "per_trajectory", "place", "to_batch"]


def microbatches(trajectories: Sequence[Trajectory], config: RLConfig, seed: int) -> list[list[list[int]]]:
    """Indices into ``trajectories``: a seeded shuffle split into ``minibatches`` (one optimizer step each),
    each split into micro-batches of ``micro_batch_size`` (one forward each). With ``share_prompt``, the
    samples of one prompt are shuffled as a block, so they land in the same forward where they can."""
    blocks: dict[Any, list[int]] = {}
    for i, t in enumerate(trajectories):
        blocks.setdefault(tuple(t.token_ids[: t.prompt_length]) if config.share_prompt else i, []).append(i)
    members = list(blocks.values())
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    flat = np.array([i for k in order for i in members[k]])
    minis = [chunk.tolist() for chunk in np.array_split(flat, config.minibatches) if len(chunk)]
    size = config.micro_batch_size or max(len(m) for m in minis)
    return [[mini[i : i + size] for i in range(0, len(mini), size)] for mini in minis]


def to_batch(trajectories: Sequence[Trajectory], pad_id: int, config: RLConfig) -> Batch:
    """Collate on the learner's device: a row per distinct prompt (``share_prompt``), else packed rows
    as long as the longest trajectory (``packing``), else one padded row per trajectory."""
    if config.share_prompt:
        return collate_shared(trajectories, pad_id=pad_id).to_torch(config.device)
    return collate(trajectories, pad_id=pad_id, packing=config.packing).to_torch(config.device)


@torch.no_grad()
def per_trajectory(
    fn: Callable[[Batch], torch.Tensor], trajectories: Sequence[Trajectory], pad_id: int, config: RLConfig
) -> list[np.ndarray]:
    """Run ``fn`` (a batch -> ``(B, T)`` values, e.g. logprobs or critic values) over ``trajectories`` in
    micro-batches without gradients; one float64 array per trajectory, aligned with its ``token_ids``
    (the inverse of :func:`place`; 0 where a row holds nothing of it, such as a shared prompt)."""
    out: list[np.ndarray] = []
    size = config.micro_batch_size or len(trajectories)
    for i in range(0, len(trajectories), size):
        chunk = trajectories[i : i + size]
        batch = to_batch(chunk, pad_id, config)
        with autocast(config.precision, config.device):
            values_B_T = fn(batch).double().cpu()
        segments, positions = batch.segment_ids_B_T.cpu(), batch.token_index_B_T.cpu()
        for segment, trajectory in enumerate(chunk):
            where = segments == segment
            values = np.zeros(len(trajectory.token_ids))
            values[positions[where].numpy()] = values_B_T[where].numpy()
            out.append(values)
    return out


def logprob_arrays(model: Any, trajectories: Sequence[Trajectory], pad_id: int, config: RLConfig,
                   reference: Any = None, use_reference: bool = False) -> list[np.ndarray]:  # fmt: skip
    """Per-trajectory logprobs of ``model`` (or, with ``use_reference``, of the reference), no gradients, under
    the sampler's truncation (top-k / top-p) like the update's."""

    def logprobs(batch: Batch) -> torch.Tensor:
        if use_reference:
            return reference_logprobs(reference, model, batch, config.temperature, top_k=config.top_k,
                                      top_p=config.top_p)  # fmt: skip
        return policy_logprobs(model, batch, config.temperature, top_k=config.top_k, top_p=config.top_p)[0]

    return per_trajectory(logprobs, trajectories, pad_id, config)


def micro_scale(
    config: RLConfig, micro: Sequence[Trajectory], minibatch_rows: float, num_tokens: float
) -> tuple[float, float]:
    """``(weight, norm)`` that make the sum of a minibatch's micro-batch losses equal its whole loss: token-mean
    divides by the minibatch's tokens (``norm``), the sequence means weigh each micro-batch by its share of
    the minibatch's sequences (Dr. GRPO's ``norm`` is the episode token budget).

    ``minibatch_rows`` and ``num_tokens`` are the whole minibatch's, over every data-parallel rank; fillers
    (:func:`~agentrl.learners.data_parallel.is_filler`) count in no total: the token-mean sequence mean skips
    them, the token-sum one counts them as 0 among the micro-batch's rows."""
    if config.aggregation == "token-mean":
        return 1.0, float(num_tokens)
    rows = sum(not is_filler(t) for t in micro) if config.aggregation == "seq-mean-token-mean" else len(micro)
    return rows / minibatch_rows, float(config.max_episode_tokens)


def place(batch: Batch, values: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lay per-trajectory arrays (aligned with each ``token_ids``) out as ``(B, T)`` like ``batch``; 0 on padding.

    ``values[i]`` belongs to ``batch.trajectories[i]`` (segment ``i``).
    """
    segments, positions = batch.segment_ids_B_T, batch.token_index_B_T
    offsets = np.cumsum([0, *(len(v) for v in values[:-1])])
    flat = torch.as_tensor(np.concatenate(values), dtype=dtype, device=segments.device)
    index = torch.as_tensor(offsets, device=segments.device)[segments.clamp(min=0)] + positions
    return torch.where(segments >= 0, flat[index], torch.zeros((), dtype=dtype, device=segments.device))
