"""Load a policy's tokenizer and model by name: a hub id, a local directory, or ``tiny``.

``tiny`` (or ``agentrl/tiny``) names the embedded tiny model (:mod:`agentrl.models.tiny`); it resolves to
a local directory and then loads through the same ``from_pretrained`` call as any hub model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentrl.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["TINY_NAMES", "load_model", "load_tokenizer", "resolve_model"]

TINY_NAMES = ("tiny", "agentrl/tiny")


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Map ``tiny`` / ``agentrl/tiny`` to the tiny model's directory (built on first use); return
    anything else (a hub id or a local path) unchanged, as a string."""
    name = os.fspath(name_or_path)
    if name in TINY_NAMES:
        from agentrl.models.tiny import tiny_model_path

        return str(tiny_model_path())
    _check_model_directory(name)
    return name


def _check_model_directory(name: str) -> None:
    """A local directory that holds checkpoints (``step-*`` folders) rather than a model gets an error naming
    the newest, instead of a tokenizer library's complaint about missing files."""
    path = Path(name)
    if not path.is_dir() or (path / "config.json").exists():
        return
    saved = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").exists())
    if saved:
        names = ", ".join(p.name for p in saved[-3:])
        raise ConfigError(
            f"{name!r} holds saved checkpoints ({names}), not a model: pass one of them, e.g. the newest: "
            f"--model {saved[-1]}"
        )


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on the resolved name; ``kwargs`` pass through.

    Raises:
        ConfigError: the name is neither a loadable local directory nor a hub id that can be fetched.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(resolved, **kwargs)
    except OSError as exc:
        raise _load_error(os.fspath(name_or_path), resolved, exc) from exc


def load_model(
    name_or_path: str | os.PathLike[str], dtype: Any = None, device: Any = None, **kwargs: Any
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` on the resolved name, then moved to ``device``.

    Args:
        name_or_path: a hub id, a local model directory, or ``tiny``.
        dtype: a ``torch.dtype`` (or its name) for the weights; ``None`` keeps the checkpoint's default.
        device: where to put the model (``"cpu"``, ``"cuda:0"``, a ``torch.device``); ``None`` leaves it
            where ``from_pretrained`` put it.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        ConfigError: the name is neither a loadable local directory nor a hub id that can be fetched.
    """
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(name_or_path)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as exc:
        raise _load_error(os.fspath(name_or_path), resolved, exc) from exc
    return model if device is None else model.to(device)


def _load_error(name: str, resolved: str, exc: OSError) -> ConfigError:
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if Path(resolved).is_dir():
        return ConfigError(
            f"Could not load model {name!r} from the local directory {resolved!r} ({cause}). The directory "
            "must hold a saved model (config.json, weights and tokenizer files, as save_pretrained writes)."
        )
    return ConfigError(
        f"Could not load model {name!r}: it is not a local directory and the Hugging Face Hub could not "
        f"provide it (offline, unreachable, or no such model id) ({cause}). Pass the path of a local model "
        "directory, download the model while online first, or use 'tiny' for the embedded tiny model."
    )
