"""The trainable model of a learner: loading (from a model or a checkpoint), LoRA, gradient checkpointing,
the frozen reference, the per-token logprobs a policy loss needs, and the weights a rollout backend gets.

With LoRA, a checkpoint directory holds the merged model (so ``load_model(path)`` loads it like any other)
plus the adapter alone under ``adapter/``, which resuming loads onto the original base model so the
optimizer state still matches the parameters it was built for.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import ConfigError
from agentrl.learners._config import LoRAConfig, TrainConfig

__all__ = [
    "ADAPTER_DIR",
    "decoder_and_head",
    "export_weights",
    "load_reference",
    "load_trainable",
    "model_inputs",
    "policy_logprobs",
    "reference_logprobs",
    "save_step",
    "saveable",
]

ADAPTER_DIR = "adapter"


def load_trainable(config: TrainConfig) -> tuple[Any, Any]:
    """The model and tokenizer to train: from ``resume_from`` when set, else ``model``; fp32 on
    ``config.device``, LoRA-wrapped and with gradient checkpointing when asked, in train mode."""
    from agentrl.models.loading import load_model, load_tokenizer

    device = torch.device(config.device)
    resume = config.resume_from
    adapter = Path(resume) / ADAPTER_DIR if resume is not None and config.lora is not None else None
    if adapter is not None and not adapter.is_dir():
        raise ConfigError(
            f"{resume} has no {ADAPTER_DIR}/ directory, so it was not written by a LoRA run; resume it "
            "without lora, or start a LoRA run from it as model= (a fresh adapter)"
        )
    start = config.model if (resume is None or adapter is not None) else resume
    tokenizer = load_tokenizer(start)
    model = load_model(start, dtype=torch.float32, device=device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora is not None:
        model = _with_lora(model, config.lora, adapter)
    model.train()
    return model, tokenizer


def _with_lora(model: Any, lora: LoRAConfig, adapter: Path | None) -> Any:
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("lora needs peft: pip install 'agentrl[peft]'") from None
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if model.config.use_cache is False:  # peft re-enables input grads for checkpointed models itself
        model.enable_input_require_grads()
    settings = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, settings)


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def saveable(model: Any) -> tuple[Any, Any | None]:
    """``(full model, adapter model or None)`` to write into a checkpoint: with LoRA, a merged copy of the
    weights (the live model is left as it is) and the adapter model itself."""
    if not is_lora(model):
        return model, None
    return copy.deepcopy(model).merge_and_unload(), model


def export_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs in the base model's naming, for a rollout backend's ``update_weights``
    (LoRA adapters merged in)."""
    full, _ = saveable(model)
    yield from full.state_dict().items()


def load_reference(config: TrainConfig, model: Any) -> Any:
    """The frozen reference policy for a KL term: the starting model in eval mode, gradients off.

    With LoRA no second copy is loaded: :func:`reference_logprobs` disables the adapters instead.
    """
    if is_lora(model):
        return None
    from agentrl.models.loading import load_model

    reference = load_model(config.model, dtype=torch.float32, device=torch.device(config.device)).eval()
    reference.requires_grad_(False)
    return reference


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
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of the batch's policy tokens (``loss_mask`` 1) under ``model`` at sampling
    temperature ``temperature``, aligned with the ledger (position ``t`` holds ``log p(token t)``; 0 on every
    other token, which no loss reads), and with ``with_entropy`` the entropy of the distribution each of
    them was drawn from (detached unless ``entropy_grad``, for an entropy bonus).

    Only the positions that predict a policy token go through the softmax, so a long prompt or tool
    result costs its forward pass and nothing more. Rows may be padded, packed or prompt-shared (see
    :func:`model_inputs`).
    """
    scale = temperature if temperature > 0 else 1.0
    predicts_B_T = batch.loss_mask_B_T[:, 1:] != 0  # the logits at t predict token t + 1
    logp_N_V = torch.log_softmax(_predicting_logits(model, batch, predicts_B_T).float() / scale, dim=-1)
    picked_N = logp_N_V.gather(-1, batch.token_ids_B_T[:, 1:][predicts_B_T].unsqueeze(-1)).squeeze(-1)
    logprobs_B_T = _scatter(picked_N, predicts_B_T)
    entropy_B_T = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy_B_T = _scatter(-(logp_N_V.exp() * logp_N_V).sum(-1), predicts_B_T)
    return logprobs_B_T, entropy_B_T


def _scatter(values_N: torch.Tensor, predicts_B_T: torch.Tensor) -> torch.Tensor:
    """Values at the predicting positions back onto the ledger's ``(B, T)`` grid (shifted by one), 0 elsewhere."""
    out = values_N.new_zeros(predicts_B_T.shape)
    out = out.masked_scatter(predicts_B_T, values_N)
    return torch.nn.functional.pad(out, (1, 0))


