"""Tool-call formats per model family: detection from real chat templates, rendering that matches what each
template writes, parsing that reads it back, and malformed output that becomes errors, never exceptions."""

from __future__ import annotations

import json

import pytest
from _family_tokenizers import FAMILIES, TEMPLATES, family_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrl.errors import ConfigError
from agentrl.models.loading import load_tokenizer
from agentrl.tool_formats import (
    ToolFormat,
    detect_tool_format,
    register_tool_format,
    tool_format,
    tool_format_names,
)
from agentrl.types import ToolCall

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run_python",
            "description": "Run a Python program.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "n": {"type": "integer"}, "flags": {"type": "object"}},
                "required": ["code"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        },
    },
]
EXPECTED = {
    "qwen2.5": "hermes",
    "qwen3": "hermes",
    "qwen3-coder": "qwen3_coder",
    "llama3.1": "llama3_json",
    "mistral": "mistral",
    "gpt-oss": "harmony",
}
FORMATS = ["hermes", "llama3_json", "mistral", "qwen3_coder", "harmony"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: family_tokenizer(family, root / family) for family in FAMILIES}


def test_each_familys_template_is_detected_as_its_format(tokenizers):
    detected = {family: detect_tool_format(tok) for family, tok in tokenizers.items()}
    assert {family: d.format.name for family, d in detected.items()} == EXPECTED
    assert {d.source for d in detected.values()} == {"chat_template"}
    tiny = detect_tool_format(load_tokenizer("tiny"))
    assert (tiny.format.name, tiny.source) == ("hermes", "chat_template")


def test_a_template_without_tool_markup_falls_back_to_hermes_and_says_so(tokenizers):
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    detection = detect_tool_format(tokenizers["qwen2.5"], template=plain)
    assert (detection.format.name, detection.source) == ("hermes", "default")


def _calls(fmt: ToolFormat, n: int) -> list[ToolCall]:
    arguments = [{"code": 'print("é")\nprint(1)', "n": 3}, {"word": "naïve"}]
    names = ["run_python", "lookup"]
    return [ToolCall(names[i % 2], arguments[i % 2], fmt.call_id(i)) for i in range(n)]


def _template_writes(tokenizer, calls: list[ToolCall], system: bool = True) -> str:
    """What the family's own template writes after the generation prompt for an assistant turn with ``calls``."""
    history = [{"role": "user", "content": "Do it."}]
    if system:
        history.insert(0, {"role": "system", "content": "Be brief."})
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}} for c in calls
        ],
    }
    before = tokenizer.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    after = tokenizer.apply_chat_template([*history, message], tools=TOOLS, tokenize=False)
    assert after.startswith(before)
    end = after.rfind(tokenizer.eos_token) if after.rstrip().endswith(tokenizer.eos_token) else len(after)
    return after[len(before) : end].rstrip("\n")


# Llama 3.1's template takes one call per turn; Mistral Nemo's moves the system prompt to the last user turn.
@pytest.mark.parametrize(
    ("family", "n", "system"),
    [("qwen2.5", 2, True), ("qwen3-coder", 2, True), ("llama3.1", 1, True), ("mistral", 2, False),
     ("gpt-oss", 1, True)],
)  # fmt: skip
def test_rendering_equals_what_the_familys_template_writes_and_parses_back(tokenizers, family, n, system):
    tokenizer = tokenizers[family]
    fmt = detect_tool_format(tokenizer).format
    calls = _calls(fmt, n)
    written = _template_writes(tokenizer, calls, system)
    assert fmt.render(calls) == written
    parsed = fmt.parse(written, tools=TOOLS)
    assert parsed.errors == ()
    assert [(c.name, dict(c.arguments)) for c in parsed.calls] == [(c.name, dict(c.arguments)) for c in calls]


