"""Tool-call markup per model family: parse a sampled turn, render calls, detect a tokenizer's format.

Each family writes tool calls its own way. A :class:`ToolFormat` reads one family's markup into a
:class:`~agentrl.tools.ParsedTurn` (never raising on bad model output), writes calls back in that markup, and
turns a sampled turn into the assistant message its chat template expects in the history. Formats are
registered by name:

================  ======================================================================================
``hermes``        ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, Qwen3, Hermes)
``llama3_json``   a bare ``{"name": ..., "parameters": {...}}`` object, optionally after ``<|python_tag|>``
``mistral``       ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "<9 chars>"}, ...]``
``qwen3_coder``   ``<tool_call><function=NAME><parameter=KEY>value</parameter></function></tool_call>``
``harmony``       gpt-oss: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``
================  ======================================================================================

:func:`detect_tool_format` picks the format for a tokenizer: from its ``response_template`` (transformers'
declarative response parser, used as is) when it ships one, else from the markup its chat template writes.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl._safe_text import valid_json, valid_text
from agentrl.errors import ConfigError, ToolCallError
from agentrl.tools import MAX_BLOCKS_PER_TURN, ParsedTurn, format_tool_calls, parse_tool_calls
from agentrl.types import Message, ToolCall, ToolSchema

__all__ = [
    "Detection",
    "ToolFormat",
    "detect_tool_format",
    "register_tool_format",
    "tool_format",
    "tool_format_names",
]

_DECODER = json.JSONDecoder()


class ToolFormat:
    """One family's tool-call markup. Subclasses set ``name`` and override :meth:`parse` and :meth:`render`.

    Attributes:
        name: the registry name.
        structured_history: True when the family's chat template must get earlier assistant turns as
            structured messages (``content``, ``thinking``, ``tool_calls``) instead of the sampled text.
    """

    name = "base"
    structured_history = False

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        """Split an assistant turn into text, well-formed calls and one error per malformed call.

        Args:
            text: the sampled text (without the end-of-turn token).
            tools: the tool schemas; formats whose arguments are untyped text use them to type the values.
            max_blocks: the most calls read; past it one more error says the rest was not read.
        """
        raise NotImplementedError

    def render(self, calls: Sequence[ToolCall]) -> str:
        """The calls in this family's markup, as the model writes them; :meth:`parse` reads them back."""
        raise NotImplementedError

    def call_id(self, index: int) -> str:
        """The id given to the ``index``-th call of a turn when the markup carries none."""
        return f"call_{index}"

    def turn_text(self, text: str, calls: Sequence[ToolCall], thinking: str = "") -> str:
        """A whole turn as a model of this family writes it: reasoning (``<think>`` tags), text, then calls."""
        return (f"<think>{thinking}</think>" if thinking else "") + text + self.render(calls)

    def message(self, text: str, *, tools: Sequence[ToolSchema] | None = None) -> Message:
        """The assistant message for a sampled turn, as this family's chat template takes it in the history."""
        if not self.structured_history:
            return {"role": "assistant", "content": text}
        parsed = self.parse(text, tools=tools, max_blocks=None)
        message: Message = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [_openai_call(c) for c in parsed.calls]
        return message


def _openai_call(call: ToolCall) -> dict[str, Any]:
    # Templates index arguments as a mapping (``|items``, ``|tojson``), so they stay a dict here.
    return {"id": call.id or "", "type": "function", "function": {"name": call.name, "arguments": dict(call.arguments)}}


def _too_many(max_blocks: int) -> ToolCallError:
    return ToolCallError(
        f"more than {max_blocks} tool calls in one turn: the rest of the turn was not read; "
        f"make at most {max_blocks} calls per turn"
    )


def _arguments(value: Any, label: str) -> dict[str, Any] | ToolCallError:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return ToolCallError(f'{label}: "arguments" is a string but not a JSON object')
    if not isinstance(value, dict):
        return ToolCallError(f"{label}: the arguments must be a JSON object, got {type(value).__name__}")
    return valid_json(value)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- formats


