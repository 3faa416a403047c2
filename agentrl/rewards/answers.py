"""Final-answer extraction from model text: ``\\boxed{}``, ``<answer>…</answer>``, ``#### N``, a final number.

Pure string functions (no sympy): environments use them to check the required format, and the verifier uses
them to find the answer inside a whole solution. Each returns None when its format is absent.
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWER_FORMATS",
    "extract_answer",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_number",
    "extract_hashes",
]

ANSWER_FORMATS = ("boxed", "answer_tag", "hashes", "number", "any")
"""The formats :func:`extract_answer` knows; ``any`` tries them in that order."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
# A number as people write it: sign, thousands separators, decimals, a fraction a/b, an exponent.
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?(?:[eE][-+]?\d+)?%?")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == "{"`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "\\":
            continue
        if char == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif char == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``, or ``\\boxed 5``), nested braces included.

    Returns:
        The content, stripped; None when there is no complete box.
    """
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            i = start + len(command)
            while i < len(text) and text[i] == " ":
                i += 1
            content: str | None = None
            if i < len(text) and text[i] == "{":
                group = _braced(text, i)
                content = group[0] if group else None
            elif i > start + len(command) and i < len(text):  # "\boxed 5": one token after a space
                match = re.match(r"[^\s$]+", text[i:])
                content = match.group(0) if match else None
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content.strip())
                break
            start = text.rfind(command, 0, start)
    return best[1] if best else None


def extract_answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` pair, stripped; None when there is none."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def extract_hashes(text: str) -> str | None:
    """What follows the last ``####`` on its line (GSM8K's answer marker), stripped; None when absent."""
    matches = _HASHES.findall(text)
    return matches[-1].strip() if matches else None


def extract_final_number(text: str) -> str | None:
    """The last number in the text (``-1,234.5``, ``3/4``, ``1e-3``, ``$5``, ``20%``) as written, without a
    dollar sign or trailing period; None when the text holds no digit."""
    numbers = [m.group(0) for m in _NUMBER.finditer(text) if any(c.isdigit() for c in m.group(0))]
    return numbers[-1].replace("$", "") if numbers else None


def extract_answer(text: str, fmt: str = "any") -> str | None:
    """Extract the final answer in the given format.

    Args:
        text: The model's answer or whole solution.
        fmt: One of :data:`ANSWER_FORMATS`: ``boxed``, ``answer_tag``, ``hashes``, ``number``, or ``any``
            (the first of those found, in that order).

    Returns:
        The answer text, or None when the format is absent.

    Raises:
        ValueError: An unknown ``fmt``.
    """
    extractors = {
        "boxed": extract_boxed,
        "answer_tag": extract_answer_tag,
        "hashes": extract_hashes,
        "number": extract_final_number,
    }
    if fmt == "any":
        for extractor in extractors.values():
            found = extractor(text)
            if found is not None:
                return found
        return None
    if fmt not in extractors:
        raise ValueError(f"unknown answer format {fmt!r}; choose one of {list(ANSWER_FORMATS)}")
    return extractors[fmt](text)
