"""Turning messages into ledger tokens with a model's chat template, and proving the template fits.

The ledger appends: prompt ids, then per turn the policy's sampled ids, then the tokens the template
puts between that turn and the next generation (the assistant turn's closing glue, the env's messages,
the next generation prompt). That is only the model's real prompt format if the template is
*prefix-stable*: rendering the conversation so far is a string prefix of rendering it with one more turn,
and the assistant's text appears verbatim. :func:`check_template` proves it on a probe conversation at
start-up; templates that rewrite history (e.g. drop earlier reasoning) fail fast with a diff. Such models
can still be trained three ways, chosen by ``history``:

- ``"keep_reasoning"``: the native template, given each earlier assistant turn as its sampled text with an
  explicit empty ``reasoning_content``, which templates that honour that field (Qwen3 and its kin) render
  verbatim, reasoning included: one ledger per episode, the model's own template, earlier reasoning kept;
- ``"turn_split"``: a *turn-split ledger*: each turn's prompt rendered by the native template from the
  whole conversation, exactly as the model saw it at that turn, each turn its own sequence of the one
  trajectory (:attr:`~agentrl.data.trajectory.Trajectory.sequence_starts`); no template property needed;
- or the fixed template :data:`CHATML_TEMPLATE` (``template="chatml"``).

Tool calls are written in the tokenizer's own markup (:mod:`agentrl.tool_formats`), which the probe uses.
:func:`demonstration_ledger` builds that ledger for a whole written conversation (SFT, the preference
learners and the reward models read conversations through it).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.errors import ConfigError, TemplateError
from agentrl.tool_formats import ToolFormat, detect_tool_format, tool_format
from agentrl.types import Message, StopReason, ToolCall, ToolSchema

__all__ = ["HISTORY_MODES", "ChatRenderer", "check_template", "demonstration_ledger"]

HISTORY_MODES = ("append", "keep_reasoning", "turn_split")
"""How earlier turns reach the next prompt; see the module docstring."""
_WAYS_OUT = (
    "set history='turn_split' (each turn its own sample under the native template), "
    "history='keep_reasoning' (for templates that honour reasoning_content, e.g. Qwen3), "
    "or template='chatml' (a fixed training template)"
)


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
        tool_format: the tool-call markup (a name or :class:`~agentrl.tool_formats.ToolFormat`); None:
            detected from the tokenizer (:func:`~agentrl.tool_formats.detect_tool_format`).
        history: one of :data:`HISTORY_MODES`: how earlier assistant turns are handed to the template.

    Raises:
        TemplateError: no chat template.
        ConfigError: unknown ``history`` or tool format.
    """

    def __init__(
        self, tokenizer: Any, tools: Sequence[ToolSchema] | None = None, template: str | None = None, *,
        tool_format: str | ToolFormat | None = None, history: str = "append",
    ):  # fmt: skip
        if history not in HISTORY_MODES:
            raise ConfigError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")
        self.tokenizer, self.history = tokenizer, history
        self.tools = list(tools) if tools else None
        if template is not None and "{" not in template:
            template = _fixed_template(template)
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "pass template='chatml' to use the bundled one"
            )
        self.format = _resolve_format(tokenizer, self.template, tool_format)

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
        """The assistant message for a sampled turn, shaped for the template's history: its text without the
        trailing stop token (with ``reasoning_content=""`` under ``keep_reasoning``), or the tool format's
        structured message (harmony's channels)."""
        content = self.action_text(sampled_text)
        if self.format.structured_history:
            return self.format.message(content, tools=self.tools)
        if self.history == "keep_reasoning":
            return {"role": "assistant", "content": content, "reasoning_content": ""}  # type: ignore[typeddict-unknown-key]
        return {"role": "assistant", "content": content}

    def action_text(self, sampled_text: str) -> str:
        """What the env receives for a sampled turn: its text without the trailing stop token."""
        eos = self.tokenizer.eos_token or ""
        return sampled_text[: -len(eos)] if eos and sampled_text.endswith(eos) else sampled_text

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
                f"the chat template is not prefix-stable, so the ledger cannot append turns; {_WAYS_OUT}.\n"
                + _diff(before, after)
            )
        return self.encode(after[len(before) :])


