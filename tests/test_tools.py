"""Tests for agentrl.tools: schemas, parsing (with a fuzz), validation and execution."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import subprocess
import sys
import time
from typing import Annotated, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from agentrl.errors import ConfigError, ToolCallError
from agentrl.tools import (
    MAX_BLOCKS_PER_TURN,
    ParsedTurn,
    Tool,
    as_tool,
    call_tool,
    format_tool_calls,
    parse_openai_tool_calls,
    parse_tool_calls,
    tool,
    tool_error_message,
    validate_call,
)
from agentrl.types import ToolCall

# CI runs a short, reproducible fuzz; AGENTRL_FUZZ_EXAMPLES=20000 runs a long, random one.
_LONG_FUZZ = int(os.environ.get("AGENTRL_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG_FUZZ or 120,
    derandomize=not _LONG_FUZZ,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def search(query: str, limit: int = 5) -> list[str]:
    """Search the web.

    Longer explanation that is not part of the description.

    Args:
        query: What to look for.
        limit (int): Maximum number
            of results.

    Returns:
        The result titles.
    """
    return [f"{query} {i}" for i in range(limit)]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Box(BaseModel):
    """A box."""

    width: int
    label: str = "box"


def paint(
    color: Color,
    boxes: list[Box],
    mode: Literal["fast", "slow"] = "fast",
    weights: dict[str, float] | None = None,
    n: Annotated[int, Field(ge=0)] = 1,
    note: str | None = None,
) -> dict[str, Any]:
    """Paint boxes."""
    return {
        "color": color.value,
        "widths": [b.width for b in boxes],
        "mode": mode,
        "weights": weights,
        "n": n,
    }


class SearchArgs(BaseModel):
    """Search the web.

    Details the model does not need.
    """

    query: str = Field(description="What to look for.")
    limit: int = 5


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------- schemas


def test_schema_from_typed_function_with_docstring() -> None:
    assert Tool.from_function(search).schema() == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                    "limit": {"type": "integer", "default": 5, "description": "Maximum number of results."},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }


def test_schema_supports_rich_types_and_binds_them() -> None:
    paint_tool = Tool.from_function(paint)
    props = paint_tool.parameters["properties"]
    assert paint_tool.parameters["required"] == ["color", "boxes"]
    assert props["mode"]["enum"] == ["fast", "slow"]
    assert props["n"]["minimum"] == 0
    assert props["boxes"]["type"] == "array"
    assert paint_tool.parameters["$defs"]["Color"]["enum"] == ["red", "green"]
    assert "title" not in json.dumps(paint_tool.parameters)

    call = ToolCall("paint", {"color": "green", "boxes": [{"width": 2}], "weights": {"a": 1}}, "c1")
    message = run(call_tool(call, [paint_tool]))
    assert json.loads(message["content"]) == {
        "color": "green",
        "widths": [2],
        "mode": "fast",
        "weights": {"a": 1.0},
        "n": 1,
    }


def test_schema_from_pydantic_model() -> None:
    seen: list[SearchArgs] = []
    search_tool = Tool.from_model(SearchArgs, fn=lambda args: seen.append(args) or "done", name="search")
    assert search_tool.schema() == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                    "limit": {"type": "integer", "default": 5},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }
    message = run(call_tool(ToolCall("search", {"query": "cats"}, "c7"), [search_tool]))
    assert message == {"role": "tool", "tool_call_id": "c7", "name": "search", "content": "done"}
    assert seen == [SearchArgs(query="cats")]
    assert as_tool(SearchArgs).name == "SearchArgs"


def test_async_function_tool_is_awaited() -> None:
    @tool
    async def slow_add(a: int, b: int) -> int:
        """Add two numbers."""
        await asyncio.sleep(0)
        return a + b

    assert isinstance(slow_add, Tool)
    assert slow_add.description == "Add two numbers."
    assert run(slow_add(1, 2)) == 3  # the decorated tool stays callable
    message = run(call_tool(ToolCall("slow_add", {"a": 2, "b": 3}, "call_0"), {"slow_add": slow_add}))
    assert message["content"] == "5"


def test_tool_decorator_with_name_and_raw_schema() -> None:
    @tool(name="shout")
    def upper(text: str) -> str:
        return text.upper()

    assert upper.name == "shout" and upper("a") == "A"
    raw = {
        "type": "function",
        "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
    }
    ping = as_tool(raw)
    assert ping.schema() == {
        "type": "function",
        "function": {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}},
    }
    with pytest.raises(TypeError, match="schema-only"):
        ping()
    with pytest.raises(ConfigError, match="invalid parameters schema"):
        Tool.from_schema({"name": "bad", "parameters": {"type": "object", "properties": 3}})


def test_unsupported_signatures_fail_with_the_fix() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def star(*args: int) -> int:
        return 0

    def field_default(n: int = Field(1, ge=0)) -> int:
        return n

    with pytest.raises(ConfigError, match="'x' needs a type hint"):
        Tool.from_function(untyped)
    with pytest.raises(ConfigError, match=r"replace \*args"):
        Tool.from_function(star)
    with pytest.raises(ConfigError, match="Annotated"):
        Tool.from_function(field_default)
    with pytest.raises(ConfigError, match="pass name="):
        Tool.from_function(lambda x: x)


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_single_call() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "search", "arguments": {"query": "cats"}}\n</tool_call>')
    assert parsed == ParsedTurn("", (ToolCall("search", {"query": "cats"}, "call_0"),), ())


def test_parse_multiple_calls_with_text_around() -> None:
    text = (
        "Let me look.\n"
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        "and\n"
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>\nDone.'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == (ToolCall("a", {"x": 1}, "call_0"), ToolCall("b", {}, "call_1"))
    assert parsed.content == "Let me look.\n\nand\n\nDone."
    assert parsed.errors == ()


def test_parse_no_calls() -> None:
    assert parse_tool_calls("  The answer is 4.  ") == ParsedTurn("The answer is 4.")
    assert parse_tool_calls("") == ParsedTurn("")


def test_parse_arguments_given_as_json_string_or_absent() -> None:
    parsed = parse_tool_calls(
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>'
        '<tool_call>{"name": "now"}</tool_call>'
        '<tool_call>{"name": "now", "arguments": ""}</tool_call>'
    )
    assert parsed.errors == ()
    assert parsed.calls == (
        ToolCall("a", {"x": [1, 2]}, "call_0"),
        ToolCall("now", {}, "call_1"),
        ToolCall("now", {}, "call_2"),
    )


def test_parse_tag_inside_a_json_string() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "echo", "arguments": {"s": "a</tool_call>b"}}</tool_call>')
    assert parsed.calls == (ToolCall("echo", {"s": "a</tool_call>b"}, "call_0"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<tool_call>\n{"name": "a", "arguments": {"x": 1}', ["tool call 1", "never closed", "cut off"]),
        (
            '<tool_call>{"name": "a", "arguments": {"q": "x" "n": 3}}</tool_call>',
            ["invalid JSON", "Expecting ',' delimiter", "line 1, column 38", '"q": "x" >>>"n": 3}}'],
        ),
        (
            '<tool_call>\n{"name": "a",\n "arguments": {\'q\': 1}}\n</tool_call>',
            ["line 2, column 16", "Expecting property name enclosed in double quotes"],
        ),
        ('<tool_call>{"name": "a"}\n{"name": "b"}</tool_call>', ["Extra data", "its own block"]),
        ("<tool_call>[1, 2]</tool_call>", ["expected a JSON object, got [1, 2]", '"arguments"']),
        ('<tool_call>{"arguments": {}}</tool_call>', ['missing "name"']),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', ['"name" must be a non-empty string, got 3']),
        (
            '<tool_call>{"name": "", "arguments": {}}</tool_call>',
            ['"name" must be a non-empty string, got ""'],
        ),
        (
            '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
            ["tool call 1 (a)", '"arguments" must be a JSON object, got [1]'],
        ),
        (
            '<tool_call>{"name": "a", "arguments": "{oops"}</tool_call>',
            ['"arguments" is a string but not a JSON object', "line 1, column 2"],
        ),
        (
            '<tool_call>{"name": "a", "arguments": "[1]"}</tool_call>',
            ['"arguments" must be a JSON object, got [1]'],
        ),
        ('<tool_call>{"name": "a", "parameters": {}}</tool_call>', ["unexpected key(s) 'parameters'"]),
        ("<tool_call>\n  \n</tool_call>", ["the block is empty"]),
        ("done </tool_call>", ["without an opening <tool_call>"]),
        ('<tool_call>{"name": "a"<tool_call>', ["not closed before the next one", "never closed"]),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", ["invalid JSON"]),
    ],
)
def test_parse_malformed_blocks(text: str, expected: list[str]) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.calls == ()
    messages = "\n".join(str(e) for e in parsed.errors)
    for fragment in expected:
        assert fragment in messages
    assert all(isinstance(e, ToolCallError) for e in parsed.errors)


def test_parse_turns_lone_surrogate_escapes_into_replacement_characters() -> None:
    text = (
        '<tool_call>{"name": "guess", "arguments": {"number": "\\ud800", "\\udfff": ["x\\uDBFF"],'
        ' "pair": "\\ud83d\\ude00"}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": "{\\"a\\": \\"\\\\udc00\\"}"}</tool_call>'
        '<tool_call>{"name": "\\ud800", "arguments": 5}</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == (
        ToolCall("guess", {"number": "\ufffd", "\ufffd": ["x\ufffd"], "pair": "\U0001f600"}, "call_0"),
        ToolCall("g", {"a": "\ufffd"}, "call_1"),
    )
    assert len(parsed.errors) == 1
    openai = parse_openai_tool_calls(
        [{"id": "c\ud800", "function": {"name": "f", "arguments": {"s": "\udc80"}}}], "hi\ud800"
    )
    assert openai.calls == (ToolCall("f", {"s": "\ufffd"}, "c\ufffd"),) and openai.content == "hi\ufffd"
    for turn in (parsed, openai):
        json.dumps([turn.content, [str(e) for e in turn.errors], [c.arguments for c in turn.calls]],
                   ensure_ascii=False).encode("utf-8")
    with pytest.raises(ToolCallError) as invalid:
        validate_call(parsed.calls[0], [Tool("guess", "", {"type": "object", "additionalProperties": False})])
    str(invalid.value).encode("utf-8")


def test_tool_messages_hold_valid_unicode_whatever_the_tool_returns() -> None:
    def odd(kind: str) -> str:
        """Return or raise text with a lone surrogate.

        Args:
            kind: "return" or "raise".
        """
        if kind == "raise":
            raise ValueError("bad \udc80 byte")
        return "out \udcff"

    for kind in ("return", "raise"):
        message = run(call_tool(ToolCall("odd", {"kind": kind}, "c1"), [odd]))
        message["content"].encode("utf-8")
        assert "\ufffd" in message["content"]
    tool_error_message(RuntimeError("x\ud800"))["content"].encode("utf-8")


def test_parse_reads_at_most_max_blocks_and_says_so_once() -> None:
    block = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    parsed = parse_tool_calls(block * 1000 + "</tool_call>" * 1000 + "tail")
    assert len(parsed.calls) == MAX_BLOCKS_PER_TURN
    [error] = parsed.errors
    assert f"more than {MAX_BLOCKS_PER_TURN} tool-call blocks" in str(error)
    few = parse_tool_calls("<tool_call>{bad}</tool_call>" * 5 + block * 5, max_blocks=4)
    assert few.calls == () and len(few.errors) == 5 and "more than 4" in str(few.errors[-1])
    assert len(parse_tool_calls(block * 100, max_blocks=None).calls) == 100


def _parse_seconds(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        parse_tool_calls(text, max_blocks=None)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize(
    "block",
    ["<tool_call>", "<tool_call>{bad}</tool_call>\n", "<tool_call></tool_call>", '<tool_call>{"a\n',
     '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'],
)
def test_parse_time_is_linear_in_the_number_of_blocks(block: str) -> None:
    small, large = _parse_seconds(block * 2048), _parse_seconds(block * 32768)
    # 16 times the blocks: about 16 times the time; quadratic parsing took 256 times (seconds at 32k blocks).
    assert large < 48 * small + 0.05, (small, large)


def test_parse_keeps_good_calls_next_to_bad_ones() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {oops}}</tool_call>'
        '<tool_call>{"name": "c", "arguments": {"y": null}}</tool_call>'
        'tail <tool_call>{"name": "d"'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == (ToolCall("a", {}, "call_0"), ToolCall("c", {"y": None}, "call_1"))
    assert [str(e).split(":")[0] for e in parsed.errors] == ["tool call 2", "tool call 4"]
    assert parsed.content == "tail"


def test_parse_openai_tool_calls() -> None:
    tool_calls = [
        {"id": "call_x", "type": "function", "function": {"name": "a", "arguments": '{"q": "cats"}'}},
        {"id": "call_y", "type": "function", "function": {"name": "b", "arguments": '{"q": "ca'}},
        {"id": "call_z", "type": "function", "function": {"name": "c", "arguments": ""}},
        {"type": "function", "function": {"name": "d", "arguments": {"k": 1}}},
        {"id": "call_w", "type": "function"},
        {"id": "call_v", "type": "function", "function": {"arguments": "{}"}},
        "nonsense",
    ]
    parsed = parse_openai_tool_calls(tool_calls, content="thinking")
    assert parsed.content == "thinking"
    assert parsed.calls == (
        ToolCall("a", {"q": "cats"}, "call_x"),
        ToolCall("c", {}, "call_z"),
        ToolCall("d", {"k": 1}, "call_3"),
    )
    errors = [str(e) for e in parsed.errors]
    assert "tool call 2 (id 'call_y') (b)" in errors[0] and "Unterminated string" in errors[0]
    assert '"function" must be an object' in errors[1]
    assert '"function.name" must be a non-empty string, got null' in errors[2]
    assert "tool call 7: expected an object, got str" in errors[3]
    assert parse_openai_tool_calls(None) == ParsedTurn("")
    assert "must be a list" in str(parse_openai_tool_calls("[]").errors[0])  # type: ignore[arg-type]


def test_format_tool_calls_round_trip() -> None:
    calls = [ToolCall("a", {"x": [1, {"y": None}]}), ToolCall("b", {"s": "</tool_call><tool_call>ünï"})]
    text = format_tool_calls(calls)
    assert text.startswith('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": null}]}}\n</tool_call>\n')
    assert text.count("<tool_call>") == 2 and "ünï" in text
    parsed = parse_tool_calls(text)
    assert parsed.errors == ()
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in calls]


# ---------------------------------------------------------------------------------------------- validation


def test_validate_unknown_tool_suggests_the_closest_name() -> None:
    tools = [Tool.from_function(search), Tool.from_function(paint)]
    with pytest.raises(ToolCallError) as info:
        validate_call(ToolCall("serch", {"query": "x"}), tools)
    assert (
        str(info.value) == "unknown tool 'serch'. Did you mean 'search'? Available tools: 'paint', 'search'"
    )
    with pytest.raises(ToolCallError, match="Available tools") as info:
        validate_call(ToolCall("zzz", {}), tools)
    assert "Did you mean" not in str(info.value)
    with pytest.raises(ToolCallError, match="no tools are available"):
        validate_call(ToolCall("zzz", {}), [])


def test_validate_wrong_type_missing_and_extra_arguments() -> None:
    tools = {"search": Tool.from_function(search)}
    assert validate_call(ToolCall("search", {"query": "x", "limit": 2}), tools).name == "search"
    with pytest.raises(ToolCallError) as info:
        validate_call(ToolCall("search", {"limit": "3", "color": "red"}), tools)
    assert str(info.value) == (
        "invalid arguments for tool 'search':\n"
        "- missing required argument 'query'\n"
        "- unexpected argument 'color' (accepted: 'limit', 'query')\n"
        "- argument 'limit': expected integer, got \"3\""
    )


def test_validate_nested_enum_and_constraint_errors() -> None:
    tools = [Tool.from_function(paint)]
    bad = {"color": "blue", "boxes": [{"width": 1}, {"label": 3}], "n": -1, "mode": "now", "note": 5}
    with pytest.raises(ToolCallError) as info:
        validate_call(ToolCall("paint", bad), tools)
    message = str(info.value)
    assert 'argument \'color\': expected one of "red", "green", got "blue"' in message
    assert "argument 'boxes[1]': missing required field 'width'" in message
    assert "argument 'boxes[1].label': expected string, got 3" in message
    assert "argument 'n': expected >= 0, got -1" in message
    assert 'argument \'mode\': expected one of "fast", "slow", got "now"' in message
    assert "argument 'note': expected string or null, got 5" in message

    def reshape(box: Box | None, sizes: list[int] | None = None) -> None:
        """Optional containers report the error inside the alternative of the right type."""

    with pytest.raises(ToolCallError) as info:
        validate_call(ToolCall("reshape", {"box": {}, "sizes": [1, "2"]}), [Tool.from_function(reshape)])
    assert str(info.value) == (
        "invalid arguments for tool 'reshape':\n"
        "- argument 'box': missing required field 'width'\n"
        "- argument 'sizes[1]': expected integer, got \"2\""
    )


# ---------------------------------------------------------------------------------------------- execution


def test_call_tool_turns_exceptions_into_messages() -> None:
    @tool
    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    message = run(call_tool(ToolCall("divide", {"a": 1, "b": 0}, "call_3"), [divide]))
    assert message == {
        "role": "tool",
        "tool_call_id": "call_3",
        "name": "divide",
        "content": "Error: ZeroDivisionError: division by zero",
    }
    assert run(call_tool(ToolCall("divide", {"a": 1, "b": 4}, "c"), [divide]))["content"] == "0.25"
    bad = run(call_tool(ToolCall("divide", {"a": "1", "b": 4}, "c"), [divide]))
    assert (
        bad["content"]
        == "Error: invalid arguments for tool 'divide':\n- argument 'a': expected integer, got \"1\""
    )
    unknown = run(call_tool(ToolCall("divid", {}, "c"), [divide]))
    assert unknown["content"].startswith("Error: unknown tool 'divid'. Did you mean 'divide'?")


def test_call_tool_reports_pydantic_validator_failures() -> None:
    class Positive(BaseModel):
        n: int = Field(description="A number.")

        def model_post_init(self, context: Any) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    positive = Tool.from_model(Positive, fn=lambda args: args.n)
    message = run(call_tool(ToolCall("Positive", {"n": -1}, "c"), [positive]))
    assert message["content"].startswith("Error: invalid arguments for tool 'Positive':")
    assert "n must be positive" in message["content"]
    with pytest.raises(ConfigError, match="schema-only"):
        run(call_tool(ToolCall("Positive", {"n": 1}), [Tool.from_model(Positive)]))


def test_tool_error_message() -> None:
    error = parse_tool_calls("<tool_call>{").errors[0]
    assert tool_error_message(error, "call_0") == {
        "role": "tool",
        "content": f"Error: {error}",
        "tool_call_id": "call_0",
    }
    assert tool_error_message(KeyError("k")) == {"role": "tool", "content": "Error: KeyError: 'k'"}


def test_import_does_not_load_heavy_modules() -> None:
    code = (
        "import sys, agentrl; before = set(sys.modules); import agentrl.tools; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & {'pydantic', 'jsonschema', 'torch', 'httpx'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
tool_calls = st.builds(
    ToolCall,
    name=st.text(min_size=1, max_size=12),
    arguments=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)
plain_text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=12)
fragments = st.one_of(
    st.sampled_from(
        ["<tool_call>", "</tool_call>", "<tool_call", "\n", *'{ } [ ] "name" "arguments" : , " \\'.split()]
    ),
    st.just('{"name": "f", "arguments": '),
    json_values.map(json.dumps),
    st.text(max_size=4),
    tool_calls.map(lambda call: format_tool_calls([call])),
)


def assert_well_behaved(parsed: Any) -> None:
    assert isinstance(parsed, ParsedTurn) and isinstance(parsed.content, str)
    for error in parsed.errors:
        assert isinstance(error, ToolCallError) and str(error).strip()
    for call in parsed.calls:
        assert isinstance(call, ToolCall) and isinstance(call.name, str) and call.name
        assert isinstance(call.arguments, dict)


@FUZZ
@given(st.text())
def test_fuzz_arbitrary_text_never_raises(text: str) -> None:
    assert_well_behaved(parse_tool_calls(text))


@FUZZ
@given(st.lists(fragments, max_size=25))
def test_fuzz_interleaved_fragments_never_raise(parts: list[str]) -> None:
    parsed = parse_tool_calls("".join(parts))
    assert_well_behaved(parsed)
    assert [c.id for c in parsed.calls] == [f"call_{i}" for i in range(len(parsed.calls))]


openai_entries = st.fixed_dictionaries(
    {
        "id": st.none() | st.text(max_size=4),
        "function": json_values | st.fixed_dictionaries({"name": json_values}),
    },
    optional={"type": st.sampled_from(["function", "other"])},
)


@FUZZ
@given(st.lists(json_values | openai_entries, max_size=4), st.data())
def test_fuzz_openai_tool_calls_never_raise(entries: list[Any], data: st.DataObject) -> None:
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("function"), dict):
            arguments = st.one_of(json_values, json_values.map(json.dumps), st.text(max_size=6))
            entry["function"]["arguments"] = data.draw(arguments)
    assert_well_behaved(parse_openai_tool_calls(entries))


@FUZZ
@given(st.lists(st.tuples(plain_text, tool_calls), max_size=4), plain_text)
def test_fuzz_well_formed_calls_parse_back_exactly(pairs: list[tuple[str, ToolCall]], tail: str) -> None:
    text = "".join(prefix + format_tool_calls([call]) for prefix, call in pairs) + tail
    parsed = parse_tool_calls(text)
    assert parsed.errors == ()
    assert list(parsed.calls) == [
        ToolCall(c.name, c.arguments, f"call_{i}") for i, (_, c) in enumerate(pairs)
    ]
    assert parsed.content == ("".join(prefix for prefix, _ in pairs) + tail).strip()


@settings(FUZZ, max_examples=40)
@given(plain_text, tool_calls)
def test_fuzz_truncated_calls_report_one_error(prefix: str, call: ToolCall) -> None:
    full = prefix + format_tool_calls([call])
    opened = len(prefix) + len("<tool_call>")
    for end in range(len(full) + 1):
        parsed = parse_tool_calls(full[:end])
        assert_well_behaved(parsed)
        if end == len(full):
            assert parsed.calls == (ToolCall(call.name, call.arguments, "call_0"),)
        elif end >= opened:
            assert parsed.calls == () and len(parsed.errors) == 1
            assert "never closed" in str(parsed.errors[0])
        else:
            assert parsed == ParsedTurn(full[:end].strip())


def test_schemas_agree_with_transformers_get_json_schema_where_it_describes_the_function():
    """Ours is built with pydantic: it adds defaults, ``additionalProperties: false`` and standard ``anyOf``
    for optionals (transformers writes OpenAPI's ``nullable``, which JSON-schema validation ignores), so the
    schema is what call validation enforces. Names, descriptions, base types and required arguments agree."""
    from transformers.utils import get_json_schema

    def lookup(query: str, limit: int = 5, exact: bool | None = None, tags: list[str] | None = None) -> list[str]:
        """Look something up.

        Args:
            query: What to look for.
            limit: How many results.
            exact: Exact match only.
            tags: Tags to filter by.
        """
        return [query] * limit

    theirs = get_json_schema(lookup)["function"]
    ours = Tool.from_function(lookup).schema()["function"]
    assert (ours["name"], ours["description"]) == (theirs["name"], theirs["description"])
    assert ours["parameters"]["required"] == theirs["parameters"]["required"] == ["query"]
    for name, prop in theirs["parameters"]["properties"].items():
        mine = ours["parameters"]["properties"][name]
        assert mine["description"] == prop["description"]
        types = {branch.get("type") for branch in mine.get("anyOf", [mine])} - {"null"}
        assert types == {prop["type"]}
    assert ours["parameters"]["additionalProperties"] is False
    # A schema from get_json_schema is accepted as a schema-only tool, its calls validated against it.
    imported = as_tool(get_json_schema(lookup))
    assert validate_call(ToolCall("lookup", {"query": "x", "limit": 2}), [imported])
    with pytest.raises(ToolCallError, match="limit"):
        validate_call(ToolCall("lookup", {"query": "x", "limit": "two"}), [imported])
