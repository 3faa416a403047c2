"""The embedded default policy: a ~1M-parameter Qwen2 model with its own byte-level BPE tokenizer.

It lets CPU runs and tests train a real transformer without downloading anything. The tokenizer ships
with the package as data (``tiny_tokenizer/``, made once by :func:`train_tokenizer`); the model is a
deterministic random initialisation built on first use (:func:`tiny_model_path`). Both load through the
plain ``from_pretrained`` path like any hub model.

Tokenizer: byte-level BPE, 1,024 ids, digits split one per token, no normalizer, so
``decode(encode(s)) == s`` for any string. Ids 0-2 are the special tokens ``<|endoftext|>`` (pad),
``<|im_start|>`` and ``<|im_end|>`` (eos, ends every turn); ids 3-8 are the tool markers, added tokens
that are not special, so they survive ``decode(..., skip_special_tokens=True)``. The pre-tokenizer is the
one transformers >= 5 rebuilds for every ``qwen2`` model directory (``Qwen2Tokenizer``), so a saved model
tokenizes exactly like the shipped tokenizer; that rebuild also adds NFC normalization, so round trips
through a saved model's tokenizer hold for NFC text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Config

__all__ = [
    "ADDED_TOKENS",
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "TOKENIZER_DIR",
    "build_tiny_model",
    "tiny_config",
    "tiny_model_path",
    "train_tokenizer",
]

TOKENIZER_DIR = Path(__file__).parent / "tiny_tokenizer"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>")
VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
DEFAULT_SEED = 0
_BUILD_FORMAT = 1  # bump when the model build changes, so cached builds are rebuilt
_MARKER = "agentrl_tiny.json"
_INIT_LOCK = threading.Lock()  # seeding uses torch's global generator: one seeded init at a time
# Qwen2's split pattern: digits one per token, letters with one leading non-letter, punctuation runs.
_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, Qwen2.5 style. Every message renders on its own, with no look-ahead, so rendering messages[:k]
# is a string prefix of rendering messages[:k+1] (the token ledger depends on it), and the generation
# prompt is the opening of the next assistant turn. Unlike Qwen2.5, consecutive tool results are not
# grouped into one user turn: the group's closing <|im_end|> would have to wait for the next message,
# which breaks the prefix property; each tool result is its own user turn. Content is never trimmed.
# Tools render as one signature line each, `name(arg, ...): description`, not as JSON schemas: a small
# model learns its tools from demonstrations, and the schemas would be most of every prompt (the
# code-sandbox tools: 126 tokens instead of 320, and the context is what decoding pays for).
_CHATML = r"""{%- macro text(content) %}{%- if content is string %}{{- content }}{%- endif %}{%- endmacro %}
{%- if messages and (tools or messages[0].role == 'system') %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- text(messages[0].content) }}
        {%- if tools %}{{- '\n\n' }}{%- endif %}
    {%- endif %}
@TOOLS@    {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}{{- text(message.content) }}
        {%- set has_text = message.content is string and message.content %}
        {%- for call in message.tool_calls or [] %}
            {%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
            {%- if has_text or not loop.first %}{{- '\n' }}{%- endif %}
            {{- '<tool_call>\n{"name": ' }}{{- call.name | tojson }}{{- ', "arguments": ' }}
            {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' }}{{- text(message.content) }}{{- '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' }}{{- text(message.content) }}{{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
_TOOLS_LISTED = r"""    {%- if tools %}
        {{- '# Tools\n<tools>' }}
        {%- for tool in tools %}
            {%- set fn = tool.function if tool.function is defined else tool %}
            {{- '\n' + fn.name + '(' }}
            {%- if fn.parameters is mapping and fn.parameters.properties is mapping %}
                {{- fn.parameters.properties | list | join(', ') }}
            {%- endif %}
            {{- ')' }}
            {%- if fn.description %}{{- ': ' + fn.description }}{%- endif %}
        {%- endfor %}
        {{- '\n</tools>\nCall a tool as <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
    {%- endif %}
"""
_TOOLS_AS_SCHEMAS = r"""    {%- if tools %}
        {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
        {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
        {%- for tool in tools %}
            {{- '\n' }}{{- tool | tojson }}
        {%- endfor %}
        {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' }}
        {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
        {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
    {%- endif %}
"""
CHATML_TEMPLATE = _CHATML.replace("@TOOLS@", _TOOLS_LISTED)
# The tokenizer's training conversations render tools as JSON schemas, as large models' templates do: its
# vocabulary serves the tool schemas and JSON results of real-model conversations too.
_CORPUS_TEMPLATE = _CHATML.replace("@TOOLS@", _TOOLS_AS_SCHEMAS)

# Fixed corpus: these standard-library files (those present), each cut to _FILE_CHARS characters.
_STDLIB_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py", "contextlib.py",
    "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fractions.py",
    "functools.py", "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "os.py", "pprint.py", "random.py", "shlex.py", "statistics.py", "string.py", "textwrap.py", "typing.py",
)  # fmt: skip
_FILE_CHARS = 40_000


def _renderer() -> Callable[..., str]:
    """The training corpus's template (:data:`CHATML_TEMPLATE` with tool schemas), compiled as transformers does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(_CORPUS_TEMPLATE).render


def _tool(name: str, description: str, arg: str) -> dict:
    parameters = {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def _chat_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Synthesized conversations: the template's glue, JSON tool calls, tool results and English prompts."""
    rng, render = random.Random(seed), _renderer()
    tools = [
        _tool("run_python", "Run Python code and return what it prints.", "code"),
        _tool("read_file", "Read a text file from the workspace.", "path"),
        _tool("calculator", "Evaluate an arithmetic expression.", "expression"),
        _tool("search", "Search the documentation for a query.", "query"),
    ]
    words = ["sum", "maximum", "length", "reverse", "sorted list", "average", "number of words", "first item"]
    texts = []
    for _ in range(n):
        a, b, word = rng.randint(0, 999), rng.randint(0, 999), rng.choice(words)
        path = f"data_{rng.randint(1, 99)}.{rng.choice(['txt', 'csv', 'py', 'json'])}"
        task, name, args, result = rng.choice([
            (f"What is {a} * {b}?", "calculator", {"expression": f"{a} * {b}"}, str(a * b)),
            (f"Write a function that returns the {word} of a list.", "run_python",
             {"code": f"def f(xs):\n    return xs[{a % 7}]\n\nprint(f([{a}, {b}]))"}, f"{b}\n"),
            (f"Read the file {path} and tell me how many lines it has.", "read_file", {"path": path},
             "\n".join(str(rng.randint(0, 99)) for _ in range(a % 5 + 1))),
            (f"How do I compute the {word} in Python?", "search", {"query": f"python {word}"},
             json.dumps({"results": [f"Use the built-in function for the {word}."], "count": 1})),
        ])  # fmt: skip
        system = {"role": "system", "content": "You are a helpful assistant."}
        messages: list[dict] = [system] if rng.random() < 0.5 else []
        call = {"name": name, "arguments": args}
        thought = rng.choice(["", "I will use a tool.", f"Let me check {name}."])
        messages += [
            {"role": "user", "content": task},
            {"role": "assistant", "content": thought, "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": f"The answer is {result.strip()}."},
        ]
        texts.append(render(messages=messages, tools=tools if rng.random() < 0.7 else None))
    return texts


def _stdlib_corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in sorted(_STDLIB_FILES) if (root / name).is_file()]
    return [path.read_text(encoding="utf-8")[:_FILE_CHARS] for path in paths]


