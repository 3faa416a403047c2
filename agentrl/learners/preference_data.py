"""Preference data as conversations: pairs (prompt, chosen, rejected) and KTO's labelled conversations, in
OpenAI-messages form with optional ``tools``, and their JSONL reader. :mod:`agentrl.learners.dpo` turns them
(or pairs mined from a buffer) into completion-masked token ledgers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.data.buffer import PreferencePair
from agentrl.data.jsonl import jsonl_records
from agentrl.errors import ConfigError
from agentrl.types import Message, ToolSchema

__all__ = ["Example", "LabelledConversation", "PreferenceConversation", "read_preference_jsonl"]


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


def read_preference_jsonl(path: str | Path) -> list[PreferenceConversation | LabelledConversation]:
    """Read OpenAI-messages preference data, one JSON object per line (``tools`` optional on each):

    - pairs: ``{"prompt": [...], "chosen": [...], "rejected": [...], "tools": [...]}``;
    - KTO: ``{"messages": [...], "label": true}`` (every assistant turn scored) or
      ``{"prompt": [...], "completion": [...], "label": false}``.

    Raises:
        ConfigError: a line is not JSON or has neither form; the message names file and line.
    """
    out: list[PreferenceConversation | LabelledConversation] = []
    for lineno, record in jsonl_records(path):
        try:
            out.append(_record(record))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}") from None
    return out


def _record(record: Any) -> PreferenceConversation | LabelledConversation:
    forms = (
        '{"prompt": [...], "chosen": [...], "rejected": [...]}, {"messages": [...], "label": true} or '
        '{"prompt": [...], "completion": [...], "label": false}'
    )
    if not isinstance(record, dict):
        raise TypeError(f"expected one of {forms}")
    tools = tuple(record.get("tools") or ())

    def messages(key: str) -> tuple[Message, ...]:
        value = record.get(key)
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise TypeError(f"{key!r} must be a list of message objects; expected one of {forms}")
        return tuple(value)

    if "chosen" in record or "rejected" in record:
        return PreferenceConversation(messages("prompt"), messages("chosen"), messages("rejected"), tools)
    if "label" in record:
        if not isinstance(record["label"], bool):
            raise TypeError(f"'label' must be true or false, got {record['label']!r}")
        if "messages" in record:
            return LabelledConversation((), messages("messages"), record["label"], tools)
        return LabelledConversation(messages("prompt"), messages("completion"), record["label"], tools)
    raise ValueError(f"expected one of {forms}")