class Hermes(ToolFormat):
    """``<tool_call>`` blocks holding a JSON object; see :func:`agentrl.tools.parse_tool_calls`."""

    name = "hermes"

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        return parse_tool_calls(text, max_blocks=max_blocks)

    def render(self, calls: Sequence[ToolCall]) -> str:
        return format_tool_calls(calls)


class Llama3Json(ToolFormat):
    """A turn that is a JSON object ``{"name", "parameters"}`` (``arguments`` is accepted too), optionally
    opened by ``<|python_tag|>``; several calls are separated by ``;``. Any other turn is plain text."""

    name = "llama3_json"
    _FORMAT = 'answer with only {"name": <tool name>, "parameters": {<arguments>}}'

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        body = text.strip()
        body = body[len("<|python_tag|>") :].lstrip() if body.startswith("<|python_tag|>") else body
        if not body.startswith("{"):
            return ParsedTurn(valid_text(text.strip()))
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        pos = 0
        while pos < len(body):
            if max_blocks is not None and len(calls) + len(errors) >= max_blocks:
                errors.append(_too_many(max_blocks))
                break
            label = f"tool call {len(calls) + len(errors) + 1}"
            try:
                value, pos = _DECODER.raw_decode(body, pos)
            except ValueError as exc:
                errors.append(ToolCallError(f"{label}: invalid JSON ({exc}); {self._FORMAT}"))
                break
            result = self._call(value, label, len(calls))
            (errors if isinstance(result, ToolCallError) else calls).append(result)  # type: ignore[arg-type]
            rest = body[pos:].lstrip()
            if not rest:
                break
            if not rest.startswith(";"):
                errors.append(ToolCallError(f"text after the call: {rest[:40]!r}; {self._FORMAT}"))
                break
            pos = len(body) - len(rest[1:].lstrip())
        return ParsedTurn("", tuple(calls), tuple(errors))

    def _call(self, value: Any, label: str, index: int) -> ToolCall | ToolCallError:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
            return ToolCallError(f'{label}: expected an object with a string "name"; {self._FORMAT}')
        raw = value.get("parameters", value.get("arguments", {}))
        arguments = _arguments(raw, f"{label} ({value['name']})")
        return arguments if isinstance(arguments, ToolCallError) else ToolCall(value["name"], arguments, self.call_id(index))

    def turn_text(self, text: str, calls: Sequence[ToolCall], thinking: str = "") -> str:
        return self.render(calls) if calls else super().turn_text(text, calls, thinking)

    def render(self, calls: Sequence[ToolCall]) -> str:
        return "; ".join(
            json.dumps({"name": c.name, "parameters": dict(c.arguments)}, ensure_ascii=False) for c in calls
        )


