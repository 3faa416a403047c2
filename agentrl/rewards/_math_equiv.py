"""Answer equivalence, the part that runs inside the verifier's worker processes.

:func:`equivalent` layers cheap, exact rules in front of math-verify:

1. find the final answer in each text (:mod:`agentrl.rewards._math_extract`: the last box run, tag, ``####``
   or "final answer" phrase; then "the answer is …"; then the last math);
2. normalize the LaTeX people and models write differently (``\\dfrac``, ``\\left(``, ``\\!``, units, ``\\$``,
   ``^\\circ``, ``1{,}000``, ``x =`` outside braces, ``\\text{(A)}``, ``\\sqrt[3]8``) and compare the strings;
3. decide multiple-choice letters, words and plain numbers exactly (digit grouping and the decimal mark by
   :mod:`agentrl.rewards._math_numbers`), then arithmetic, lists, intervals and matrices without sympy
   (:mod:`agentrl.rewards._math_fast`);
4. only what is left goes to math-verify, on the normalized answers wrapped as LaTeX math, and as equations.

Where a text has two readings (``\\sqrt12``, ``32, 349``) the reading that could pay a wrong answer loses.
math-verify and sympy are imported on first use; the worker runs them without their ``signal.alarm``
timeouts, under one deadline of its own (see :mod:`agentrl.rewards._math_worker`).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

from agentrl.rewards._math_extract import chosen_letter, final_answer, is_prose
from agentrl.rewards._math_fast import fast_equal
from agentrl.rewards._math_numbers import decimal_comma_reading, numbers_equal, regroup, to_fraction

__all__ = ["ANSWER_MODES", "Normal", "equivalent", "normalize"]

ANSWER_MODES = ("math", "choice")
"""``math``: any answer (a gold letter A–E is still read as a choice, from an answer phrase, a box or a bare
letter); ``choice``: multiple choice, the gold is a letter (``C``, ``(C) 12``) and the chosen letter is found in
free text too ("I pick C."); a text naming several letters last ("A or C") scores 0 in both."""

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
_LHS_PREFIX = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?\s*=\s*)(.*)$", re.DOTALL)
# "\sqrt12", "\frac123": LaTeX takes one digit per argument; whoever wrote it may have meant them all.
_UNBRACED_DIGITS = re.compile(r"(\\sqrt\s*(?:\[[^\]]*\])?\s*|\\[dt]?frac\s*\d)(\d)(\d+)")
_SQRT_TOKEN = re.compile(r"\\sqrt\s*(\[[^\]]*\])?\s*([0-9A-Za-z])(?![0-9A-Za-z])")
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
    """``x = 5`` -> ``5``; ``a = 1 = 2`` -> ``2`` (math-verify reads a chain by its last part). Only an
    ``=`` outside braces and brackets counts: ``\\sum_{k=0}^{n} k`` has no left-hand side."""
    parts = [part for part in _split_top(text, "=")]
    if len(parts) > 2:
        return parts[-1].strip()
    if len(parts) == 2 and _SIMPLE_LHS.match(parts[0]):
        return parts[1].strip()
    return text


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets and braces (an ``=`` only where it is an equals sign, not in
    ``<=``, ``==`` or ``\\ne=``)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == sep and depth == 0:
            if sep == "=" and (text[i - 1 : i] in ("<", ">", "!", "\\", "=") or text[i + 1 : i + 2] == "="):
                continue
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_plus_minus(text: str) -> str:
    """``a \\pm b`` -> ``a+b, a-b`` when the answer is a single expression with one ``\\pm``."""
    if text.count("\\pm") != 1 or "," in text:
        return text
    return f"{text.replace(chr(92) + 'pm', '+')}, {text.replace(chr(92) + 'pm', '-')}"


class Normal(NamedTuple):
    """An answer in canonical string form."""

    text: str
    flags: frozenset[str]
    """Notations removed on the way (``percent``, ``degrees``, ``text``, ``dollars``): they decide how numbers
    compare."""
    decimal_comma: str | None = None
    """The ``"auto"`` mode's decimal-comma reading (``2,74`` -> ``2.74``), when the answer allows one."""


def _regroup(text: str, decimal: str) -> str:
    """Digit grouping and the decimal mark written plainly, also after a simple ``x =``."""
    lhs = _LHS_PREFIX.match(text)
    return lhs.group(1) + regroup(lhs.group(2), decimal) if lhs else regroup(text, decimal)


