"""Tiny tokenizers that carry real model families' chat templates (tests/data/templates/), built locally.

Each is the tiny byte-level BPE tokenizer with the family's special tokens added and its template set, saved
to a directory and loaded back through ``AutoTokenizer.from_pretrained``, as a downloaded model's would be.
The templates are the files those models ship (llama.cpp's models/templates/ keeps copies; see README.md
there), reproduced verbatim.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "data" / "templates"

# family: (template file, special tokens, eos, bos)
# fmt: off
FAMILIES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", [], "<|im_end|>", None),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", ["<think>", "</think>"], "<|im_end|>", None),
    "qwen3-coder": ("Qwen-Qwen3-Coder.jinja", [], "<|im_end|>", None),
    "llama3.1": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
         "<|python_tag|>"],
        "<|eot_id|>", "<|begin_of_text|>",
    ),
    "mistral": (
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        "</s>", "<s>",
    ),
    "gpt-oss": (
        "openai-gpt-oss-120b.jinja",
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"],
        "<|return|>", None,
    ),
}
# fmt: on


def family_tokenizer_dir(family: str, out: Path) -> Path:
    """Save the tiny tokenizer with ``family``'s chat template and special tokens to ``out``."""
    from transformers import AutoTokenizer

    from agentrl.models.tiny import TOKENIZER_DIR

    template, specials, eos, bos = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *specials]})
    tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    return out


def family_tokenizer(family: str, out: Path):
    """:func:`family_tokenizer_dir`, loaded back with ``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family_tokenizer_dir(family, out))
