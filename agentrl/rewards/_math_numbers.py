"""Plain numbers: digit grouping and the decimal mark by locale, then exact comparison with fractions.

The decimal mark is chosen per env or task (``decimal=``):

``"point"``
    ``.`` is the decimal mark; ``1,000`` and ``1 000`` are a thousand (groups of exactly three digits).
``"comma"``
    ``,`` is the decimal mark; ``1.000``, ``1 000`` are a thousand, ``1,5`` is one and a half.
``"auto"`` (the default)
    As ``"point"``; besides, a comma between digits that cannot be grouping (``2,74``, ``1000,99``) is read
    as a decimal comma, but only in the *prediction* and only when the reference is a number written with a
    decimal point. The reference then says a non-integer was asked, so the list reading (2 and 74) could not
    be right anyway.

Never read as one number, in any mode: a comma followed by a space (``32, 349`` is a pair: "1,000" is
grouped without spaces, lists are written with them) and irregular groups (``1,23,4567``). So "32, 349"
never equals 32349, nor "(32, 349)" the grouped "32,349": a false negative at worst, never a wrong answer
paid.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "DECIMAL_MARKS",
    "decimal_comma_reading",
    "numbers_equal",
    "places",
    "regroup",
    "rounding_tolerance",
    "to_fraction",
]

DECIMAL_MARKS = ("auto", "point", "comma")
"""The decimal-mark policies :func:`regroup` knows."""

_SIGN = r"(?P<sign>[-+]?)"
_POINT_GROUPED = re.compile(rf"^{_SIGN}(?P<int>\d{{1,3}}(?:(?:,\d{{3}})+|(?: \d{{3}})+))(?P<frac>\.\d+)?$")
_COMMA_GROUPED = re.compile(rf"^{_SIGN}(?P<int>\d{{1,3}}(?:(?:\.\d{{3}})+|(?: \d{{3}})+))(?P<frac>,\d+)?$")
_COMMA_DECIMAL = re.compile(rf"^{_SIGN}(?P<int>\d+),(?P<frac>\d+)$")


def regroup(text: str, decimal: str) -> str:
    """A whole answer that is one grouped number, or a decimal-comma number in ``"comma"`` mode, written
    plainly (``1,000`` -> ``1000``, ``1.234,5`` -> ``1234.5``); any other text unchanged."""
    text = text.strip()
    if decimal == "comma":
        match = _COMMA_GROUPED.match(text)
        if match:
            frac = (match.group("frac") or "").replace(",", ".")
            return match.group("sign") + re.sub(r"[. ]", "", match.group("int")) + frac
        match = _COMMA_DECIMAL.match(text)
        return f"{match.group('sign')}{match.group('int')}.{match.group('frac')}" if match else text
    match = _POINT_GROUPED.match(text)
    if match:
        return match.group("sign") + re.sub(r"[, ]", "", match.group("int")) + (match.group("frac") or "")
    return text


def decimal_comma_reading(text: str) -> str | None:
    """``"auto"`` mode's decimal-comma reading of an answer such as ``2,74`` (``"2.74"``), or None when the
    answer is not one (``1,000`` is grouping; ``2, 74`` is a pair)."""
    match = _COMMA_DECIMAL.match(text.strip())
    if match is None or _POINT_GROUPED.match(text.strip()):
        return None
    return f"{match.group('sign')}{match.group('int')}.{match.group('frac')}"


# ---- exact numbers -------------------------------------------------------------------------------------
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(rf"^(?P<n>{_NUM})(?:(?:e|E|\\times10\^|\\cdot10\^|\*10\^)\{{?(?P<e>[-+]?\d+)\}}?)?$")
_FRAC = re.compile(r"^(?P<sign>-?)(?P<whole>\d+)?\\frac\{?(?P<a>-?\d+)\}?\{?(?P<b>-?\d+)\}?$")
_SLASH = re.compile(rf"^(?P<a>{_NUM})/(?P<b>{_NUM})$")


def places(text: str) -> int:
    """Decimal places of the numbers written in ``text`` (the fewest, where several): 0 when none has any."""
    found = [len(m.group(1)) for m in re.finditer(r"\d\.(\d+)", text)]
    return min(found) if found else 0


def to_fraction(s: str) -> tuple[Fraction, int] | None:
    """``(value, places)`` for a normalized plain number (no grouping left), or None; ``places`` counts the
    decimal places of decimal notation (0 for integers, fractions, and ``5.``)."""
    s = s.lstrip("+")
    if s.startswith("(") and s.endswith(")") and "," not in s:
        s = s[1:-1]
    match = _PLAIN.match(s)
    if match:
        if len(match.group("e") or "") > 4:
            return None
        value = Fraction(match.group("n")) * Fraction(10) ** int(match.group("e") or 0)
        return value, places(match.group("n"))
    match = _FRAC.match(s)
    if match and int(match.group("b")) != 0:
        value = Fraction(int(match.group("a")), int(match.group("b")))
        if match.group("whole"):  # a mixed number: 2\frac{1}{2} is 5/2
            value = int(match.group("whole")) + value
        return (-value if match.group("sign") else value), 0
    match = _SLASH.match(s)
    if match and Fraction(match.group("b")) != 0:
        return Fraction(match.group("a")) / Fraction(match.group("b")), places(s)
    return None


def rounding_tolerance(gold_places: int, pred_places: int, magnitude: float) -> float:
    """How far a decimal may be from the exact value it stands for: it must round to it (half a unit in its
    last place) and lie within 1e-6 of it relatively, as math-verify rounds to 6 places; 0 between exact
    numbers."""
    written = [p for p in (gold_places, pred_places) if p]
    if not written:
        return 0.0
    return min(0.5 * 10.0 ** -min(written), 1e-6 * max(1.0, magnitude))


def numbers_equal(gold: tuple[Fraction, int], pred: tuple[Fraction, int], g_pct: bool, p_pct: bool) -> bool:
    """Exact equality, except that a decimal stands for what it rounds to (``0.333333`` is 1/3, ``0.33`` is
    not, ``1234567.5`` is not 1234567) and a percentage may be written as a fraction (``50%`` is 50 and 0.5)."""

    def close(a: Fraction, b: Fraction) -> bool:
        return a == b or abs(a - b) <= rounding_tolerance(gold[1], pred[1], float(abs(a)))

    g, p = gold[0], pred[0]
    if g_pct != p_pct:
        return close(g, p) or (close(g / 100, p) if g_pct else close(g, p / 100))
    return close(g, p)