class Mistral(ToolFormat):
    """``[TOOL_CALLS]`` followed by a JSON list of ``{"name", "arguments", "id"}``; text before it is content.
    Ids are 9 letters and digits (Mistral's templates refuse others). The history gets structured messages."""

    name = "mistral"
    structured_history = True  # its template counts a raw tool-call turn as a reply and refuses the history
    _TAG = "[TOOL_CALLS]"
    _FORMAT = 'write [TOOL_CALLS][{"name": <tool name>, "arguments": {<arguments>}}]'

    def call_id(self, index: int) -> str:
        return f"call{index:05d}"

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        at = text.find(self._TAG)
        if at < 0:
            return ParsedTurn(valid_text(text.strip()))
        content = text[:at].strip()
        body = text[at + len(self._TAG) :].strip()
        try:
            value, end = _DECODER.raw_decode(body)
        except ValueError as exc:
            return ParsedTurn(valid_text(content), (), (ToolCallError(f"invalid JSON after {self._TAG}: {exc}; {self._FORMAT}"),))
        entries = value if isinstance(value, list) else [value]
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        for index, entry in enumerate(entries):
            if max_blocks is not None and index >= max_blocks:
                errors.append(_too_many(max_blocks))
                break
            result = self._call(entry, f"tool call {index + 1}", len(calls))
            (errors if isinstance(result, ToolCallError) else calls).append(result)  # type: ignore[arg-type]
        if body[end:].strip():
            errors.append(ToolCallError(f"text after the tool calls: {body[end:].strip()[:40]!r}; {self._FORMAT}"))
        return ParsedTurn(valid_text(content), tuple(calls), tuple(errors))

    def _call(self, entry: Any, label: str, index: int) -> ToolCall | ToolCallError:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            return ToolCallError(f'{label}: expected an object with a string "name"; {self._FORMAT}')
        arguments = _arguments(entry.get("arguments", {}), f"{label} ({entry['name']})")
        if isinstance(arguments, ToolCallError):
            return arguments
        given = entry.get("id")
        call_id = given if isinstance(given, str) and re.fullmatch(r"[A-Za-z0-9]{9}", given) else self.call_id(index)
        return ToolCall(entry["name"], arguments, call_id)

    def render(self, calls: Sequence[ToolCall]) -> str:
        entries = []
        for index, call in enumerate(calls):
            body = json.dumps({"name": call.name, "arguments": dict(call.arguments)}, ensure_ascii=False)
            entries.append(f'{body[:-1]}, "id": "{call.id or self.call_id(index)}"}}')
        return f"{self._TAG}[{', '.join(entries)}]"


class Qwen3Coder(ToolFormat):
    """XML calls: ``<function=NAME>`` holding one ``<parameter=KEY>`` block per argument, values as text.

    A value is typed by the tool's schema when ``tools`` are given (a ``string`` parameter keeps its text);
    otherwise, and for other types, it is read as JSON, then as a Python literal, else kept as text.
    """

    name = "qwen3_coder"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
    _FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*\Z", re.DOTALL)
    _PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
    _FORMAT = "write <tool_call>\n<function=NAME>\n<parameter=KEY>\nvalue\n</parameter>\n</function>\n</tool_call>"

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        types = _parameter_types(tools)
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        blocks = list(self._BLOCK.finditer(text))
        for n, block in enumerate(blocks):
            if max_blocks is not None and n >= max_blocks:
                errors.append(_too_many(max_blocks))
                break
            label = f"tool call {n + 1}"
            if not block.group(0).endswith("</tool_call>"):
                errors.append(ToolCallError(f"{label}: <tool_call> is never closed (output cut off?); {self._FORMAT}"))
                continue
            function = self._FUNCTION.match(block.group(1))
            if function is None:
                errors.append(ToolCallError(f"{label}: expected one <function=NAME>...</function>; {self._FORMAT}"))
                continue
            name = function.group(1).strip()
            arguments = {
                key.strip(): _typed(value, types.get(name, {}).get(key.strip()))
                for key, value in self._PARAMETER.findall(function.group(2))
            }
            calls.append(ToolCall(name, valid_json(arguments), self.call_id(len(calls))))
        content = self._BLOCK.sub("", text)
        return ParsedTurn(valid_text(content.strip()), tuple(calls), tuple(errors))

    def render(self, calls: Sequence[ToolCall]) -> str:
        blocks = []
        for call in calls:
            params = "".join(
                f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n"
                "</parameter>\n"
                for key, value in call.arguments.items()
            )
            blocks.append(f"<tool_call>\n<function={call.name}>\n{params}</function>\n</tool_call>")
        return "\n".join(blocks)


def _parameter_types(tools: Sequence[ToolSchema] | None) -> dict[str, dict[str, Any]]:
    types: dict[str, dict[str, Any]] = {}
    for schema in tools or ():
        spec = schema.get("function", schema)
        properties = (spec.get("parameters") or {}).get("properties") or {}
        types[spec.get("name", "")] = {key: (prop or {}).get("type") for key, prop in properties.items()}
    return types


def _typed(raw: str, declared: Any) -> Any:
    if declared == "string" or (isinstance(declared, list) and declared == ["string"]):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:  # a template that writes values with Jinja's |string gives Python literals (True, {'a': 1})
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


