"""The one shape of an unknown-key error, at every level of every config: the key's dotted path, where it was
set, the closest keys of its level, and where those are documented. Pure text: no pydantic here, so any layer
(the judge, the learners, the pipeline) can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["closest_keys", "model_keys", "unknown_key_message"]


_FAMILIAR = {
    "learning_rate": "lr",
    "num_generations": "group_size",
    "max_completion_length": "max_new_tokens",
    "max_grad_norm": "grad_clip",
    "num_iterations": "mu",
    "per_device_train_batch_size": "batch_size",
    "rank": "r",
}
"""Names other trainers (TRL, verl, peft) give settings that agentrl names otherwise: suggested where they fit."""


def closest_keys(key: str, valid: Sequence[str]) -> list[str]:
    """The valid keys ``key`` most likely meant, best first (at most 3; ``[]`` when none is close).

    Close spellings (``max_step`` -> ``max_steps``), a valid key that is one ``_``-separated word of ``key``
    (``lr_rate`` -> ``lr``) and other trainers' names for a setting (``learning_rate`` -> ``lr``) count.
    """
    named = [k for k in (_FAMILIAR.get(key.lower(), ""), *key.lower().split("_")) if k in valid]
    ratios = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in valid}
    spelled = sorted((k for k in valid if ratios[k] >= 0.6), key=lambda k: -ratios[k])
    best = [k for k in spelled if ratios[k] >= ratios[spelled[0]] - 0.1] if spelled else []  # not the also-rans
    return list(dict.fromkeys([*named, *best]))[:3]


def unknown_key_message(
    path: str, valid: Sequence[str], documented: str, source: str = "", level: str = ""
) -> str:
    """The message for one unknown key, the same shape at every level of every config.

    Args:
        path: the key's full dotted path, e.g. ``"learner.max_step"``.
        valid: the keys its level takes.
        documented: what those keys are and where they are documented, e.g. ``"the fields of
            agentrl.learners.grpo.GRPOConfig, each documented at its field"``.
        source: where the key was set, e.g. ``"--set learner.max_step=3"`` or ``"in run.yaml"``.
        level: names the level in the message; default ``"under <section>"`` (``"at the top level"``).

    Returns:
        e.g. ``unknown key 'learner.max_step' (--set learner.max_step=3): did you mean 'learner.max_steps'?
        The keys under learner are the fields of agentrl.learners.grpo.GRPOConfig, ...``
    """
    section, _, key = path.rpartition(".")
    level = level or (f"under {section}" if section else "at the top level")
    close = closest_keys(key, valid)
    where = f" ({source})" if source else ""
    if not valid:
        return f"unknown key {path!r}{where}: no key goes {level}: its keys would be {documented}, and there are none"
    if close:
        guess = f"did you mean {' or '.join(repr(section + '.' + k if section else k) for k in close)}?"
    else:
        guess = f"no key {level} is close."
    listed = f" ({', '.join(valid)})" if not close and len(valid) <= 25 else ""
    return f"unknown key {path!r}{where}: {guess} The keys {level}{listed} are {documented}"


def model_keys(cls: type) -> str:
    """Where the keys of ``cls`` are documented, for :func:`unknown_key_message`."""
    return f"the fields of {cls.__module__}.{cls.__qualname__}, each documented at its field"
