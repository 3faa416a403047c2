"""The trainable model of a learner: loading (from a model or a checkpoint), LoRA, gradient checkpointing,
the frozen reference, and the weights a rollout backend gets.

With LoRA, a checkpoint directory holds the merged model (so ``load_model(path)`` loads it like any other)
plus the adapter alone under ``adapter/``, which resuming loads onto the original base model so the
optimizer state still matches the parameters it was built for.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import ConfigError
from agentrl.learners.config import LoRAConfig, TrainConfig

__all__ = [
    "ADAPTER_DIR",
    "export_weights",
    "is_lora",
    "load_reference",
    "load_trainable",
    "pad_id",
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


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch's rows: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
    (LoRA adapters merged in). A model sharded over data-parallel ranks gives its full tensors (gathered:
    every rank calls this; rank 0 gets them, the others nothing)."""
    from agentrl.learners import data_parallel

    if data_parallel.is_sharded(model):
        yield from data_parallel.full_state_dict(model).items()
        return
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