class Harmony(ToolFormat):
    """gpt-oss's harmony messages: ``analysis`` (reasoning), ``commentary`` addressed ``to=functions.NAME``
    (a call, arguments as JSON) and ``final`` (the answer). Content is the final channel's text; the
    history gets structured messages, since the template refuses channel markup in ``content``."""

    name = "harmony"
    structured_history = True
    _MESSAGE = re.compile(
        r"(?:<\|start\|>assistant)?(?P<header>[^<]*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?)<\|message\|>"
        r"(?P<body>.*?)(?P<end><\|end\|>|<\|call\|>|<\|return\|>|\Z)",
        re.DOTALL,
    )
    _RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        return self._read(text, max_blocks)[0]

    def _read(self, text: str, max_blocks: int | None) -> tuple[ParsedTurn, str]:
        """The turn and its reasoning (the ``analysis`` channel)."""
        calls: list[ToolCall] = []
        errors: list[ToolCallError] = []
        final: list[str] = []
        thinking: list[str] = []
        for message in self._MESSAGE.finditer(text):
            header, body = message.group("header"), message.group("body")
            recipient = self._RECIPIENT.search(header)
            if recipient is None:
                (thinking if "analysis" in header else final).append(body)
                continue
            if max_blocks is not None and len(calls) + len(errors) >= max_blocks:
                errors.append(_too_many(max_blocks))
                break
            label = f"tool call {len(calls) + len(errors) + 1} ({recipient.group(1)})"
            try:
                arguments = _arguments(json.loads(body) if body.strip() else {}, label)
            except ValueError as exc:
                arguments = ToolCallError(f"{label}: the arguments are not JSON: {exc}")
            if isinstance(arguments, ToolCallError):
                errors.append(arguments)
            else:
                calls.append(ToolCall(recipient.group(1), arguments, self.call_id(len(calls))))
        if "<|message|>" not in text:  # no channel markup at all: plain text is the answer
            final.append(text)
        turn = ParsedTurn(valid_text("".join(final).strip()), tuple(calls), tuple(errors))
        return turn, valid_text("".join(thinking).strip())

    def render(self, calls: Sequence[ToolCall]) -> str:
        """Calls after the generation prompt ``<|start|>assistant``, each one a message of its own."""
        return "<|start|>assistant".join(
            f" to=functions.{c.name}<|channel|>commentary json<|message|>"
            f"{json.dumps(dict(c.arguments), ensure_ascii=False)}<|call|>"
            for c in calls
        )

    def turn_text(self, text: str, calls: Sequence[ToolCall], thinking: str = "") -> str:
        """Reasoning in the analysis channel (text before calls joins it), then the calls or the final text."""
        thinking = (thinking + (" " + text.strip() if calls and text.strip() else "")).strip()
        parts = [f"<|channel|>analysis<|message|>{thinking}<|end|>"] if thinking else []
        parts.append(self.render(calls) if calls else f"<|channel|>final<|message|>{text}")
        return "<|start|>assistant".join(parts)

    def message(self, text: str, *, tools: Sequence[ToolSchema] | None = None) -> Message:
        parsed, thinking = self._read(text, None)
        message: Message = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [_openai_call(c) for c in parsed.calls]
        if thinking and not (parsed.calls and parsed.content):  # the template refuses both beside calls
            message["thinking"] = thinking  # type: ignore[typeddict-unknown-key]
        return message


# ---------------------------------------------------------------------------------------------- registry

_FORMATS: dict[str, Callable[[], ToolFormat]] = {
    f.name: f for f in (Hermes, Llama3Json, Mistral, Qwen3Coder, Harmony)
}


def register_tool_format(name: str, factory: Callable[[], ToolFormat]) -> None:
    """Add a format under ``name`` (a class or any zero-argument factory of a :class:`ToolFormat`).

    Raises:
        ConfigError: the name is taken.
    """
    if name in _FORMATS:
        raise ConfigError(f"a tool format named {name!r} is already registered")
    _FORMATS[name] = factory