@functools.lru_cache(maxsize=4096)
def normalize(text: str, assignments: bool = True, decimal: str = "auto") -> Normal:
    """The canonical string form of an answer; ``assignments`` drops ``x =`` prefixes; ``decimal`` is the
    decimal-mark policy of :mod:`agentrl.rewards._math_numbers`. List items are separated by ", "."""
    flags: set[str] = set()
    s = _strip_math_delimiters(text)
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\[dt]binom", r"\\binom", s)
    s = _SQRT_TOKEN.sub(lambda m: f"\\sqrt{m.group(1) or ''}{{{m.group(2)}}}", s)
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
    s = _regroup(re.sub(r"\s+", " ", s), decimal)
    comma = decimal_comma_reading(s) if decimal == "auto" else None
    if assignments:
        s = ", ".join(_strip_assignment(part) for part in _split_top(s))
    s = _expand_plus_minus(s)
    base = _BASE.match(s)
    if base:
        s = base.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*([,=+\-*/^_(){}\[\]<>&])\s*|\s+(?=\\)", r"\1", s).replace(",", ", ")
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[\d({])", r"\1", s)  # "\times 10" -> "\times10"
    if re.fullmatch(r"\{[^{}]*\}", s):  # "{12}" -> "12", never "\{1,2\}"
        s = s[1:-1]
    return Normal(s, frozenset(flags), comma)


# ---- the comparison ------------------------------------------------------------------------------------
def _gold_letter(text: str, normal: str) -> str | None:
    """The letter of a gold answer that is a choice (``C``, ``(C)``, ``\\text{(C)}``, ``(C) 12``)."""
    for candidate in (text.strip(), normal, _unwrap_style(_strip_math_delimiters(text)).strip()):
        match = _CHOICE.match(candidate) or re.match(r"^\(([A-E])\)\s", candidate)
        if match and not re.fullmatch(r"[a-e]", normal):  # a lone "a" may be a variable
            return match.group(1).upper()
    return None


def _words(text: str) -> str | None:
    """Lower-cased words when the answer is words (``\\text{Monday}``, ``even``), else None."""
    plain = _unwrap_style(_strip_math_delimiters(text)).strip().rstrip(".").strip()
    if re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", plain) and (len(plain) >= 3 or "\\text" in text or " " in plain):
        return " ".join(plain.lower().split())
    return None


def _same_lhs(g_text: str, p_text: str) -> bool:
    """Both answers assign to the same name (``y = …``), so their right-hand sides decided already."""
    g_lhs, p_lhs = _LHS_PREFIX.match(_strip_math_delimiters(g_text)), _LHS_PREFIX.match(_strip_math_delimiters(p_text))
    return bool(g_lhs and p_lhs and g_lhs.group(1).replace(" ", "") == p_lhs.group(1).replace(" ", ""))


def equivalent(gold: str, pred: str, mode: str = "math", decimal: str = "auto") -> bool:
    """Whether ``pred`` states the same answer as ``gold`` (both may be bare answers or whole solutions).

    Args:
        gold: The reference answer.
        pred: The prediction.
        mode: One of :data:`ANSWER_MODES`.
        decimal: One of :data:`agentrl.rewards._math_numbers.DECIMAL_MARKS`.
    """
    if mode == "choice":
        g_letter = chosen_letter(gold, strict=False)
        return g_letter is not None and chosen_letter(pred, strict=False) == g_letter
    g_text, p_text = final_answer(gold), final_answer(pred)
    if not g_text.strip() or not p_text.strip():
        return False
    g, p = normalize(g_text, decimal=decimal), normalize(p_text, decimal=decimal)
    if not g.text or not p.text:
        return False
    g_letter = _gold_letter(g_text, g.text)
    if g_letter is not None:
        return chosen_letter(pred) == g_letter
    if _UNBRACED_DIGITS.search(p_text):  # "\sqrt12": paid only if right under both readings
        readings = (_UNBRACED_DIGITS.sub(r"\1{\2}\3", p_text), _UNBRACED_DIGITS.sub(r"\1{\2\3}", p_text))
        return all(equivalent(gold, reading, mode, decimal) for reading in readings)
    if g.text == p.text:
        return True
    g_words, p_words = _words(g_text), _words(p_text)
    if g_words is not None and p_words is not None:
        return g_words == p_words
    g_num, p_num = to_fraction(g.text), to_fraction(p.text)
    if g_num is not None and p_num is None and p.decimal_comma and g_num[1]:  # see _math_numbers
        p_num = to_fraction(p.decimal_comma)
    if g_num is not None and p_num is not None:
        return numbers_equal(g_num, p_num, "percent" in g.flags, "percent" in p.flags)
    verdict = fast_equal(g.text, p.text)
    if verdict or (verdict is None and _math_verify(g.text, p.text)):
        return True
    if "=" in g_text + p_text and not _same_lhs(g_text, p_text):  # equations compare as equations
        g_eq = normalize(g_text, assignments=False, decimal=decimal).text
        p_eq = normalize(p_text, assignments=False, decimal=decimal).text
        if (g_eq, p_eq) != (g.text, p.text) and _math_verify(g_eq, p_eq):
            return True
    if verdict is False:
        return False
    # math-verify's own LaTeX extraction, on the raw texts, catches answers our rules read but could not parse.
    prose = (g_text != gold.strip() and is_prose(gold)) or (p_text != pred.strip() and is_prose(pred))
    return prose and _math_verify(gold, pred, wrap=False)


# ---- math-verify ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _parse(text: str, wrap: bool) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if wrap and "$" not in text and "\\(" not in text and "\\[" not in text:
        text = f"${text}$"
    configs: list[Any] = [LatexExtractionConfig(boxed_match_priority=0)]
    if wrap:  # on raw prose, reading bare numbers ("32, 349" as 349) is ours to do, not math-verify's
        configs.append(ExprExtractionConfig())
    return tuple(parse(text, configs, parsing_timeout=None))  # type: ignore[arg-type]


def _math_verify(gold: str, pred: str, wrap: bool = True) -> bool:
    from math_verify import verify

    g, p = _parse(gold, wrap), _parse(pred, wrap)
    if not g or not p:
        return False
    return bool(verify(list(g), list(p), timeout_seconds=None, allow_set_relation_comp=True))
