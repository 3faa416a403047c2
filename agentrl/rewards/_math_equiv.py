"""Answer equivalence, the part that runs inside the verifier's worker processes.

:func:`equivalent` layers cheap, exact rules in front of math-verify:

1. find the final answer in each text (``\\boxed{}``, ``<answer>``, ``####``, "the answer is …", the last math);
2. normalize the LaTeX people and models write differently (``\\dfrac``, ``\\left(``, ``\\!``, units, ``\\$``,
   ``^\\circ``, ``1{,}000``, ``x =``, ``\\text{(A)}``) and compare the strings;
3. decide multiple-choice letters, words and plain numbers (fractions, decimals, percentages, thousands
   separators, scientific notation) exactly, with rational arithmetic;
4. otherwise ask math-verify, on the normalized answers wrapped as LaTeX math and on the raw texts.

math-verify and sympy are imported on first use; the worker runs them without their ``signal.alarm``
timeouts, under one deadline of its own (see :mod:`agentrl.rewards._math_worker`).
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Any

from agentrl.rewards.answers import extract_answer_tag, extract_boxed, extract_hashes

__all__ = ["equivalent", "final_answer", "normalize"]

# ---- finding the final answer --------------------------------------------------------------------------
_FINAL_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*(?::)?\s*(.+?)(?:\.\s*I hope|\.?\s*$|\.\s+[A-Z]|\n)",
    re.IGNORECASE | re.DOTALL,
)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_WORD = re.compile(r"(?<![\\a-zA-Z])[A-Za-z]{2,}")
_CHAT_JUNK = re.compile(r"<\|im_(?:start|end)\|>.*$|<\|endoftext\|>.*$", re.DOTALL)


def _is_prose(text: str) -> bool:
    """True for text that reads as sentences rather than a bare answer (several words outside math)."""
    outside = _MATH_SEGMENT.sub(" ", text)
    outside = re.sub(r"\\text\w*\{[^{}]*\}|\\[A-Za-z]+", " ", outside)
    return len(_WORD.findall(outside)) >= 3


def final_answer(text: str) -> str:
    """The final answer inside ``text``, or ``text`` itself when it already is a bare answer."""
    text = _CHAT_JUNK.sub("", text).strip()
    for extract in (extract_boxed, extract_answer_tag, extract_hashes):
        found = extract(text)
        if found:
            return found
    if not _is_prose(text):
        return text
    phrases = _FINAL_PHRASE.findall(text)
    if phrases:
        return phrases[-1].strip()
    segments = [next(g for g in m.groups() if g is not None) for m in _MATH_SEGMENT.finditer(text)]
    if segments:
        return segments[-1].strip()
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?", text)
    return numbers[-1].rstrip(",") if numbers else text


# ---- normalization -------------------------------------------------------------------------------------
_UNICODE = {"−": "-", "–": "-", "π": "\\pi ", "°": "^\\circ", "×": "\\times ", "≤": "\\le ", "≥": "\\ge ",
            "∞": "\\infty ", "√": "\\sqrt", "·": "\\cdot ", "≠": "\\ne "}
_STYLE = re.compile(r"\\(?:textbf|mathbf|mathrm|textnormal|mbox|textit|mathit|text|operatorname|mathsf)\s*\{")
_DROP = re.compile(r"\\(?:displaystyle|left|right|big|Big|bigg|Bigg)(?![A-Za-z])|\\[,;:!]|\\q?quad|(?<!\\)\\(?=\s)|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\s*\bdegrees?\b", re.IGNORECASE)
_PERCENT = re.compile(r"\\?%|\s*\b(?:percent(?:age)?|pct)\b", re.IGNORECASE)
_DOLLAR = re.compile(r"\\\$|\$|\s*\bdollars?\b|€|£")
_UNIT_TEXT = re.compile(r"\\text\{\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?[23]\}?)?")
# "5 cm", "15 dollars", "60 miles per hour": a plain number, a space, then only words (never "3x").
_TRAILING_WORDS = re.compile(r"^(-?[\d.,/]*\d)\s+[A-Za-z]+(?:[\s/]+[A-Za-z]+)*\.?(?:\s*\^\s*\{?[23]\}?)?$")
_CONNECTIVE = re.compile(r"\\text\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+", re.IGNORECASE)
_ASSIGN = re.compile(r"(?<![<>!\\=])=(?!=)")
_SIMPLE_LHS = re.compile(
    r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\text\{[^{}]*\}|[A-Za-z]\([A-Za-z]\)|\\[A-Za-z]+|\([A-Za-z](?:\s*,\s*[A-Za-z])*\))\s*$"
)
_BASE = re.compile(r"^(\d+)_\{?(\d+)\}?$")
_CHOICE = re.compile(r"^\(?\s*([A-Ea-e])\s*\)?[.:]?$")


def _unwrap_style(text: str) -> str:
    """``\\text{(A)}`` -> ``(A)`` and likewise for bold, roman and other style commands (nested braces ok)."""
    while True:
        match = _STYLE.search(text)
        if not match:
            return text
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        inner = text[match.end() : end - 1] if depth == 0 else text[match.end() :]
        text = text[: match.start()] + inner + text[end:]


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            return text[len(left) : len(text) - len(right)].strip()
    return text


def _strip_assignment(text: str) -> str:
    """``x = 5`` -> ``5``; ``a = 1 = 2`` -> ``2`` (math-verify reads a chain by its last part)."""
    parts = _ASSIGN.split(text)
    if len(parts) > 2:
        return parts[-1].strip()
    if len(parts) == 2 and _SIMPLE_LHS.match(parts[0]):
        return parts[1].strip()
    return text


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_plus_minus(text: str) -> str:
    """``a \\pm b`` -> ``a+b, a-b`` when the answer is a single expression with one ``\\pm``."""
    if text.count("\\pm") != 1 or "," in text:
        return text
    return f"{text.replace(chr(92) + 'pm', '+')}, {text.replace(chr(92) + 'pm', '-')}"


@functools.lru_cache(maxsize=4096)
def normalize(text: str, assignments: bool = True) -> tuple[str, frozenset[str]]:
    """Canonical string form of an answer and the notations removed on the way (``percent``, ``degrees``,
    ``text``, ``dollars``), which decide how numbers compare. ``assignments`` drops ``x =`` prefixes."""
    flags: set[str] = set()
    s = _strip_math_delimiters(text)
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\[dt]binom", r"\\binom", s)
    s = s.replace("{,}", ",").replace("\\varnothing", "\\emptyset").replace("\\{\\}", "\\emptyset")
    s = s.replace("\\neq", "\\ne").replace("\\geq", "\\ge").replace("\\leq", "\\le")
    s = s.replace("**", "^").replace(">=", "\\ge ").replace("<=", "\\le ").replace("!=", "\\ne ")
    s = _DROP.sub("", s)
    s = _CONNECTIVE.sub(", ", s)
    if _STYLE.search(s):
        flags.add("text")
        s = _UNIT_TEXT.sub("", s) if re.search(r"[\d)}]", _UNIT_TEXT.sub("", s)) else s
        s = _unwrap_style(s)
    for name, pattern in (("degrees", _DEGREES), ("percent", _PERCENT), ("dollars", _DOLLAR)):
        s, count = pattern.subn("", s)
        if count:
            flags.add(name)
    s = s.strip().rstrip(".").strip()
    words = _TRAILING_WORDS.match(s)
    if words:
        s = words.group(1).strip()
    if assignments:
        s = ", ".join(_strip_assignment(part) for part in _split_top(s))
    s = _expand_plus_minus(s)
    base = _BASE.match(s)
    if base:
        s = base.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*([,=+\-*/^_(){}\[\]<>])\s*", r"\1", s)
    if re.fullmatch(r"\{[^{}]*\}", s):  # "{12}" -> "12", never "\{1,2\}"
        s = s[1:-1]
    return s, frozenset(flags)


# ---- exact numbers -------------------------------------------------------------------------------------
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(rf"^(?P<n>{_NUM})(?:(?:e|E|\\times10\^|\\cdot10\^|\*10\^)\{{?(?P<e>-?\d+)\}}?)?$")
_FRAC = re.compile(r"^(?P<sign>-?)(?P<whole>\d+)?\\frac\{?(?P<a>-?\d+)\}?\{?(?P<b>-?\d+)\}?$")
_SLASH = re.compile(rf"^(?P<a>{_NUM})/(?P<b>{_NUM})$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def to_fraction(s: str) -> tuple[Fraction, bool] | None:
    """``(value, inexact)`` for a normalized plain number, or None; ``inexact`` marks decimal notation."""
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = s.lstrip("+")
    if s.startswith("(") and s.endswith(")") and "," not in s:
        s = s[1:-1]
    match = _PLAIN.match(s)
    if match:
        value = Fraction(match.group("n")) * Fraction(10) ** int(match.group("e") or 0)
        return value, "." in match.group("n")
    match = _FRAC.match(s)
    if match and int(match.group("b")) != 0:
        value = Fraction(int(match.group("a")), int(match.group("b")))
        if match.group("whole"):  # a mixed number: 2\frac{1}{2} is 5/2
            value = int(match.group("whole")) + value
        return (-value if match.group("sign") else value), False
    match = _SLASH.match(s)
    if match and Fraction(match.group("b")) != 0:
        return Fraction(match.group("a")) / Fraction(match.group("b")), "." in s
    return None


def _numbers_equal(gold: tuple[Fraction, bool], pred: tuple[Fraction, bool], g_pct: bool, p_pct: bool) -> bool:
    def close(a: Fraction, b: Fraction) -> bool:
        if a == b:
            return True
        # A decimal stands for what it rounds: 0.333333 is 1/3, as math-verify rounds floats to 6 places.
        return (gold[1] or pred[1]) and abs(a - b) <= Fraction(1, 10**6) * max(Fraction(1), abs(a))

    g, p = gold[0], pred[0]
    if g_pct != p_pct:  # "50%" matches "50" and "0.5"
        return close(g, p) or (close(g / 100, p) if g_pct else close(g, p / 100))
    return close(g, p)


# ---- the comparison ------------------------------------------------------------------------------------
def _choice(text: str) -> str | None:
    match = _CHOICE.match(text.strip())
    if match:
        return match.group(1).upper()
    match = re.match(r"^\(([A-E])\)\s", text.strip())
    return match.group(1) if match else None


def _words(text: str) -> str | None:
    """Lower-cased words when the answer is words (``\\text{Monday}``, ``even``), else None."""
    plain = _unwrap_style(_strip_math_delimiters(text)).strip().rstrip(".").strip()
    if re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", plain) and (len(plain) >= 4 or "\\text" in text or " " in plain):
        return " ".join(plain.lower().split())
    return None


def equivalent(gold: str, pred: str) -> bool:
    """Whether ``pred`` states the same answer as ``gold`` (both may be bare answers or whole solutions)."""
    g_text, p_text = final_answer(gold), final_answer(pred)
    if not g_text.strip() or not p_text.strip():
        return False
    (g, g_flags), (p, p_flags) = normalize(g_text), normalize(p_text)
    if not g or not p:
        return False
    if g == p:
        return True
    g_choice = _choice(g_text) or _choice(g)
    if g_choice is not None and not re.fullmatch(r"[a-e]", g):
        p_choice = _choice(p_text) or _choice(p)
        return p_choice == g_choice
    g_words, p_words = _words(g_text), _words(p_text)
    if g_words is not None and g_words == p_words:
        return True
    g_num, p_num = to_fraction(g), to_fraction(p)
    if g_num is not None and p_num is not None:
        return _numbers_equal(g_num, p_num, "percent" in g_flags, "percent" in p_flags)
    if _math_verify(g, p):
        return True
    if "=" in g_text + p_text:  # equations compare as equations, not by their right-hand sides
        g_eq, p_eq = normalize(g_text, assignments=False)[0], normalize(p_text, assignments=False)[0]
        if (g_eq, p_eq) != (g, p) and _math_verify(g_eq, p_eq):
            return True
    # math-verify's own extraction, on the raw texts, catches answers our rules read wrongly.
    prose = (g_text != gold.strip() and _is_prose(gold)) or (p_text != pred.strip() and _is_prose(pred))
    return prose and _math_verify(gold, pred, wrap=False)


# ---- math-verify ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _parse(text: str, wrap: bool) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if wrap and "$" not in text and "\\(" not in text and "\\[" not in text:
        text = f"${text}$"
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse(text, configs, parsing_timeout=None))  # type: ignore[arg-type]


def _math_verify(gold: str, pred: str, wrap: bool = True) -> bool:
    from math_verify import verify

    g, p = _parse(gold, wrap), _parse(pred, wrap)
    if not g or not p:
        return False
    return bool(verify(list(g), list(p), timeout_seconds=None, allow_set_relation_comp=True))