def test_qwen3s_thinking_prefix_stays_content_and_the_calls_parse(tokenizers):
    tokenizer = tokenizers["qwen3"]
    fmt = detect_tool_format(tokenizer).format
    written = _template_writes(tokenizer, _calls(fmt, 2))
    parsed = fmt.parse(written)
    assert parsed.content.startswith("<think>") and [c.name for c in parsed.calls] == ["run_python", "lookup"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_back_what_it_writes_with_text_and_reasoning(name):
    fmt = tool_format(name)
    calls = _calls(fmt, 1 if name == "llama3_json" else 3)
    turn = fmt.turn_text("I will check.\n", calls, "Think first.")
    parsed = fmt.parse(turn, tools=TOOLS)
    assert parsed.errors == ()
    assert [(c.name, dict(c.arguments), c.id) for c in parsed.calls] == [
        (c.name, dict(c.arguments), c.id) for c in calls
    ]
    plain = fmt.parse(fmt.turn_text("The answer is 42.", []))
    assert plain.calls == () and plain.errors == () and plain.content.endswith("The answer is 42.")


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("llama3_json", '{"name": "lookup", "parameters": {"word": }', "invalid JSON"),
        ("llama3_json", '{"parameters": {}}', '"name"'),
        ("llama3_json", '{"name": "lookup", "parameters": {}} and more', "text after the call"),
        ("mistral", "[TOOL_CALLS][{oops}]", "invalid JSON"),
        ("mistral", '[TOOL_CALLS][{"name": "lookup", "arguments": "[1]"}]', "JSON object"),
        ("qwen3_coder", "<tool_call>\n<function=lookup>\n<parameter=word>\nx\n</parameter>\n", "never closed"),
        ("qwen3_coder", "<tool_call>\nlookup(word=1)\n</tool_call>", "<function=NAME>"),
        ("harmony", "<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{word}<|call|>", "not JSON"),
    ],
)  # fmt: skip
def test_malformed_calls_become_errors_naming_the_problem(name, text, problem):
    parsed = tool_format(name).parse(text, tools=TOOLS)
    assert len(parsed.calls) == (1 if "after" in problem else 0)  # a well-formed call before the junk is kept
    assert len(parsed.errors) == 1 and problem in str(parsed.errors[0])


@pytest.mark.parametrize("name", FORMATS)
def test_a_turn_with_too_many_calls_reports_the_rest_unread(name):
    fmt = tool_format(name)
    calls = _calls(fmt, 5)
    text = "; ".join(fmt.render([c]) for c in calls) if name == "llama3_json" else fmt.render(calls)
    parsed = fmt.parse(text, max_blocks=2)
    assert len(parsed.calls) == 2
    assert "more than 2 tool" in str(parsed.errors[-1]) and "not read" in str(parsed.errors[-1])


def test_qwen3_coder_types_values_by_the_tools_schema():
    fmt = tool_format("qwen3_coder")
    text = (
        "<tool_call>\n<function=run_python>\n<parameter=code>\n42\n</parameter>\n<parameter=n>\n42\n</parameter>\n"
        "<parameter=flags>\n{'a': True}\n</parameter>\n</function>\n</tool_call>"
    )
    typed = fmt.parse(text, tools=TOOLS).calls[0].arguments
    assert typed == {"code": "42", "n": 42, "flags": {"a": True}}
    untyped = fmt.parse(text).calls[0].arguments  # no schema: JSON where the text is JSON
    assert untyped["code"] == 42


def test_mistral_ids_are_nine_characters_as_its_template_demands():
    fmt = tool_format("mistral")
    parsed = fmt.parse('[TOOL_CALLS][{"name": "lookup", "arguments": {"word": "a"}, "id": "bad"}]')
    assert parsed.calls[0].id == fmt.call_id(0) and len(fmt.call_id(0)) == 9 and fmt.call_id(7).isalnum()


