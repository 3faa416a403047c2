"""The settings every learner shares (model, optimizer, schedule, precision, LoRA, checkpoints), as one
pydantic base each learner's config extends. Invalid values raise :class:`~agentrl.errors.ConfigError`
with one line per bad field naming the value, the problem and what the field expects; an unknown key, at
any depth, is named by its dotted path with the closest keys of its level and where those are documented
(:func:`~agentrl._config_keys.unknown_key_message`, the one shape every config of the project uses).
"""

from __future__ import annotations

import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentrl._config_keys import model_keys, unknown_key_message
from agentrl.errors import ConfigError

__all__ = [
    "ConfigNote",
    "LoRAConfig",
    "StrictConfig",
    "TrainConfig",
    "default_device",
    "default_precision",
    "derived_warmup",
    "explain",
    "unknown_keys",
]


class ConfigNote(UserWarning):
    """A setting derived for the user (e.g. a warm-up shortened to fit a short run): shown, never an error."""


class StrictConfig(BaseModel):
    """Frozen, no unknown keys, and validation errors re-raised as one readable ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(explain(type(self), exc)) from None

    # Marks this __init__ as pydantic's own, so a nested StrictConfig is validated inside its parent's
    # validation (not by calling this method): its errors then keep their full location (``eval.taks``)
    # instead of arriving as one opaque message of the nested model.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class LoRAConfig(StrictConfig):
    """Low-rank adapters (peft) instead of full fine-tuning; the base weights stay frozen."""

    r: int = Field(8, ge=1, description="adapter rank, e.g. 8")
    alpha: int = Field(16, gt=0, description="scaling numerator (the update is scaled by alpha / r), e.g. 16")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input, in [0, 1)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, e.g. ['q_proj', 'v_proj'], or 'all-linear'"
    )


class TrainConfig(StrictConfig):
    """Fields every learner reads. Subclasses add their own and document them at the field."""

    model: str = Field("tiny", description="model to start from: 'tiny', a hub id or a local directory")
    template: str | None = Field(
        None, description="chat template: None for the tokenizer's own, 'chatml' or a Jinja string"
    )
    max_steps: int = Field(200, ge=1, description="optimizer steps to take, e.g. 200")
    lr: float = Field(2e-3, gt=0, le=1, description="peak AdamW learning rate, e.g. 2e-3 for the tiny model")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on weight matrices, e.g. 0.0 or 0.01")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1), e.g. (0.9, 0.999)"
    )
    warmup_steps: int = Field(
        30, ge=0, description="linear warm-up steps, fewer than max_steps, e.g. 30 (left unset: its default, or "
        "max_steps // 10 where the default would not fit)"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr, in [0, 1]")
    grad_clip: float | None = Field(
        1.0, gt=0, description="max global gradient norm, or None for no clipping"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'fp32', or 'bf16' autocast for the forward; 'auto': bf16 on a GPU that has it, else fp32"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    lora: LoRAConfig | None = Field(None, description="train LoRA adapters (peft) instead of all weights")
    device: str = Field("auto", description="torch device, e.g. 'cpu' or 'cuda:0'; 'auto': cuda where a GPU is visible")
    seed: int = Field(0, description="seeds the data order, the sampling and the global generators")
    output_dir: Path | None = Field(None, description="where step-NNNNNN checkpoints go; None saves nothing")
    save_every: int | None = Field(
        None, ge=1, description="checkpoint every N steps (and at the end), or None"
    )
    keep_last: int | None = Field(
        None, ge=1, description="keep only the newest N checkpoints, or None for all"
    )
    resume_from: Path | None = Field(None, description="a step-NNNNNN checkpoint to resume (weights + state)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        """``device`` and ``precision`` left at ``auto`` become what this machine offers (never stay ``auto``)."""
        if not isinstance(data, dict) or (data.get("device", "auto") != "auto" and data.get("precision", "auto") != "auto"):
            return data
        device = data.get("device", "auto")
        device = default_device() if device == "auto" else device
        precision = data.get("precision", "auto")
        return {**data, "device": device, "precision": default_precision(device) if precision == "auto" else precision}

    @model_validator(mode="before")
    @classmethod
    def _fit_default_warmup(cls, data: Any) -> Any:
        """A warm-up left at its default that would not fit a short run shrinks to a tenth of it, with a note."""
        if not isinstance(data, dict) or data.get("warmup_steps") is not None:
            return data
        default, max_steps = cls.model_fields["warmup_steps"].default, data.get("max_steps")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 0 < max_steps <= default:
            return data
        warmup = derived_warmup(default, max_steps)
        warnings.warn(
            f"{cls.__name__}: warmup_steps {warmup} (the default {default} is not fewer than max_steps {max_steps}); "
            "set warmup_steps to choose another", ConfigNote, stacklevel=2,
        )  # fmt: skip
        return {**data, "warmup_steps": warmup}

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps and self.warmup_steps > 0:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be fewer than max_steps ({self.max_steps}); "
                "lower warmup_steps or raise max_steps"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must each be in [0, 1), e.g. (0.9, 0.999)")
        if self.save_every is not None and self.output_dir is None:
            raise ValueError("save_every needs output_dir: set output_dir to where checkpoints should go")
        return self


def default_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: str) -> str:
    """``bf16`` on a CUDA device that computes in it, else ``fp32``."""
    if not str(device).startswith("cuda"):
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def derived_warmup(default: int, max_steps: int) -> int:
    """The warm-up a run gets when none was set: ``default``, or ``max_steps // 10`` where that is too long."""
    return default if default < max_steps else max_steps // 10