def demonstration_ledger(renderer: ChatRenderer, messages: Sequence[Message]) -> Trajectory:
    """Tokenize a conversation into the ledger the rollout runner would have recorded for it.

    Assistant turns (their text, tool-call markup and end-of-turn token) get mask 1, except those with
    ``weight`` 0 (context only); everything else 0.
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
        if _weight(messages[k]):
            ledger.add_sampled(ids, None)
        else:  # context the model reads, not a target: mask 0
            ledger.add_observation(ids)
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


def _weight(message: Message) -> int:
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise ConfigError(f"an assistant message's weight must be 0 (context only) or 1 (trained on), got {weight!r}")
    return int(weight)


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


def _resolve_format(tokenizer: Any, template: str | None, chosen: str | ToolFormat | None) -> ToolFormat:
    if chosen is not None:
        return tool_format(chosen)
    return detect_tool_format(tokenizer, template).format


def _probe_conversation(fmt: ToolFormat | None = None) -> tuple[list[Message], list[ToolSchema]]:
    """A conversation with reasoning, tool calls in ``fmt``'s markup (Hermes by default), two tool results in
    one turn, untrimmed text and a second user turn; it ends on a user turn, as an episode's prompts do."""
    fmt = fmt or tool_format("hermes")
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
    ids = [fmt.call_id(i) for i in range(3)]
    calls = [ToolCall("run_python", {"code": "print(6 * 7)"}, i) for i in ids]
    result = [{"role": "tool", "content": "42\n", "tool_call_id": i, "name": "run_python"} for i in ids]
    messages: list[Message] = [
        {"role": "system", "content": "You are a careful programmer."},
        {"role": "user", "content": "What is 6 * 7? Check with the tool."},
        {"role": "assistant", "content": fmt.turn_text("Let me run it.\n", calls[:1], "Multiply, then check.")},
        result[0],  # type: ignore[list-item]
        {"role": "assistant", "content": fmt.turn_text("", calls[1:])},
        *result[1:],  # type: ignore[list-item]
        {"role": "assistant", "content": fmt.turn_text("  The answer is 42.  \n", [])},
        {"role": "user", "content": "Thanks! And 7 * 8?"},
        {"role": "assistant", "content": fmt.turn_text("56", [])},
        {"role": "user", "content": "Thanks."},
    ]
    return messages, tools


def check_template(
    tokenizer: Any, template: str | None = None, *, tool_format: str | ToolFormat | None = None,
    history: str = "append",
) -> None:  # fmt: skip
    """Prove the chat template fits the ledger on a probe conversation with tools and two tool turns.

    Checks, for every assistant turn: its prompt and verbatim text are a string prefix of the rendering
    with the env's answer appended, and the ledger's tokens (prompt + sampled + observation pieces) equal
    the tokenization of the whole rendering, so a deployed model sees the sequence training saw. The tool
    calls are written in the tokenizer's tool format. Under ``history="turn_split"`` every turn's prompt is
    rendered afresh, so only that each prompt renders is checked.

    Raises:
        TemplateError: with a readable diff of the first violation and the ways out.
    """
    renderer = ChatRenderer(tokenizer, None, template, tool_format=tool_format, history=history)
    messages, tools = _probe_conversation(renderer.format)
    renderer.tools = tools
    eos = tokenizer.eos_token or ""
    turn_starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    history_so_far = list(messages[: turn_starts[0]])
    ledger = renderer.prompt_ids(history_so_far)
    for n, k in enumerate(turn_starts):
        sampled = renderer.encode(messages[k]["content"] + eos)
        stop = turn_starts[n + 1] if n + 1 < len(turn_starts) else len(messages)
        answer = messages[k + 1 : stop]
        if history == "turn_split":
            history_so_far += [renderer.assistant_message(renderer.decode(sampled)), *answer]
            renderer.prompt_ids(history_so_far)
            continue
        ledger += sampled
        ledger += renderer.observation_ids(history_so_far, renderer.decode(sampled), answer)
        history_so_far += [renderer.assistant_message(renderer.decode(sampled)), *answer]
    if history == "turn_split":
        return
    whole = renderer.encode(renderer.render(history_so_far, add_generation_prompt=True))
    if ledger != whole:
        at = _first_difference(ledger, whole)
        raise TemplateError(
            "the ledger's tokens differ from the tokenized whole conversation at token "
            f"{at}: ledger {renderer.decode(ledger[at : at + 8])!r} vs template "
            f"{renderer.decode(whole[at : at + 8])!r}. The tokenizer merges across message boundaries; "
            f"{_WAYS_OUT}, or use a tokenizer whose special tokens delimit turns."
        )
