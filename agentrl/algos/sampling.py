"""The distribution a sampler draws from, for the sampler and for the learner alike.

With top-k or top-p the sampler draws from a *truncated* distribution: ``logits / temperature``, the tokens
outside the kept set removed, the rest renormalised. A learner that scores the sampled tokens under the full
softmax instead sees a ratio ``pi_learner / pi_sampler`` equal to the kept set's mass (below 1) before any
update, so importance weights and clipping act on a policy that was never sampled. Both sides here call
:func:`sampling_logprobs` on their own logits: the ratio is exactly 1 when the weights are equal, and the
learner's policy is the truncated one the sampler would draw from with its weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["is_truncated", "sampling_logprobs"]


def is_truncated(top_k: int | None, top_p: float | None) -> bool:
    """Whether these settings cut the distribution (top-k on, or top-p below 1)."""
    return bool(top_k and top_k > 0) or (top_p is not None and top_p < 1)


def sampling_logprobs(
    logits: torch.Tensor, temperature: Any, top_k: Any = 0, top_p: Any = 1.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities of the distribution a sampler draws from, for every token of the vocabulary.

    ``logits / temperature``, then top-k (keep the k largest; ties at the k-th value are kept), then top-p
    (drop the least likely tokens whose total probability is at most ``1 - top_p``; the most likely token
    always stays), then ``log_softmax``. Filtered tokens get ``-inf``. A temperature of 0 means greedy and
    is treated as 1 (the logprob of the argmax under the model's own distribution).

    Args:
        logits: ``(..., V)`` raw logits.
        temperature, top_k, top_p: scalars, or tensors of shape ``logits.shape[:-1]`` (one per row).
        keep: ``logits.shape[:-1]`` token ids that stay in the kept set whatever the filters say: the tokens a
            learner scores, sampled by weights that kept them (after an update they may fall outside the set
            its own weights keep, and a sampled token must not get ``-inf``).

    Returns:
        A float32 tensor shaped like ``logits``.
    """
    import torch

    scores = logits.float()
    shape = scores.shape[:-1]
    temp = torch.as_tensor(temperature, dtype=scores.dtype, device=scores.device).expand(shape)
    k = torch.as_tensor(top_k, dtype=torch.long, device=scores.device).expand(shape)
    p = torch.as_tensor(top_p, dtype=scores.dtype, device=scores.device).expand(shape)
    scores = scores / torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(-1)
    unfiltered = scores
    if bool((k > 0).any()):
        vocab = scores.shape[-1]
        k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
        kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if bool((p < 1).any()):
        ascending, order = scores.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - p).unsqueeze(-1)
        drop[..., -1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if keep is not None and scores is not unfiltered:
        index = keep.unsqueeze(-1)
        scores = scores.scatter(-1, index, unfiltered.gather(-1, index))
    return scores.log_softmax(dim=-1)
