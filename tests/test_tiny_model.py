"""The embedded tiny policy: shipped tokenizer contract, chat template, model build and loading."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from agentrl.errors import ConfigError
from agentrl.models.loading import load_model, load_tokenizer, resolve_model
from agentrl.models.tiny import (
    ADDED_TOKENS,
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    TOKENIZER_DIR,
    build_tiny_model,
    tiny_model_path,
    train_tokenizer,
)

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
READ_FILE = {
    "type": "function",
    "function": {
        "name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
}


def _call(name: str, arguments: dict | str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "system_tools": (
        [
            SYSTEM,
            {"role": "user", "content": "What is 12 * 34?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("calculator", {"expression": "12 * 34"})],
            },
            {"role": "tool", "content": "408"},
            {"role": "assistant", "content": "12 * 34 = 408."},
        ],
        [CALCULATOR],
    ),
    "parallel_calls_no_system": (
        [
            {"role": "user", "content": "Add the numbers in a.txt and b.txt."},
            {
                "role": "assistant",
                "content": "  Reading both files.\n",  # surrounding whitespace must survive
                "tool_calls": [
                    _call("read_file", '{"path": "a.txt"}'),
                    _call("read_file", {"path": "b.txt"}),
                ],
            },
            {"role": "tool", "content": "3"},
            {"role": "tool", "content": "4\n"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "calculator", "arguments": {"expression": "3+4"}}],
            },
            {"role": "tool", "content": "7"},
            {"role": "user", "content": "Thanks. And times two?"},
            {"role": "assistant", "content": "14"},
        ],
        [READ_FILE, CALCULATOR],
    ),
    "no_tools": (
        [
            SYSTEM,
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi "},
            {"role": "user", "content": "Again, in JSON."},
            {"role": "assistant", "content": '{"greeting": "hi"}\n\n'},
        ],
        None,
    ),
    "plain_user_first": (
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        None,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _render(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


# --- tokenizer contract -------------------------------------------------------------------------


def test_tokenizer_loads_fast_with_fixed_ids(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 1024
    for expected_id, token in enumerate(SPECIAL_TOKENS + ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
        assert tokenizer.encode(token, add_special_tokens=False) == [expected_id]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.bos_token is None
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_tokenizer_splits_digits_and_keeps_markers_whole(tokenizer):
    tokens = tokenizer.tokenize("x = 2024 + 3.14159")
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == list("20243") + list("14159")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1 and ids.count(1) == 1


def test_tokenizer_round_trips_any_unicode(tokenizer):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x2FF), (0x300, 0x36F), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0xE000, 0xE0FF), (0x10000, 0x10FFF)]  # fmt: skip
    samples = ["", " ", "\n\n\t", "e\u0301", "Å", "\u212b", "a  b\r\n", "def f(x):\n    return x\n"]
    for _ in range(300):
        lo, hi = rng.choice(ranges)
        samples.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))))
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_decode_skips_special_tokens_but_keeps_tool_markers(tokenizer):
    text = '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        'assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    )


def test_train_tokenizer_is_deterministic_and_shipped_template_is_current(tmp_path):
    first, second = train_tokenizer(tmp_path / "a"), train_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # The shipped tokenizer.json is train_tokenizer's output on the Python that built it: the corpus includes
    # that Python's standard library, so another patch release may train other merges.
    shipped = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped["chat_template"] == CHATML_TEMPLATE


# --- chat template --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_renders_prefix_stable(tokenizer, name):
    messages, tools = CONVERSATIONS[name]
    for k in range(1, len(messages)):
        shorter = _render(tokenizer, messages[:k], tools)
        longer = _render(tokenizer, messages[: k + 1], tools)
        assert longer.startswith(shorter), (k, shorter, longer)
        assert longer.endswith("<|im_end|>\n")
        shorter_ids = tokenizer.encode(shorter, add_special_tokens=False)
        assert tokenizer.encode(longer, add_special_tokens=False)[: len(shorter_ids)] == shorter_ids
        if messages[k]["role"] == "assistant":
            prompt = _render(tokenizer, messages[:k], tools, add_generation_prompt=True)
            assert prompt == shorter + "<|im_start|>assistant\n"
            assert longer.startswith(prompt)


def test_chat_template_prefix_stable_on_random_conversations(tokenizer):
    rng = random.Random(1)
    texts = ["", " x ", "a\n", "\n\nb", "{}", "<tool_call>", "12 + 3"]
    for _ in range(40):
        messages = [SYSTEM] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 8)):
            role = rng.choice(["user", "assistant", "tool"])
            message = {"role": role, "content": rng.choice(texts)}
            if role == "assistant" and rng.random() < 0.5:
                message["tool_calls"] = [_call("f", {"n": i}) for i in range(rng.randint(1, 3))]
            messages.append(message)
        tools = [CALCULATOR] if rng.random() < 0.5 else None
        rendered = [_render(tokenizer, messages[:k], tools) for k in range(1, len(messages) + 1)]
        for k in range(1, len(messages)):
            assert rendered[k].startswith(rendered[k - 1])
            if messages[k]["role"] == "assistant":
                assert rendered[k].startswith(_render(tokenizer, messages[:k], tools, True))


def test_chat_template_exact_rendering(tokenizer):
    messages, tools = CONVERSATIONS["system_tools"]
    assert _render(tokenizer, messages, tools) == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n<tools>\n"
        "calculator(expression): Evaluate an arithmetic expression.\n</tools>\nCall a tool as <tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n12 * 34 = 408.<|im_end|>\n"
    )


def test_chat_template_content_verbatim_calls_and_separate_tool_turns(tokenizer):
    messages, tools = CONVERSATIONS["parallel_calls_no_system"]
    rendered = _render(tokenizer, messages[:4], None, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\nAdd the numbers in a.txt and b.txt.<|im_end|>\n"
        "<|im_start|>assistant\n  Reading both files.\n"
        '\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "read_file", "arguments": {"path": "b.txt"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n4\n\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_tools = _render(tokenizer, messages[:1], tools)
    assert with_tools.startswith("<|im_start|>system\n# Tools\n<tools>\n")  # no invented system prompt
    assert (
        _render(tokenizer, messages[:1], None)
        == "<|im_start|>user\nAdd the numbers in a.txt and b.txt.<|im_end|>\n"
    )


# --- model ----------------------------------------------------------------------------------------


def test_built_model_loads_with_expected_shape(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.head_dim == 64 and model.config.hidden_size == 128
    assert model.config.tie_word_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000
    assert model.generation_config.eos_token_id == 2
    input_ids_1_T = torch.tensor([[1, 872, 198, 2]]) % model.config.vocab_size
    with torch.no_grad():
        logits_1_T_V = model(input_ids_1_T).logits
    assert logits_1_T_V.shape == (1, 4, 1024)
    out = model.generate(input_ids_1_T, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, 7)


def test_saved_model_tokenizer_matches_shipped(model_dir, tokenizer):
    saved = AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(saved, PreTrainedTokenizerFast)
    messages, tools = CONVERSATIONS["parallel_calls_no_system"]
    text = _render(saved, messages, tools)
    assert text == _render(tokenizer, messages, tools)
    assert saved.encode(text) == tokenizer.encode(text)
    assert (saved.eos_token_id, saved.pad_token_id) == (2, 0)


def test_build_is_deterministic_and_idempotent(model_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_model(model_dir, seed=0) == model_dir
    assert weights.stat().st_mtime_ns == stamp
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == weights.read_bytes()
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()


def test_tiny_model_path_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTRL_CACHE", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_path())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1 and results[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temporary builds left
    assert resolve_model("tiny") == resolve_model("agentrl/tiny") == str(results[0])
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    assert model.config.vocab_size == len(load_tokenizer("agentrl/tiny"))


def test_resolve_model_passes_other_names_through():
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model(Path("/some/dir")) == "/some/dir"


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_unknown_model_offline_is_config_error(loader, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="no-such-model") as info:
        loader("agentrl-test/no-such-model")
    message = str(info.value)
    assert "'tiny'" in message and "local model directory" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_a_folder_of_checkpoints_names_the_newest(loader, model_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints" / "sft"
    for step in ("step-000425", "step-000450"):
        shutil.copytree(model_dir, checkpoints / step)
    with pytest.raises(ConfigError, match="holds saved checkpoints") as info:
        loader(checkpoints)
    assert f"--model {checkpoints / 'step-000450'}" in str(info.value)
    assert loader(checkpoints / "step-000450") is not None
