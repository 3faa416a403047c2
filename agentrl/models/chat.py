"""Turning messages into ledger tokens with a model's chat template, and proving the template fits.

The ledger appends: prompt ids, then per turn the policy's sampled ids, then the tokens the template
puts between that turn and the next generation (the assistant turn's closing glue, the env's messages,
the next generation prompt). That is only the model's real prompt format if the template is
*prefix-stable*: rendering the conversation so far is a string prefix of rendering it with one more turn,
and the assistant's text appears verbatim. :func:`check_template` proves it on a probe conversation at
start-up; templates that rewrite history (e.g. drop earlier reasoning) fail fast with a diff. Such models
can still be trained with the fixed template :data:`CHATML_TEMPLATE` (``ChatRenderer(tok, template="chatml")``).
:func:`demonstration_ledger` builds that ledger for a whole written conversation (SFT, the preference
learners and the reward models read conversations through it).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.errors import ConfigError, TemplateError
from agentrl.types import Message, StopReason, ToolSchema

__all__ = ["ChatRenderer", "check_template", "demonstration_ledger"]


def _fixed_template(name: str) -> str:
    if name != "chatml":
        raise TemplateError(f"unknown fixed chat template {name!r}; the one bundled is 'chatml'")
    from agentrl.models.tiny import CHATML_TEMPLATE

    return CHATML_TEMPLATE


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _diff(expected_prefix: str, actual: str) -> str:
    """A short unified diff around the first place where ``actual`` stops extending ``expected_prefix``."""
    at = _first_difference(expected_prefix, actual)
    lo = max(0, at - 120)
    a = expected_prefix[lo : at + 120].splitlines(keepends=True)
    b = actual[lo : at + 120].splitlines(keepends=True)
    lines = difflib.unified_diff(a, b, "conversation so far", "with one more turn", lineterm="")
    return f"first difference at character {at}:\n" + "".join(lines)


class ChatRenderer:
    """Renders messages with a tokenizer's chat template and cuts the ledger's observation tokens.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        tools: tool schemas passed to the template as ``tools=`` on every render.
        template: None for the tokenizer's own template, ``"chatml"`` for the bundled fixed one, or a
            Jinja template string.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[ToolSchema] | None = None, template: str | None = None):
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        if template is not None and "{" not in template:
            template = _fixed_template(template)
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "pass template='chatml' to use the bundled one"
            )

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            tools=self.tools,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Exact text of sampled ids, special tokens included (the stop token is part of the turn)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The opening prompt: ``messages`` rendered with the generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def assistant_message(self, sampled_text: str) -> Message:
        """The assistant message for a sampled turn: its text without the trailing stop token."""
        eos = self.tokenizer.eos_token or ""
        content = sampled_text[: -len(eos)] if eos and sampled_text.endswith(eos) else sampled_text
        return {"role": "assistant", "content": content}

    def observation_ids(
        self, history: Sequence[Message], sampled_text: str, new_messages: Sequence[Message]
    ) -> list[int]:
        """Tokens that follow a sampled assistant turn: closing glue, ``new_messages``, generation prompt.

        Args:
            history: the conversation before the assistant turn (what its prompt was rendered from).
            sampled_text: :meth:`decode` of the turn's sampled ids.
            new_messages: what the env answered.

        Raises:
            TemplateError: the template does not reproduce the history and the sampled text verbatim.
        """
        before = self.render(history, add_generation_prompt=True) + sampled_text
        full = [*history, self.assistant_message(sampled_text), *new_messages]
        after = self.render(full, add_generation_prompt=bool(new_messages))
        if not after.startswith(before):
            raise TemplateError(
                "the chat template is not prefix-stable, so the ledger cannot append turns; "
                "pass template='chatml' (a fixed training template) or fix the template.\n"
                + _diff(before, after)
            )
        return self.encode(after[len(before) :])