def test_harmony_history_messages_are_structured_for_its_template(tokenizers):
    fmt = tool_format("harmony")
    calls = _calls(fmt, 1)
    message = fmt.message(fmt.turn_text("", calls, "Reason first."))
    assert message["content"] == "" and message["thinking"] == "Reason first."
    assert message["tool_calls"][0]["function"] == {"name": "run_python", "arguments": dict(calls[0].arguments)}
    history = [{"role": "user", "content": "Do it."}, message, {"role": "tool", "content": "42"}]
    rendered = tokenizers["gpt-oss"].apply_chat_template(history, tools=TOOLS, tokenize=False)
    assert "<|start|>functions.run_python to=assistant<|channel|>commentary" in rendered


def test_a_tokenizers_response_template_is_used_as_its_parser(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tokenizers["qwen2.5"]
    tokenizer.response_template = {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "tool_calls": {
                "open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                "transform": {"type": "function", "function": "{content}"},
            },
            "content": {"close_pattern": r"\s*<\|im_end\|>", "content": "text"},
        },
    }  # fmt: skip
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    detection = detect_tool_format(reloaded)
    assert detection.source == "response_template"
    text = 'Sure.\n<tool_call>\n{"name": "lookup", "arguments": {"word": "a"}}\n</tool_call>'
    parsed = detection.format.parse(text)
    assert [(c.name, dict(c.arguments)) for c in parsed.calls] == [("lookup", {"word": "a"})]
    # Writing follows the markup of the chat template beside it.
    assert detection.format.render(parsed.calls) == tool_format("hermes").render(parsed.calls)
    mistral = tokenizers["mistral"]
    mistral.response_template = tokenizer.response_template
    beside_mistral = detect_tool_format(mistral).format
    assert beside_mistral.render(parsed.calls).startswith("[TOOL_CALLS][") and beside_mistral.structured_history
    assert beside_mistral.call_id(0) == tool_format("mistral").call_id(0)
    mistral.response_template = None
    # A training template named by the run replaces the tokenizer's: detection follows the template.
    coder = (TEMPLATES / "Qwen-Qwen3-Coder.jinja").read_text(encoding="utf-8")
    assert detect_tool_format(reloaded, template=coder).format.name == "qwen3_coder"


def test_the_registry_names_formats_and_refuses_unknown_or_taken_names():
    assert set(FORMATS) <= set(tool_format_names())
    with pytest.raises(ConfigError, match=r"unknown tool format 'nope'; known: .*hermes"):
        tool_format("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_tool_format("hermes", ToolFormat)


FUZZ = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PIECES = st.sampled_from([
    "<tool_call>", "</tool_call>", "<function=", "<parameter=x>", "</parameter>", "</function>", "[TOOL_CALLS]",
    "<|python_tag|>", "<|channel|>", "<|message|>", "<|call|>", "<|end|>", " to=functions.f", "{", "}", "[", "]",
    '"name": "f"', '"arguments": {}', '"parameters": ', ";", ">", "\n", "\ud800", "\\ud800",
])  # fmt: skip


@FUZZ
@given(st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=24), st.sampled_from(FORMATS))
def test_no_output_makes_a_parser_raise_and_every_string_is_valid_unicode(pieces, name):
    parsed = tool_format(name).parse("".join(pieces), tools=TOOLS)
    json.dumps([parsed.content, [dict(c.arguments) for c in parsed.calls], [str(e) for e in parsed.errors]])
    for text in [parsed.content, *(str(e) for e in parsed.errors)]:
        text.encode("utf-8")


def test_parse_tool_calls_takes_a_format_name_for_envs_that_serve_other_families():
    from agentrl.tools import parse_tool_calls

    text = '[TOOL_CALLS][{"name": "lookup", "arguments": {"word": "a"}}]'
    parsed = parse_tool_calls(text, tool_format="mistral")
    assert [(c.name, dict(c.arguments), c.id) for c in parsed.calls] == [("lookup", {"word": "a"}, "call00000")]
    assert parse_tool_calls(text).calls == ()  # Hermes by default: no <tool_call> block in that text
    with pytest.raises(ConfigError, match="unknown tool format"):
        parse_tool_calls(text, tool_format="gemma")