def train_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Train the tiny byte-level BPE tokenizer (deterministically, in about a second) and save it.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``;
    :data:`TOKENIZER_DIR` holds the shipped output of ``train_tokenizer(TOKENIZER_DIR)``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    all_added = [AddedToken(t, normalized=False) for t in SPECIAL_TOKENS + ADDED_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=all_added, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(_stdlib_corpus() + _chat_corpus(), trainer)
    data = json.loads(tokenizer.to_str())
    for entry in data["added_tokens"]:  # the trainer marks all of them special; only three are
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    decoder = {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                  "special")} for e in data["added_tokens"]}  # fmt: skip
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special_map, "bos_token": None, "unk_token": None,
        "added_tokens_decoder": decoder, "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "model_max_length": MAX_POSITIONS, "split_special_tokens": False, "chat_template": CHATML_TEMPLATE,
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": data, "tokenizer_config.json": config, "special_tokens_map.json": special_map}
    for name, content in files.items():
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")
    return out


def tiny_config(vocab_size: int = VOCAB_SIZE) -> Qwen2Config:
    """The tiny model's ``Qwen2Config``: hidden 128, 4 layers, 2 heads x 64, MLP 384, tied embeddings."""
    from transformers import Qwen2Config

    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=384, tie_word_embeddings=True,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    config.head_dim = 64  # what Qwen2 attention reads; not a declared Qwen2Config field, so set it here
    return config


def _build_id(seed: int) -> str:
    """A digest of everything a build depends on: format, seed and the shipped tokenizer files."""
    digest = hashlib.sha256(f"{_BUILD_FORMAT}:{seed}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digest.update((TOKENIZER_DIR / name).read_bytes())
    return digest.hexdigest()


def _is_built(path: Path, seed: int) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("build_id") == _build_id(seed)


def build_tiny_model(out_dir: str | os.PathLike[str], seed: int = DEFAULT_SEED) -> Path:
    """Build the tiny model (random init from ``seed``) with its tokenizer into ``out_dir``.

    Saves safetensors weights, config, generation config (eos ``<|im_end|>``) and tokenizer with
    ``save_pretrained``. The same seed gives the same weights. Returns at once when ``out_dir`` already
    holds this build (a marker file records it, written last).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    if _is_built(out, seed):
        return out
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = tiny_config(len(tokenizer))
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 4 MB write needs no progress bar on the user's terminal
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    marker = {"build_id": _build_id(seed), "seed": seed, "format": _BUILD_FORMAT}
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def tiny_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the default tiny model, built on first use.

    The cache is ``cache_dir``, else ``$AGENTRL_CACHE``, else ``~/.cache/agentrl``. The model is built in
    a temporary directory and renamed into place, so concurrent first uses are safe: one rename wins and
    the others use its result.
    """
    root = Path(cache_dir or os.environ.get("AGENTRL_CACHE") or Path.home() / ".cache" / "agentrl")
    final = root.expanduser() / f"tiny-{_build_id(DEFAULT_SEED)[:16]}"
    if _is_built(final, DEFAULT_SEED):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=final.parent))
    try:
        build_tiny_model(tmp, seed=DEFAULT_SEED)
        tmp.chmod(0o755)
        if final.exists() and not _is_built(final, DEFAULT_SEED):  # damaged by hand: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_built(final, DEFAULT_SEED):  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
