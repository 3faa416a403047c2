"""Text that any encoder accepts: lone surrogates out of strings that came from untrusted input.

A Python ``str`` can hold the code points U+D800–U+DFFF, which are not Unicode scalar values: UTF-8 encoders
(files, tokenizers, HTTP clients) refuse them. A model produces one by writing a JSON escape such as
``"\\ud800"`` in a tool call. :mod:`agentrl.tools` is where model text becomes Python values and tool
messages, so it replaces them there by U+FFFD (:func:`valid_text`, :func:`valid_json`); a
:class:`~agentrl.data.trajectory.Trajectory` does the same on construction for text from anywhere else (a
user env, an exception). The JSON and HTML writers escape any that reach them regardless
(:func:`escape_surrogates`), so writing never fails.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REPLACEMENT", "escape_surrogates", "has_surrogates", "valid_json", "valid_text"]

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with every surrogate code point replaced by U+FFFD, as a UTF-8 decoder does for bad bytes."""
    return _SURROGATE.sub(REPLACEMENT, text) if _SURROGATE.search(text) else text


def has_surrogates(value: Any) -> bool:
    """Whether any string (or key) in a JSON-like value holds a surrogate code point."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, (list, tuple)):
        return any(has_surrogates(item) for item in value)
    if isinstance(value, dict):
        return any(has_surrogates(key) or has_surrogates(item) for key, item in value.items())
    return False


def valid_json(value: Any) -> Any:
    """A decoded JSON value with :func:`valid_text` applied to every string and key (others unchanged)."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [valid_json(item) for item in value]
    if isinstance(value, tuple):
        return tuple(valid_json(item) for item in value)
    if isinstance(value, dict):
        return {valid_json(key): valid_json(item) for key, item in value.items()}
    return value


def escape_surrogates(text: str) -> str:
    """Each surrogate code point written as the escape ``\\udXXX``: lossless inside a JSON string (it reads
    back as the same code point) and visible in HTML; the result encodes as UTF-8."""
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