def demonstration_ledger(renderer: ChatRenderer, messages: Sequence[Message]) -> Trajectory:
    """Tokenize a conversation into the ledger the rollout runner would have recorded for it.

    Assistant turns (their text, tool-call markup and end-of-turn token) get mask 1; everything else 0.
    Messages after the last assistant turn are dropped (the runner stops there too).

    Raises:
        ConfigError: no assistant message, or an unknown role.
        TemplateError: the template does not render an assistant turn as prefix + text + end-of-turn.
    """
    roles = {"system", "user", "assistant", "tool"}
    bad = [m.get("role") for m in messages if m.get("role") not in roles]
    if bad:
        raise ConfigError(f"unknown message role {bad[0]!r}; use one of {sorted(roles)}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ConfigError("a demonstration needs at least one assistant message to learn from")
    history = list(messages[: turns[0]])
    ledger = LedgerBuilder(renderer.prompt_ids(history), history)
    for n, k in enumerate(turns):
        text = _assistant_text(renderer, history, messages[k])
        ids = renderer.encode(text)
        ledger.add_sampled(ids, None)
        sampled = renderer.decode(ids)
        message = renderer.assistant_message(sampled)  # content text, as the env receives it in a rollout
        if n + 1 == len(turns):
            ledger.add_messages([message])
            break
        answer = list(messages[k + 1 : turns[n + 1]])
        if answer:
            ledger.add_observation(renderer.observation_ids(history, sampled, answer))
        else:  # two assistant turns in a row: only the glue and the next generation prompt
            before = renderer.render(history, add_generation_prompt=True) + sampled
            after = renderer.render([*history, message], add_generation_prompt=True)
            ledger.add_observation(renderer.encode(after[len(before) :]))
        ledger.add_messages([message, *answer])
        history += [message, *answer]
    return ledger.finish(StopReason.TERMINATED, meta={"source": "demonstration"})


def _assistant_text(renderer: ChatRenderer, history: Sequence[Message], message: Message) -> str:
    """What the policy must generate for ``message``: its rendering after the generation prompt, up to and
    including the end-of-turn token (structured ``tool_calls`` come out as the template's markup)."""
    eos = renderer.tokenizer.eos_token or ""
    before = renderer.render(history, add_generation_prompt=True)
    after = renderer.render([*history, message], add_generation_prompt=False)
    end = after.find(eos, len(before)) if eos else -1
    if not after.startswith(before) or end < 0:
        raise TemplateError(
            "the chat template does not render an assistant turn as the generation prompt followed by the "
            f"turn's text and {eos!r}; pass template='chatml' or fix the template"
        )
    return after[len(before) : end + len(eos)]


def _probe_conversation() -> tuple[list[Message], list[ToolSchema]]:
    tools: list[ToolSchema] = [
        {
            "type": "function",
            "function": {
                "name": "run_python",
                "description": "Run a Python program and return its output.",
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string"}},
                    "required": ["code"],
                },
            },
        }
    ]
    call = '<tool_call>\n{"name": "run_python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    messages: list[Message] = [
        {"role": "system", "content": "You are a careful programmer."},
        {"role": "user", "content": "What is 6 * 7? Check with the tool."},
        {"role": "assistant", "content": "<think>Multiply, then check.</think>Let me run it.\n" + call},
        {"role": "tool", "content": "42\n", "tool_call_id": "call_0", "name": "run_python"},
        {"role": "assistant", "content": call + "\n" + call},
        {"role": "tool", "content": "42\n", "tool_call_id": "call_1", "name": "run_python"},
        {"role": "tool", "content": "42\n", "tool_call_id": "call_2", "name": "run_python"},
        {"role": "assistant", "content": "  The answer is 42.  \n"},
        {"role": "user", "content": "Thanks! And 7 * 8?"},
        {"role": "assistant", "content": "56"},
    ]
    return messages, tools


def check_template(tokenizer: Any, template: str | None = None) -> None:
    """Prove the chat template fits the ledger on a probe conversation with tools and two tool turns.

    Checks, for every assistant turn: its prompt and verbatim text are a string prefix of the rendering
    with the env's answer appended, and the ledger's tokens (prompt + sampled + observation pieces) equal
    the tokenization of the whole rendering, so a deployed model sees the sequence training saw.

    Raises:
        TemplateError: with a readable diff of the first violation.
    """
    messages, tools = _probe_conversation()
    renderer = ChatRenderer(tokenizer, tools, template)
    eos = tokenizer.eos_token or ""
    turn_starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ledger = renderer.prompt_ids(messages[: turn_starts[0]])
    for n, k in enumerate(turn_starts):
        sampled = renderer.encode(messages[k]["content"] + eos)
        ledger += sampled
        stop = turn_starts[n + 1] if n + 1 < len(turn_starts) else len(messages)
        ledger += renderer.observation_ids(messages[:k], renderer.decode(sampled), messages[k + 1 : stop])
    whole = renderer.encode(renderer.render(messages, add_generation_prompt=False))
    if ledger != whole:
        at = _first_difference(ledger, whole)
        raise TemplateError(
            "the ledger's tokens differ from the tokenized whole conversation at token "
            f"{at}: ledger {renderer.decode(ledger[at : at + 8])!r} vs template "
            f"{renderer.decode(whole[at : at + 8])!r}. The tokenizer merges across message boundaries; "
            "pass template='chatml' or use a tokenizer whose special tokens delimit turns."
        )