def tool_format_names() -> list[str]:
    """The registered format names, sorted."""
    return sorted(_FORMATS)


def tool_format(name: str | ToolFormat) -> ToolFormat:
    """The format registered as ``name`` (a :class:`ToolFormat` is returned as is).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    if isinstance(name, ToolFormat):
        return name
    if name not in _FORMATS:
        raise ConfigError(f"unknown tool format {name!r}; known: {', '.join(tool_format_names())}")
    return _FORMATS[name]()


@dataclass(frozen=True)
class Detection:
    """Which tool format a tokenizer speaks and how that was found.

    Attributes:
        format: the :class:`ToolFormat`.
        source: ``"response_template"`` (the tokenizer's own parser), ``"chat_template"`` (its markup was
            recognized) or ``"default"`` (nothing recognized: Hermes).
    """

    format: ToolFormat
    source: str


# Markup each family's chat template writes, most specific first.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("harmony", ("<|channel|>", "<|call|>")),
    ("mistral", ("[TOOL_CALLS]",)),
    ("qwen3_coder", ("<function=", "<parameter=")),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", ('"parameters": ', "ipython")),
)


def detect_tool_format(tokenizer: Any, template: str | None = None) -> Detection:
    """The tool format of ``tokenizer``: its ``response_template`` if it has one, else the markup of its chat
    template (or of ``template``, when a training template replaces it), else Hermes."""
    text = template if template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(text, Mapping):  # several named templates: the default one renders chats
        text = text.get("default") or next(iter(text.values()), "")
    markup = next(
        (Detection(tool_format(name), "chat_template") for name, needles in _SIGNATURES
         if isinstance(text, str) and all(n in text for n in needles)),
        Detection(tool_format("hermes"), "default"),
    )  # fmt: skip
    schema = getattr(tokenizer, "response_template", None)
    if template is None and isinstance(schema, Mapping):
        return Detection(ResponseTemplateFormat(schema, markup.format), "response_template")
    return markup


class ResponseTemplateFormat(ToolFormat):
    """A tokenizer's own declarative ``response_template`` (transformers' response parser) read as a format.

    Parsing is transformers' :func:`parse_response`; writing (rendering, ids, history messages) is the
    ``writer`` format's, the one the chat template's markup showed (a response template says how to read
    output, not how to write it).
    """

    name = "response_template"

    def __init__(self, schema: Mapping[str, Any], writer: ToolFormat | None = None):
        self.schema = dict(schema)
        self.writer = writer or Hermes()
        self.structured_history = self.writer.structured_history

    def call_id(self, index: int) -> str:
        return self.writer.call_id(index)

    def turn_text(self, text: str, calls: Sequence[ToolCall], thinking: str = "") -> str:
        return self.writer.turn_text(text, calls, thinking)

    def parse(
        self, text: str, *, tools: Sequence[ToolSchema] | None = None, max_blocks: int | None = MAX_BLOCKS_PER_TURN
    ) -> ParsedTurn:
        from transformers.utils.chat_parsing import parse_response

        from agentrl.tools import parse_openai_tool_calls

        try:
            message = parse_response(text, self.schema, prefix="", tools=list(tools) if tools else None)
        except Exception as exc:  # transformers raises several types on output that breaks the schema
            return ParsedTurn(valid_text(text.strip()), (), (ToolCallError(f"cannot parse the turn: {exc}"),))
        entries = [
            {**e, "function": {**e["function"], "arguments": json.dumps(e["function"].get("arguments", {}))}}
            if isinstance(e, dict) and isinstance(e.get("function"), dict) and not isinstance(
                e["function"].get("arguments"), str) else e
            for e in message.get("tool_calls") or []
        ]
        return parse_openai_tool_calls(entries, message.get("content"), max_blocks=max_blocks)

    def render(self, calls: Sequence[ToolCall]) -> str:
        return self.writer.render(calls)

    def message(self, text: str, *, tools: Sequence[ToolSchema] | None = None) -> Message:
        return self.writer.message(text, tools=tools)
