"""Tools: schemas from typed functions, parsing model output, validation and execution.

:func:`parse_tool_calls` and :func:`parse_openai_tool_calls` never raise on bad model output; :func:`call_tool`
turns every failure into text for the model. pydantic and jsonschema are imported inside the functions using them.

This module is the boundary where model text becomes Python values and tool messages: every string it hands
out (parsed calls, content, errors, tool results) is valid Unicode, so it can be tokenized and written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrl._safe_text import valid_json, valid_text
from agentrl._schema_text import describe_error, path_text, preview
from agentrl._tool_schema import Binder, parse_docstring, signature_schema, strip_titles
from agentrl.errors import ConfigError, ToolCallError
from agentrl.types import Message, ToolCall, ToolSchema

__all__ = [
    "MAX_BLOCKS_PER_TURN",
    "ParsedTurn",
    "Tool",
    "as_tool",
    "call_tool",
    "format_tool_calls",
    "parse_openai_tool_calls",
    "parse_tool_calls",
    "tool",
    "tool_error_message",
    "validate_call",
]

ToolsLike = Mapping[str, Any] | Iterable[Any]


@dataclass(frozen=True)
class Tool:
    """A tool the model can call: an OpenAI function schema and, optionally, its implementation.

    Attributes:
        name: The name the model calls the tool by.
        description: What the tool does, written for the model.
        parameters: JSON schema of the arguments (an object schema).
        fn: The implementation, sync or async; None for a schema-only tool.
        bind: Maps schema-valid JSON arguments to ``fn``'s ``(args, kwargs)``, building enums and pydantic
            models; None calls ``fn(**arguments)``.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] | None = None
    bind: Binder | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"tool name must be a non-empty string without whitespace, got {self.name!r}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ConfigError(f'tool {self.name!r}: parameters must be a JSON schema with "type": "object"')

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """Build a tool from a typed function (sync or async) with a Google-style docstring.

        The docstring's first paragraph is the description and its ``Args:`` entries describe the parameters.
        Parameters without defaults are required, unknown arguments rejected; constraints go in the type hint
        (``Annotated[int, Field(ge=0)]``). ``name`` defaults to ``fn.__name__``.

        Raises:
            ConfigError: No name, a parameter without a type hint or JSON schema, or ``*args``/``**kwargs``.
        """
        tool_name = name or getattr(fn, "__name__", None)
        if not tool_name or tool_name == "<lambda>":
            raise ConfigError(f"{fn!r} has no usable __name__; pass name= to Tool.from_function")
        summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
        parameters, bind = signature_schema(fn, tool_name, arg_docs)
        return cls(tool_name, summary, parameters, fn, bind)

    @classmethod
    def from_model(
        cls, model_cls: type[Any], fn: Callable[..., Any] | None = None, name: str | None = None
    ) -> Tool:
        """Build a tool whose arguments are the fields of a pydantic model.

        Args:
            model_cls: A ``pydantic.BaseModel`` subclass; its docstring's first paragraph is the description.
            fn: Called with the validated model instance; None for a schema-only tool.
            name: Defaults to the class name.

        Raises:
            ConfigError: The model has no JSON schema.
        """
        try:
            schema = strip_titles(model_cls.model_json_schema())
        except Exception as exc:  # pydantic raises several error types for fields it cannot describe
            raise ConfigError(f"cannot build a JSON schema for {model_cls!r}: {exc}") from exc
        schema.pop("description", None)
        summary, _ = parse_docstring(model_cls.__dict__.get("__doc__") or "")
        if model_cls.model_config.get("extra") != "allow":
            # Arguments pydantic would drop silently are named to the model instead.
            schema.setdefault("additionalProperties", False)

        def bind(arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (model_cls.model_validate(arguments),), {}

        return cls(name or model_cls.__name__, summary, schema, fn, bind)

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], fn: Callable[..., Any] | None = None) -> Tool:
        """Build a tool from ``{"type": "function", "function": {"name", "description", "parameters"}}`` or
        its inner dict; ``fn`` (None for a schema-only tool) is called as ``fn(**arguments)``.

        Raises:
            ConfigError: The name is missing or ``parameters`` is not a valid JSON schema.
        """
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        spec = schema.get("function", {}) if schema.get("type") == "function" else schema
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f'a tool schema needs a string "name", got {dict(schema)!r}')
        parameters = json.loads(json.dumps(spec.get("parameters") or {"type": "object", "properties": {}}))
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as exc:
            raise ConfigError(f"tool {spec['name']!r}: invalid parameters schema: {exc.message}") from exc
        return cls(spec["name"], spec.get("description") or "", parameters, fn)

    def schema(self) -> ToolSchema:
        """The OpenAI function-tool schema (a fresh copy, safe to mutate)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": json.loads(json.dumps(function))}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the implementation directly, without validation; TypeError for a schema-only tool."""
        if self.fn is None:
            raise TypeError(f"tool {self.name!r} is schema-only and has no function to call")
        return self.fn(*args, **kwargs)

    @functools.cached_property
    def _validator(self) -> Any:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.parameters)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Decorator, ``@tool`` or ``@tool(name=...)``: :meth:`Tool.from_function`, returning a callable Tool."""
    if fn is None:
        return functools.partial(Tool.from_function, name=name)
    return Tool.from_function(fn, name)


def as_tool(obj: Any) -> Tool:
    """Coerce a Tool, a typed function, a pydantic model class or an OpenAI schema dict into a :class:`Tool`.

    Raises:
        ConfigError: ``obj`` is none of these, or cannot be described.
    """
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, Mapping):
        return Tool.from_schema(obj)
    pydantic = sys.modules.get("pydantic")  # a class can only be a BaseModel if pydantic is already imported
    if pydantic is not None and isinstance(obj, type) and issubclass(obj, pydantic.BaseModel):
        return Tool.from_model(obj)
    if callable(obj):
        return Tool.from_function(obj)
    raise ConfigError(f"cannot make a tool from {obj!r}; pass a Tool, function, pydantic model or schema")


def _tool_map(tools: ToolsLike) -> dict[str, Tool]:
    if isinstance(tools, Tool):
        return {tools.name: tools}
    if isinstance(tools, Mapping):
        return {str(name): as_tool(obj) for name, obj in tools.items()}
    registry: dict[str, Tool] = {}
    for obj in tools:
        item = as_tool(obj)
        if item.name in registry:
            raise ConfigError(f"two tools are named {item.name!r}; tool names must be unique")
        registry[item.name] = item
    return registry


# ---------------------------------------------------------------------------------------------- parsing

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_TAG = re.compile(r"</?tool_call>")
_NON_WS = re.compile(r"[^ \t\n\r]|\Z")  # JSON's whitespace only
_DECODER = json.JSONDecoder()
_SURROGATE_SOURCE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")  # an escape that decodes to one, or one
_FORMAT = 'write each call as <tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>'
MAX_BLOCKS_PER_TURN = 32
"""Default of ``parse_tool_calls(max_blocks=)``: bounds one turn's calls and error observations."""


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn split into its text and its tool calls.

    Attributes:
        content: The text outside the tool-call blocks, stripped.
        calls: The well-formed calls in order. Hermes text gets ids ``call_0``, ``call_1``, ...; OpenAI
            ``tool_calls`` keep the server's ids.
        errors: One error per malformed call, in order; ``str(error)`` is written for the model to read.
    """

    content: str
    calls: tuple[ToolCall, ...] = ()
    errors: tuple[ToolCallError, ...] = ()


def parse_tool_calls(
    text: str, *, max_blocks: int | None = MAX_BLOCKS_PER_TURN, tool_format: str = "hermes",
    tools: Sequence[ToolSchema] | None = None,
) -> ParsedTurn:  # fmt: skip
    """Parse Hermes/Qwen-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, or with
    ``tool_format`` another family's markup (:mod:`agentrl.tool_formats`).

    ``arguments`` may be an object, a JSON string holding one, or absent (no arguments). A JSON string may
    hold a literal ``</tool_call>``; a literal ``<tool_call>`` always opens the next block (write ``\\u003c``
    for ``<`` inside a string, as :func:`format_tool_calls` does). Never raises: each malformed block
    (unclosed, invalid JSON, wrong shape) becomes one error and is left out of ``content``; the well-formed
    calls around it are still returned. Time is linear in ``len(text)``.

    Args:
        text: The assistant's text.
        tool_format: A registered format name (``"hermes"``, ``"llama3_json"``, ``"mistral"``,
            ``"qwen3_coder"``, ``"harmony"``, ...); a ConfigError names the known ones.
        tools: The tool schemas, which type the text values of formats that write arguments as text.
        max_blocks: The most blocks read (calls, malformed blocks and stray closing tags together); past it,
            one more error says how many were left unread, and the rest of the text is not read. None: all.

    Returns:
        The turn. Every string in it is valid Unicode: a lone surrogate the model wrote as a JSON escape
        (``"\\ud800"``) is decoded to U+FFFD, so it can be echoed, tokenized and written anywhere.
    """
    if tool_format != "hermes":
        from agentrl import tool_formats

        return tool_formats.tool_format(tool_format).parse(text, tools=tools, max_blocks=max_blocks)
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    pos, block = 0, 0
    while (tag := _TAG.search(text, pos)) is not None:
        if max_blocks is not None and len(calls) + len(errors) >= max_blocks:
            errors.append(_too_many(text, tag.start(), max_blocks))
            return ParsedTurn(valid_text("".join(content).strip()), tuple(calls), tuple(errors))
        content.append(text[pos : tag.start()])
        if tag.group() == _CLOSE:
            errors.append(ToolCallError(f"found {_CLOSE} without an opening {_OPEN}; {_FORMAT}"))
            pos = tag.end()
            continue
        block += 1
        pos, value = _scan_block(text, tag.end(), f"tool call {block}")
        result = value if isinstance(value, ToolCallError) else _call_from_object(value, block, len(calls))
        if isinstance(result, ToolCallError):
            errors.append(result)
        else:
            calls.append(result)
    content.append(text[pos:])
    return ParsedTurn(valid_text("".join(content).strip()), tuple(calls), tuple(errors))


def _too_many(text: str, start: int, max_blocks: int) -> ToolCallError:
    unread = text.count(_OPEN, start)
    return ToolCallError(
        f"more than {max_blocks} tool-call blocks in one turn: the rest of the turn ({unread} more "
        f"{_OPEN} block(s)) was not read; make at most {max_blocks} calls per turn"
    )


def _scan_block(text: str, start: int, label: str) -> tuple[int, Any]:
    """Decode the block opened just before ``start``: where it ends, and its JSON value or a ToolCallError.

    Only the text up to the next opening tag is looked at, so each character is decoded at most once.
    """
    nxt_open = text.find(_OPEN, start)
    window = text[start : len(text) if nxt_open < 0 else nxt_open]
    # Decoding first lets a JSON string contain a literal </tool_call>.
    try:
        value, after = _DECODER.raw_decode(window, _skip_ws(window, 0))
    except (ValueError, RecursionError):
        pass
    else:
        close = _skip_ws(window, after)
        if window.startswith(_CLOSE, close):
            return start + close + len(_CLOSE), _valid(value, window[:after])
    end = window.find(_CLOSE)
    if end < 0:
        if nxt_open < 0:
            return len(text), ToolCallError(f"{label}: {_OPEN} is never closed (output cut off?); add {_CLOSE}")
        return nxt_open, ToolCallError(f"{label}: {_OPEN} is not closed before the next one; {_FORMAT}")
    body = window[:end].strip()
    if not body:
        return start + end + len(_CLOSE), ToolCallError(f"{label}: the block is empty; {_FORMAT}")
    value, problem = _loads(body)
    return start + end + len(_CLOSE), ToolCallError(f"{label}: {problem}") if problem else value


def _valid(value: Any, source: str) -> Any:
    """``value`` decoded from ``source`` with surrogates replaced; the walk is skipped when none can be in it."""
    return valid_json(value) if _SURROGATE_SOURCE.search(source) else value


def _skip_ws(text: str, pos: int) -> int:
    end = _NON_WS.search(text, pos)
    return end.start() if end else len(text)


def _loads(doc: str) -> tuple[Any, str | None]:
    """``json.loads`` that reports failure as text for the model: the reason, where, and an excerpt."""
    try:
        return _valid(json.loads(doc), doc), None
    except json.JSONDecodeError as exc:
        before = doc[max(0, exc.pos - 24) : exc.pos].replace("\n", "\\n")
        after = doc[exc.pos : exc.pos + 24].replace("\n", "\\n")
        hint = "; put each call in its own block" if exc.msg == "Extra data" else ""
        where = f"line {exc.lineno}, column {exc.colno}"
        return None, f"invalid JSON: {exc.msg} at {where} (marked >>>): {before}>>>{after}{hint}"
    except (ValueError, RecursionError) as exc:  # integers past the digit limit, absurd nesting
        return None, f"invalid JSON: {type(exc).__name__}: {exc}"


def _call_from_object(value: Any, block: int, index: int) -> ToolCall | ToolCallError:
    label = f"tool call {block}"
    if not isinstance(value, dict):
        return ToolCallError(f"{label}: expected a JSON object, got {preview(value)}; {_FORMAT}")
    if "name" not in value:
        return ToolCallError(f'{label}: missing "name"; {_FORMAT}')
    name = value["name"]
    if not isinstance(name, str) or not name:
        return ToolCallError(f'{label}: "name" must be a non-empty string, got {preview(name)}')
    unexpected = sorted(set(value) - {"name", "arguments"})
    if unexpected:
        return ToolCallError(f"{label} ({name}): unexpected key(s) {', '.join(map(repr, unexpected))}")
    arguments = _decode_arguments(value.get("arguments", {}), f"{label} ({name})")
    return arguments if isinstance(arguments, ToolCallError) else ToolCall(name, arguments, f"call_{index}")


def _decode_arguments(raw: Any, label: str) -> dict[str, Any] | ToolCallError:
    if isinstance(raw, str):
        if not raw.strip():  # servers send "" for a call without arguments
            return {}
        raw, problem = _loads(raw)
        if problem:
            return ToolCallError(f'{label}: "arguments" is a string but not a JSON object: {problem}')
    if not isinstance(raw, dict):
        return ToolCallError(f'{label}: "arguments" must be a JSON object, got {preview(raw)}')
    return raw


def parse_openai_tool_calls(
    tool_calls: Sequence[Any] | None, content: str | None = None, *, max_blocks: int | None = MAX_BLOCKS_PER_TURN
) -> ParsedTurn:
    """Parse the ``tool_calls`` of an OpenAI-compatible chat completion message.

    Args:
        tool_calls: Entries ``{"id", "type": "function", "function": {"name", "arguments": "<JSON>"}}``
            as dicts; None means no calls.
        content: The message's text, passed through (None becomes "").
        max_blocks: The most entries read; past it, one error says how many were left. None: all.

    Returns:
        The turn; calls keep the server's ids (``call_<index>`` when missing). Never raises: each malformed
        entry becomes one error naming its position and id. Strings are valid Unicode, as for
        :func:`parse_tool_calls`.
    """
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    if tool_calls is not None and not isinstance(tool_calls, (list, tuple)):
        errors.append(ToolCallError(f"tool_calls must be a list, got {type(tool_calls).__name__}"))
        tool_calls = None
    for index, entry in enumerate(tool_calls or ()):
        if max_blocks is not None and index >= max_blocks:
            errors.append(ToolCallError(
                f"more than {max_blocks} tool calls in one turn: the other {len(tool_calls or ()) - index} "
                f"were not read; make at most {max_blocks} calls per turn"
            ))
            break
        result = _openai_entry(valid_json(entry), index)
        if isinstance(result, ToolCallError):
            errors.append(result)
        else:
            calls.append(result)
    return ParsedTurn(valid_text(content or ""), tuple(calls), tuple(errors))


def _openai_entry(entry: Any, index: int) -> ToolCall | ToolCallError:
    label = f"tool call {index + 1}"
    if not isinstance(entry, Mapping):
        return ToolCallError(f"{label}: expected an object, got {type(entry).__name__}")
    call_id = entry.get("id")
    if isinstance(call_id, str) and call_id:
        label = f"{label} (id {call_id!r})"
    else:
        call_id = f"call_{index}"
    if entry.get("type", "function") != "function":
        return ToolCallError(f'{label}: unsupported type {preview(entry.get("type"))}; only "function" is')
    function = entry.get("function")
    if not isinstance(function, Mapping):
        return ToolCallError(f'{label}: "function" must be an object with "name" and "arguments"')
    name = function.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(f'{label}: "function.name" must be a non-empty string, got {preview(name)}')
    arguments = _decode_arguments(function.get("arguments", ""), f"{label} ({name})")
    return arguments if isinstance(arguments, ToolCallError) else ToolCall(name, arguments, call_id)


def format_tool_calls(calls: Iterable[ToolCall]) -> str:
    """Render calls as Hermes ``<tool_call>`` blocks, one per call, joined by newlines.

    :func:`parse_tool_calls` reads the result back to the same names and arguments.
    """
    blocks = []
    for call in calls:
        body = json.dumps({"name": call.name, "arguments": dict(call.arguments)}, ensure_ascii=False)
        # A literal tag inside a string would end the block for regex-based parsers; \u003c decodes the same.
        body = body.replace(_OPEN, "\\u003ctool_call>").replace(_CLOSE, "\\u003c/tool_call>")
        blocks.append(f"{_OPEN}\n{body}\n{_CLOSE}")
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------- validation


def validate_call(call: ToolCall, tools: ToolsLike) -> ToolCall:
    """Check that ``call`` names a known tool and that its arguments satisfy the tool's JSON schema.

    Args:
        call: The parsed call.
        tools: ``{name: Tool}`` or a sequence of tools (anything :func:`as_tool` accepts).

    Returns:
        ``call`` itself.

    Raises:
        ToolCallError: The tool is unknown (the message lists the tools, with a did-you-mean), or the
            arguments break the schema (the message names each bad, missing or unexpected argument).
    """
    registry = _tool_map(tools)
    found = registry.get(call.name)
    if found is None:
        names = sorted(registry)
        if not names:
            raise ToolCallError(f"unknown tool {call.name!r}: no tools are available")
        close = difflib.get_close_matches(call.name, names, n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        raise ToolCallError(
            f"unknown tool {call.name!r}.{guess} Available tools: {', '.join(map(repr, names))}"
        )
    order = {"required": 0, "additionalProperties": 1}  # missing, then unexpected, then argument by argument
    errors = sorted(
        found._validator.iter_errors(dict(call.arguments)),
        key=lambda e: (list(map(str, e.path)), order.get(e.validator, 2)),
    )
    problems = "".join(f"\n- {line}" for error in errors for line in describe_error(error, found.parameters))
    if problems:
        raise ToolCallError(f"invalid arguments for tool {call.name!r}:{problems}")
    return call


# ---------------------------------------------------------------------------------------------- execution


async def call_tool(call: ToolCall, tools: ToolsLike) -> Message:
    """Validate ``call``, run its tool (awaited if async, sync ones directly) and answer with a tool message.

    Returns:
        ``{"role": "tool", "tool_call_id", "name", "content"}``: a string result as is, any other as JSON,
        lone surrogates replaced by U+FFFD. A validation error or any Exception from the tool becomes content
        ``"Error: ..."``; cancellation and KeyboardInterrupt propagate.

    Raises:
        ConfigError: The tool exists but has no implementation, or ``tools`` is malformed.
    """
    registry = _tool_map(tools)
    message: Message = {"role": "tool", "tool_call_id": call.id or "", "name": call.name, "content": ""}
    try:
        target = registry[validate_call(call, registry).name]
    except ToolCallError as exc:
        message["content"] = _error_text(exc)
        return message
    if target.fn is None:
        raise ConfigError(f"tool {target.name!r} is schema-only; give it a function with fn=")
    try:
        args, kwargs = target.bind(dict(call.arguments)) if target.bind else ((), dict(call.arguments))
    except Exception as exc:  # a pydantic validator rejected what the JSON schema allowed
        message["content"] = _error_text(ToolCallError(_binding_problem(call.name, exc)))
        return message
    try:
        result = target.fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        message["content"] = valid_text(_to_text(result))
    except Exception as exc:  # a failing tool is an observation for the model, not a crash of the episode
        message["content"] = _error_text(exc)
    return message


def tool_error_message(error: BaseException, call_id: str | None = None) -> Message:
    """The tool message that reports ``error`` (e.g. one of :attr:`ParsedTurn.errors`) to the model.

    Args:
        error: A ToolCallError gives content ``"Error: <message>"``; any other exception gives
            ``"Error: <ExcType>: <message>"``.
        call_id: The id of the call being answered; omitted from the message when None.
    """
    message: Message = {"role": "tool", "content": _error_text(error)}
    if call_id is not None:
        message["tool_call_id"] = call_id
    return message


def _error_text(error: BaseException) -> str:
    if isinstance(error, ToolCallError):
        return valid_text(f"Error: {error}")
    return valid_text(f"Error: {type(error).__name__}: {error}")


def _binding_problem(name: str, exc: Exception) -> str:
    details = [f"{type(exc).__name__}: {exc}"]
    if type(exc).__name__ == "ValidationError":  # pydantic's; its str() adds documentation URLs
        errors = exc.errors(include_url=False)  # type: ignore[attr-defined]
        details = [
            f"argument {path_text(list(e['loc']))!r}: {e['msg']}" if e["loc"] else e["msg"] for e in errors
        ]
    return f"invalid arguments for tool {name!r}:" + "".join(f"\n- {d}" for d in details)


def _to_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    if callable(getattr(result, "model_dump_json", None)) and not isinstance(result, type):
        return result.model_dump_json()
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return json.dumps(result, ensure_ascii=False, default=str)
