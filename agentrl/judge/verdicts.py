"""What a judge is asked and how its answer is read: prompt templates and strict verdict parsers.

Pure string functions. A verdict is read only from a line of exactly the asked form (``Score: 7``,
``Verdict: A``); anything else (no such line, two of them disagreeing, a score off the scale) is a parse
failure with the reason, never a guess. The judge keeps the raw text beside the parsed value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.errors import ConfigError
from agentrl.types import Message

__all__ = [
    "DEFAULT_RUBRIC",
    "PAIRWISE_TEMPLATE",
    "POINTWISE_TEMPLATE",
    "SYSTEM_PROMPT",
    "Parsed",
    "pairwise_messages",
    "parse_preference",
    "parse_score",
    "pointwise_messages",
    "transcript",
]

SYSTEM_PROMPT = "You are a careful, impartial judge of answers."
DEFAULT_RUBRIC = "Is the response correct, complete and helpful for the task? Higher is better."

POINTWISE_TEMPLATE = """Rate the response to the task against the rubric.
Rubric: {rubric}
[Task]
{prompt}
[Response]
{response}
End with one line exactly of the form "Score: N", N an integer from {low} to {high}."""
"""Fields: ``rubric``, ``prompt``, ``response``, ``low``, ``high``."""

PAIRWISE_TEMPLATE = """Which response answers the task better, by the rubric?
Rubric: {rubric}
[Task]
{prompt}
[Response A]
{a}
[Response B]
{b}
End with one line exactly "Verdict: A", "Verdict: B" or "Verdict: tie"."""
"""Fields: ``rubric``, ``prompt``, ``a``, ``b``."""

_SCORE = re.compile(r"^\s*\**score\**\s*:\s*\**\s*(-?\d+)\s*\**\s*$", re.IGNORECASE | re.MULTILINE)
_VERDICT = re.compile(
    r"^\s*\**verdict\**\s*:\s*\**\s*\[?(a|b|tie)\]?\s*\**\s*$", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class Parsed:
    """A parsed verdict: ``value`` (None when the text holds no valid verdict, then ``error`` says why)."""

    value: float | None
    error: str | None = None


def transcript(prompt: str | Sequence[Message]) -> str:
    """A task as the judge reads it: a string as it is, a conversation as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for message in prompt:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ConfigError(
                f"a judge prompt is a str or a list of chat messages, got an item {message!r:.80}"
            )
        lines.append(f"{message['role']}: {message.get('content') or ''}")
    return "\n".join(lines)


def _conversation(user: str, system: str | None) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}]


def pointwise_messages(prompt: Any, response: str, *, rubric: str, scale: tuple[int, int],
                       template: str = POINTWISE_TEMPLATE, system: str | None = SYSTEM_PROMPT) -> list[Message]:  # fmt: skip
    """The conversation asking for a score of ``response`` to ``prompt``."""
    text = template.format(
        rubric=rubric, prompt=transcript(prompt), response=response, low=scale[0], high=scale[1]
    )
    return _conversation(text, system)


def pairwise_messages(prompt: Any, a: str, b: str, *, rubric: str, template: str = PAIRWISE_TEMPLATE,
                      system: str | None = SYSTEM_PROMPT) -> list[Message]:  # fmt: skip
    """The conversation asking which of ``a`` (shown first) and ``b`` answers ``prompt`` better."""
    return _conversation(template.format(rubric=rubric, prompt=transcript(prompt), a=a, b=b), system)


def _single(matches: list[str], what: str) -> tuple[str | None, str | None]:
    distinct = {m.lower() for m in matches}
    if not distinct:
        return None, f"no '{what}' line"
    if len(distinct) > 1:
        return None, f"conflicting '{what}' lines: {sorted(distinct)}"
    return matches[-1].lower(), None


def parse_score(text: str, scale: tuple[int, int]) -> Parsed:
    """The score of a ``Score: N`` line, mapped from ``scale`` to [0, 1].

    Repeating the same line is accepted; two different scores, no score line or a score off the scale
    are parse failures.
    """
    found, error = _single(_SCORE.findall(text), "Score: N")
    if found is None:
        return Parsed(None, error)
    low, high = scale
    value = int(found)
    if not low <= value <= high:
        return Parsed(None, f"score {value} is off the scale {low}..{high}")
    return Parsed((value - low) / (high - low))


def parse_preference(text: str) -> Parsed:
    """A ``Verdict: A|B|tie`` line as the preference for A: 1.0 (A), 0.0 (B) or 0.5 (tie)."""
    found, error = _single(_VERDICT.findall(text), "Verdict: A|B|tie")
    if found is None:
        return Parsed(None, error)
    return Parsed({"a": 1.0, "b": 0.0, "tie": 0.5}[found])