def unknown_keys(
    data: Mapping[str, Any], cls: type[BaseModel], at: str = "", sections: Mapping[str, type[BaseModel]] | None = None
) -> list[tuple[str, type[BaseModel]]]:
    """Every key of ``data``, at any depth, that ``cls`` does not take: nothing is validated but the keys.

    Args:
        at: the dotted path of ``data`` itself (``""`` at the top).
        sections: dotted paths of free-form mappings whose keys are the fields of a model, e.g.
            ``{"learner": GRPOConfig}``; a mapping field neither a model nor listed here is not checked.

    Returns:
        (dotted path, the model of its level) per unknown key, for
        :func:`~agentrl._config_keys.unknown_key_message`.
    """
    found = []
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        field = cls.model_fields.get(key)
        if field is None:
            if cls.model_config.get("extra") == "forbid":
                found.append((path, cls))
            continue
        inner = (sections or {}).get(path) or _model_of(field.annotation)
        if inner is not None and isinstance(value, Mapping):
            found += unknown_keys(value, inner, path, sections)
    return found


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``LoRAConfig | None`` -> LoRAConfig), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _level(cls: type[BaseModel], loc: Sequence[Any]) -> tuple[type[BaseModel], str, Any]:
    """Follow a validation error's ``loc`` down nested models: the model of its deepest level, and the name
    and field of the deepest field on the way (``""`` and None when the first key is not a field)."""
    model, name, field = cls, "", None
    for part in loc:
        found = model.model_fields.get(str(part))
        if found is None:  # an unknown key, a list index, a union member's tag
            break
        name, field = str(part), found
        inner = _model_of(found.annotation)
        if inner is None:
            break
        model = inner
    return model, name, field


def explain(cls: type[BaseModel], exc: ValidationError) -> str:
    """One line per bad field: its value, what is wrong, and the field's documentation (the fix); an unknown
    key, at any depth, as :func:`~agentrl._config_keys.unknown_key_message`."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        level, field_name, field = _level(cls, error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(unknown_key_message(name, list(level.model_fields), model_keys(level)))
            continue
        hint = f" ({field_name}: {field.description})" if field is not None and field.description else ""
        where = f"{cls.__name__}.{name}: got {error['input']!r};" if name else f"{cls.__name__}:"
        lines.append(f"{where} {error['msg'].removeprefix('Value error, ')}{hint}")
    return f"invalid {cls.__name__}:\n  " + "\n  ".join(lines)