def _predicting_logits(model: Any, batch: Any, predicts_B_T: torch.Tensor) -> torch.Tensor:
    """The logits at the positions ``predicts_B_T`` marks (of ``T - 1``), shape ``(N, V)``: the LM head runs
    only there when the model splits into decoder and head, else the whole forward does."""
    inputs = model_inputs(batch)
    split = decoder_and_head(model)
    if split is None:
        logits_B_T_V = model(input_ids=batch.token_ids_B_T, use_cache=False, **inputs).logits
        return logits_B_T_V[:, :-1][predicts_B_T]
    decoder, head = split
    hidden_B_T_H = decoder(input_ids=batch.token_ids_B_T, use_cache=False, **inputs)[0]
    return head(hidden_B_T_H[:, :-1][predicts_B_T])


def model_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """How a batch's rows are attended: a padded row takes its attention mask; packed rows take position ids
    (transformers builds the block-diagonal mask where they restart, without a KV cache); prompt-shared rows
    take a 4-D boolean mask (each segment sees itself causally and the shared prompt) and position ids."""
    from agentrl.data.buffer import SHARED_SEGMENT

    segments = batch.segment_ids_B_T
    if bool((segments == SHARED_SEGMENT).any()):
        T = segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        to_shared = (segments == SHARED_SEGMENT)[:, None, :]
        allowed = causal & (same | to_shared) & (segments != -1)[:, None, :]
        allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)  # padding sees itself: no empty row
        return {"attention_mask": allowed[:, None], "position_ids": batch.position_ids_B_T}
    if bool((segments.max(dim=1).values != segments[:, 0]).any()):
        return {"position_ids": batch.position_ids_B_T}
    return {"attention_mask": batch.attention_mask_B_T}


@torch.no_grad()
def reference_logprobs(reference: Any, model: Any, batch: Any, temperature: float = 1.0) -> torch.Tensor:
    """Logprobs under the reference policy: ``reference`` when loaded, else ``model`` with adapters off."""
    context = model.disable_adapter() if reference is None else contextlib.nullcontext()
    with context:
        logprobs_B_T, _ = policy_logprobs(reference if reference is not None else model, batch, temperature)
    return logprobs_B_T


def save_step(
    config: TrainConfig, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any, step: int,
    meta: Any, extras: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write ``<output_dir>/step-NNNNNN`` atomically (LoRA: merged weights + ``adapter/``), then drop
    checkpoints beyond ``keep_last``."""
    import shutil

    from agentrl.learners import _train

    assert config.output_dir is not None
    full, adapter = saveable(model)
    extras = {**(extras or {}), **({ADAPTER_DIR: adapter} if adapter is not None else {})}
    path = _train.save_checkpoint(
        _train.step_dir(config.output_dir, step), full, tokenizer,
        optimizer=optimizer, scheduler=scheduler, step=step, meta=meta, extras=extras,
    )  # fmt: skip
    if config.keep_last is not None:
        for old in _train.checkpoint_dirs(config.output_dir)[: -config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path
