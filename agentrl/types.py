"""Records that cross module boundaries: chat messages, tool calls, stop reasons.

Messages are plain dicts in the OpenAI chat format (what ``tokenizer.apply_chat_template`` and every
OpenAI-compatible server take), typed with :class:`Message`. Everything else is immutable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

__all__ = ["DEFAULT_DEADLINE_S", "Message", "Role", "StopReason", "ToolCall", "ToolSchema"]

Role = Literal["system", "user", "assistant", "tool"]

ToolSchema = dict[str, Any]
"""An OpenAI function-tool schema: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""


class _MessageRequired(TypedDict):
    role: Role
    content: str


class Message(_MessageRequired, total=False):
    """One chat message, OpenAI format.

    ``tool_calls`` appears on assistant messages (OpenAI shape: ``{"id", "type": "function",
    "function": {"name", "arguments"}}``), ``tool_call_id`` and ``name`` on tool results. ``weight`` 0 on an
    assistant message of a demonstration makes it context, not a training target (OpenAI fine-tuning's
    convention; 1, the default, trains on it).
    """

    tool_calls: list[dict[str, Any]]
    tool_call_id: str
    name: str
    weight: int


@dataclass(frozen=True)
class ToolCall:
    """A parsed, well-formed tool call: the tool's name and its JSON-decoded arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry for this call (arguments as a JSON string)."""
        import json

        return {
            "id": self.id or "",
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(dict(self.arguments))},
        }


DEFAULT_DEADLINE_S = 900.0
"""Wall-clock seconds an episode may take unless a run says otherwise: an env that hangs ends its episode
(``StopReason.DEADLINE``), never the run."""


class StopReason(str, enum.Enum):
    """Why an episode ended. ``TERMINATED`` is the only clean end; every other value is a limit or a failure.

    Learners read it to decide what to train on: a ``TERMINATED`` episode's final reward is the task's
    outcome, a truncated one (``TRUNCATED``, ``MAX_TURNS``, ``MAX_TOKENS``, ``CONTEXT_OVERFLOW``,
    ``DEADLINE``) was cut short, and ``ERROR`` carries the exception in ``Trajectory.error``.
    """

    TERMINATED = "terminated"
    """The environment said the task ended (``terminated=True``)."""
    TRUNCATED = "truncated"
    """The environment cut the episode (``truncated=True``), e.g. its own turn or time limit."""
    MAX_TURNS = "max_turns"
    """The runner's turn limit was reached."""
    MAX_TOKENS = "max_tokens"
    """The episode's token budget was spent (the last sample ended without a stop token)."""
    CONTEXT_OVERFLOW = "context_overflow"
    """The next prompt would not fit in the model's context window."""
    DEADLINE = "deadline"
    """The episode's wall-clock deadline passed."""
    ERROR = "error"
    """An exception from the env, a tool, a reward or the policy backend ended the episode."""

    @property
    def is_truncation(self) -> bool:
        """True for every end that is neither a clean termination nor an error."""
        return self not in (StopReason.TERMINATED, StopReason.ERROR)
