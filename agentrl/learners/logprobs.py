"""The one logprob path: per-token logprobs (and entropies) of a collated batch's policy tokens under a
model, for every learner (SFT, the DPO family, GRPO, PPO) and for loops written outside the library, e.g.
``examples/grpo_math.py``. Rows may be padded, packed or prompt-shared
(:meth:`~agentrl.data.batch.Batch.model_inputs`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from agentrl.algos.sampling import is_truncated, sampling_logprobs
from agentrl.learners.policy_model import is_lora

__all__ = ["decoder_and_head", "policy_logprobs", "reference_logprobs", "token_distributions"]


# Config fields of the models whose logits are more than head(hidden): soft-capped or scaled.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")  # fmt: skip


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and the LM head of a ``*ForCausalLM`` whose logits are ``head(decoder(...)[0])``
    (with LoRA, the wrapped model's, adapters inside), or None for any other model."""
    base = model.get_base_model() if is_lora(model) else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not type(base).__name__.endswith("ForCausalLM") or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(base.config.get_text_config(), name, None) is not None for name in _LOGIT_TRANSFORMS):
        return None
    decoder = getattr(base, base.base_model_prefix, None)
    return (decoder, head) if decoder is not None else None


def policy_logprobs(
    model: Any,
    batch: Any,
    temperature: float = 1.0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of the batch's policy tokens (``loss_mask`` 1) under ``model`` at sampling
    temperature ``temperature``, aligned with the ledger (position ``t`` holds ``log p(token t)``; 0 on every
    other token, which no loss reads), and with ``with_entropy`` the entropy of the distribution each of
    them was drawn from (detached unless ``entropy_grad``, for an entropy bonus).

    With ``top_k`` / ``top_p`` the distribution is the truncated one the sampler draws from with these
    weights (:func:`agentrl.algos.sampling.sampling_logprobs`; the scored token always stays in it), so the
    ratio to the sampler's logprobs is exactly 1 when the weights are the sampler's.

    Only the positions that predict a policy token go through the softmax, so a long prompt or tool
    result costs its forward pass and nothing more. Rows may be padded, packed or prompt-shared (see
    :meth:`~agentrl.data.batch.Batch.model_inputs`).
    """
    predicts_B_T = batch.loss_mask_B_T[:, 1:] != 0  # the logits at t predict token t + 1
    logp_N_V = token_distributions(model, batch, temperature, top_k=top_k, top_p=top_p)
    picked_N = logp_N_V.gather(-1, batch.token_ids_B_T[:, 1:][predicts_B_T].unsqueeze(-1)).squeeze(-1)
    logprobs_B_T = _scatter(picked_N, predicts_B_T)
    entropy_B_T = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            terms_N_V = torch.where(torch.isfinite(logp_N_V), logp_N_V.exp() * logp_N_V, 0.0)
            entropy_B_T = _scatter(-terms_N_V.sum(-1), predicts_B_T)
    return logprobs_B_T, entropy_B_T


def token_distributions(
    model: Any, batch: Any, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """``(N, V)`` log-probabilities of the whole vocabulary at each of the ``N`` positions that predict a policy
    token, in the ledger's order: the distributions :func:`policy_logprobs` reads its tokens from."""
    scale = temperature if temperature > 0 else 1.0
    predicts_B_T = batch.loss_mask_B_T[:, 1:] != 0
    logits_N_V = _predicting_logits(model, batch, predicts_B_T).float()
    if not is_truncated(top_k, top_p):
        return torch.log_softmax(logits_N_V / scale, dim=-1)
    targets_N = batch.token_ids_B_T[:, 1:][predicts_B_T]
    return sampling_logprobs(logits_N_V, scale, top_k, top_p, keep=targets_N)


def _scatter(values_N: torch.Tensor, predicts_B_T: torch.Tensor) -> torch.Tensor:
    """Values at the predicting positions back onto the ledger's ``(B, T)`` grid (shifted by one), 0 elsewhere."""
    out = values_N.new_zeros(predicts_B_T.shape)
    out = out.masked_scatter(predicts_B_T, values_N)
    return torch.nn.functional.pad(out, (1, 0))


def _predicting_logits(model: Any, batch: Any, predicts_B_T: torch.Tensor) -> torch.Tensor:
    """The logits at the positions ``predicts_B_T`` marks (of ``T - 1``), shape ``(N, V)``: the LM head runs
    only there when the model splits into decoder and head, else the whole forward does. A batch's
    :attr:`~agentrl.data.batch.Batch.shared_prefix` runs once, batch 1, every row attending to its keys and
    values (not under gradient checkpointing, which recomputes without a cache)."""
    inputs = batch.model_inputs()
    split = decoder_and_head(model)
    if split is None:
        logits_B_T_V = model(input_ids=batch.token_ids_B_T, use_cache=False, **inputs).logits
        return logits_B_T_V[:, :-1][predicts_B_T]
    decoder, head = split
    shared = batch.shared_prefix if not getattr(decoder, "is_gradient_checkpointing", False) else 0
    if shared:
        ids_B_T = batch.token_ids_B_T
        hidden_B_S_H = decoder(
            input_ids=ids_B_T[:, shared:], attention_mask=inputs["attention_mask"],
            past_key_values=_prefix_cache(decoder, ids_B_T[:1, :shared], ids_B_T.shape[0]),
            position_ids=batch.position_ids_B_T[:, shared:], use_cache=False,
        )[0]  # fmt: skip
        return head(hidden_B_S_H[:, :-1][predicts_B_T[:, shared:]])
    hidden_B_T_H = decoder(input_ids=batch.token_ids_B_T, use_cache=False, **inputs)[0]
    return head(hidden_B_T_H[:, :-1][predicts_B_T])


def _prefix_cache(decoder: Any, prefix_ids_1_P: torch.Tensor, rows: int) -> Any:
    """The prefix run once, its keys and values broadcast to ``rows`` rows (gradients flow back through them)."""
    from transformers.cache_utils import DynamicCache

    cache = decoder(input_ids=prefix_ids_1_P, use_cache=True).past_key_values
    layers = [
        (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=layers, config=decoder.config)


@torch.no_grad()
def reference_logprobs(
    reference: Any, model: Any, batch: Any, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logprobs under the reference policy: ``reference`` when loaded, else ``model`` with adapters off (truncated
    like the policy's, so a KL estimate compares like with like)."""
    context = model.disable_adapter() if reference is None else contextlib.nullcontext()
    with context:
        logprobs_B_T, _ = policy_logprobs(reference if reference is not None else model, batch, temperature,
                                          top_k=top_k, top_p=top_p)  # fmt: skip
    return logprobs_B_T
