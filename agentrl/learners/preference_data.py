"""Preference data as conversations: pairs (prompt, chosen, rejected) and KTO's labelled conversations, in
OpenAI-messages form with optional ``tools``, and their JSONL reader. :mod:`agentrl.learners.dpo` turns them
(or pairs mined from a buffer) into completion-masked token ledgers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.data.buffer import PreferencePair
from agentrl.errors import ConfigError
from agentrl.types import Message, ToolSchema

__all__ = ["Example", "LabelledConversation", "PreferenceConversation", "read_preference_jsonl", "read_preferences"]


@dataclass(frozen=True)
class PreferenceConversation:
    """A prompt (chat messages) with a preferred and a dispreferred continuation (assistant/tool messages)."""

    prompt: Sequence[Message]
    chosen: Sequence[Message]
    rejected: Sequence[Message]
    tools: Sequence[ToolSchema] = ()


@dataclass(frozen=True)
class LabelledConversation:
    """One conversation labelled desirable or not (KTO's unpaired data); only ``completion`` is scored."""

    prompt: Sequence[Message]
    completion: Sequence[Message]
    desirable: bool
    tools: Sequence[ToolSchema] = ()


Example = PreferenceConversation | LabelledConversation | PreferencePair


def read_preferences(
    source: Any, *, columns: Mapping[str, str] | None = None, split: str = "train", name: str | None = None
) -> list[PreferenceConversation | LabelledConversation]:
    """Preference data from any source of :func:`agentrl.data.sources.load_records` (JSONL, Parquet, Arrow,
    a ``save_to_disk`` directory, a Hub id), one row each (``tools`` optional):

    - pairs: ``{"prompt": [...], "chosen": [...], "rejected": [...], "tools": [...]}``; as in TRL, a string
      prompt is one user message and a string answer one assistant message, and without ``prompt`` the
      conversations' shared leading messages are the prompt;
    - KTO: ``{"messages": [...], "label": true}`` (every assistant turn scored) or
      ``{"prompt": [...], "completion": [...], "label": false}``.

    Args:
        columns: ``{field: the source's column}``, e.g. ``{"chosen": "preferred", "rejected": "other"}``.

    Raises:
        ConfigError: the source cannot be read, or a row has neither form (naming the source and row).
    """
    from agentrl.data.sources import placed_records

    out: list[PreferenceConversation | LabelledConversation] = []
    for place, record in placed_records(source, columns=columns, split=split, name=name):
        try:
            out.append(_record(record))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{place}: {exc}") from None
    return out


def read_preference_jsonl(path: str | Path) -> list[PreferenceConversation | LabelledConversation]:
    """:func:`read_preferences` of a JSONL file (kept for its existing callers)."""
    return read_preferences(path)


def _split_shared_prefix(chosen: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """TRL's implicit prompt: the leading messages both conversations share, and what follows in each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _record(record: Any) -> PreferenceConversation | LabelledConversation:
    forms = (
        '{"prompt": [...], "chosen": [...], "rejected": [...]}, {"messages": [...], "label": true} or '
        '{"prompt": [...], "completion": [...], "label": false}'
    )
    if not isinstance(record, dict):
        raise TypeError(f"expected one of {forms}")
    tools = tuple(record.get("tools") or ())

    # TRL's standard (non-conversational) form: every part a string
    standard = all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected", "completion")
                   if k in record)  # fmt: skip

    def messages(key: str) -> tuple[Message, ...]:
        value = record.get(key)
        if isinstance(value, str) and standard:
            return ({"role": "user" if key == "prompt" else "assistant", "content": value},)
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise TypeError(f"{key!r} must be a list of message objects; expected one of {forms}")
        return tuple(value)

    if ("chosen" in record or "rejected" in record) and "prompt" not in record:
        prompt, chosen, rejected = _split_shared_prefix(list(messages("chosen")), list(messages("rejected")))
        return PreferenceConversation(tuple(prompt), tuple(chosen), tuple(rejected), tools)
    if "chosen" in record or "rejected" in record:
        return PreferenceConversation(messages("prompt"), messages("chosen"), messages("rejected"), tools)
    if "label" in record:
        if not isinstance(record["label"], bool):
            raise TypeError(f"'label' must be true or false, got {record['label']!r}")
        if "messages" in record:
            return LabelledConversation((), messages("messages"), record["label"], tools)
        return LabelledConversation(messages("prompt"), messages("completion"), record["label"], tools)
    raise ValueError(f"expected one of {forms}")
