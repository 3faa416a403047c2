"""A fast, sympy-free decision for the common answers: arithmetic in LaTeX and lists of it.

:func:`fast_equal` reads a normalized answer (see :func:`agentrl.rewards._math_equiv.normalize`) as an
expression over numbers, ``\\frac``, ``\\sqrt``, ``\\pi``, powers, a few functions and single-letter variables,
or as a list, tuple, interval or set of such expressions, and compares by value: constants exactly up to
float rounding, expressions with variables at several random points in (0.5, 2.5) (two different rational
functions agree on random points with probability zero). It answers None, and math-verify decides, for
anything else: equations, inequalities, words, capitals, subscripts, factorials, ``\\log``, ambiguous ``2^10``,
mixed bracket kinds. Matrices compare cell by cell. ``e`` is Euler's number and ``i`` the imaginary unit, as math-verify reads them.
"""

from __future__ import annotations

import cmath
import functools
import math
import operator
import random
import re
from collections.abc import Callable

from agentrl.rewards._math_numbers import places, rounding_tolerance

__all__ = ["fast_equal"]

Fn = Callable[[dict[str, complex]], complex]
_TOKEN = re.compile(r"\s*(\d+\.?\d*|\.\d+|\\[A-Za-z]+|[A-Za-z]|[-+*/^(){}\[\],|!_=<>&:;'\\])")
_FUNCTIONS: dict[str, Callable[[complex], complex]] = {
    "\\sin": cmath.sin, "\\cos": cmath.cos, "\\tan": cmath.tan, "\\ln": cmath.log, "\\exp": cmath.exp,
    "\\arcsin": cmath.asin, "\\arccos": cmath.acos, "\\arctan": cmath.atan,
    "\\sec": lambda x: 1 / cmath.cos(x), "\\csc": lambda x: 1 / cmath.sin(x), "\\cot": lambda x: 1 / cmath.tan(x),
}
_PLAIN_WORD = re.compile(r"(?<![\\A-Za-z])(?:[A-Za-z]{3,}|pi)(?![A-Za-z])|(?<![\\A-Za-z])[A-Za-z]{3,}")
_TIMES = ("*", "\\cdot", "\\times")
# Sample points: reals in (0.5, 2.5), except n, m, k, which count (a sum's bound), at distinct odd integers.
_POINTS = [
    {v: complex(0.5 + 2 * random.Random(f"{v}{k}").random()) for v in "abcdfghjlopqrstuvwxyz"}
    | {v: complex(11 + 6 * k + 2 * "nmk".index(v)) for v in "nmk"}
    for k in range(4)
]


def _const(value: complex) -> Fn:
    return functools.partial(_constant, complex(value))


def _constant(value: complex, env: dict[str, complex]) -> complex:
    return value


def _variable(name: str, env: dict[str, complex]) -> complex:
    return env[name]


def _apply(op: Callable[[complex, complex], complex], left: Fn, right: Fn) -> Fn:
    return functools.partial(_apply_at, op, left, right)


def _apply_at(op: Callable[[complex, complex], complex], left: Fn, right: Fn, env: dict[str, complex]) -> complex:
    return op(left(env), right(env))


def _call(function: Callable[[complex], complex], operand: Fn) -> Fn:
    return functools.partial(_call_at, function, operand)


def _call_at(function: Callable[[complex], complex], operand: Fn, env: dict[str, complex]) -> complex:
    return function(operand(env))


Values = tuple[list[complex], int]
"""An item's values at the sample points, and the decimal places it is written with (0: exact)."""


def _series_at(is_sum: bool, index: str, low: Fn, high: Fn, body: Fn, env: dict[str, complex]) -> complex:
    start, stop = low(env), high(env)
    if abs(start.imag) > 1e-9 or abs(stop.imag) > 1e-9 or abs(start.real - round(start.real)) > 1e-9:
        raise ValueError("a sum runs over integers")
    if abs(stop.real - round(stop.real)) > 1e-9 or round(stop.real) - round(start.real) > 10_000:
        raise ValueError("a sum runs over integers")
    total = complex(0 if is_sum else 1)
    for value in range(round(start.real), round(stop.real) + 1):
        term = body({**env, index: complex(value)})
        total = total + term if is_sum else total * term
    return total


class _Unsupported(Exception):
    """The text is outside what this module reads; math-verify decides."""


class _Parser:
    """Recursive descent over the tokens of one expression."""

    def __init__(self, text: str):
        if _PLAIN_WORD.search(text):
            raise _Unsupported  # "sqrt(2)", "2pi", words: not a product of letters
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match:
                if text[pos:].strip():
                    raise _Unsupported
                break
            self.tokens.append(match.group(1))
            pos = match.end()
        self.i = 0
        self.names: set[str] = set()
        self.bound: set[str] = set()  # indices of the sums being read

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Unsupported
        self.i += 1
        return token

    def parse(self) -> Fn:
        fn = self.expr()
        if self.peek() is not None:
            raise _Unsupported
        return fn

    def expr(self) -> Fn:
        fn = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            fn = _apply(operator.add if op == "+" else operator.sub, fn, self.term())
        return fn

    def term(self) -> Fn:
        fn = self.unary()
        while True:
            token = self.peek()
            if token in _TIMES or token == "/" or token == "\\div":
                self.take()
                fn = _apply(operator.truediv if token in ("/", "\\div") else operator.mul, fn, self.unary())
            elif token is not None and self._starts_primary(token):
                previous = self.tokens[self.i - 1]
                if previous[0].isdigit() and (token[0].isdigit() or token in ("\\frac", "\\dfrac", "\\tfrac")):
                    raise _Unsupported  # "2 3" is no product; "2\frac{1}{2}" is a mixed number, or 2 x 1/2
                fn = _apply(operator.mul, fn, self.power())
            else:
                return fn

    @staticmethod
    def _starts_primary(token: str) -> bool:
        return token[0].isalnum() or token in ("(", "{", ".") or (token.startswith("\\") and token not in _TIMES)

    def unary(self) -> Fn:
        if self.peek() in ("-", "+"):
            sign, operand = self.take(), self.unary()
            return operand if sign == "+" else _call(operator.neg, operand)
        return self.power()

    def power(self) -> Fn:
        base = self.primary()
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() == "{":
            exponent = self.group()
        else:
            token = self.peek() or ""
            if token[:1].isdigit() and len(token) > 1:
                raise _Unsupported  # "2^10": 2^1 * 0 in LaTeX, 1024 in plain text
            exponent = self.unary() if token == "-" else self.primary()
        return _apply(operator.pow, base, exponent)

    def group(self) -> Fn:
        self.take("{")
        fn = self.expr()
        self.take("}")
        return fn

    def argument(self) -> Fn:
        """A command's argument: a brace group, or one token (``\\frac12`` is 1/2)."""
        token = self.peek() or ""
        if token == "{":
            return self.group()
        if token[:1].isdigit():
            command = self.tokens[self.i - 1]
            if len(token) > 2 or (len(token) == 2 and command not in ("\\frac", "\\dfrac", "\\tfrac")):
                raise _Unsupported  # "\sqrt12", "\frac123": LaTeX reads one digit, the writer meant more
            self.take()
            if len(token) > 1:  # "\frac12": the first digit is the first argument
                self.tokens.insert(self.i, token[1:])
            return _const(float(token[0]))
        return self.primary()

    def primary(self) -> Fn:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return _const(float(token))
        if token in ("(", "{"):
            fn = self.expr()
            self.take(")" if token == "(" else "}")
            return fn
        if len(token) == 1 and token.isalpha():
            if token in self.bound:
                return functools.partial(_variable, token)
            if token in "ei":
                return _const(math.e if token == "e" else 1j)
            if not token.islower() or (token in "fgh" and self.peek() == "("):
                raise _Unsupported  # capitals (points, sets, choices) and f(x)
            self.names.add(token)
            return functools.partial(_variable, token)
        if token == "\\pi":
            return _const(math.pi)
        if token in ("\\sum", "\\prod"):
            return self._series(token)
        if token in ("\\frac", "\\dfrac", "\\tfrac"):
            top = self.argument()
            return _apply(operator.truediv, top, self.argument())
        if token == "\\sqrt":
            return self._sqrt()
        if token in _FUNCTIONS:  # "\sin x", "\tan^2 y" (the square of the tangent)
            exponent = self._function_power()
            fn = _call(_FUNCTIONS[token], self.power())
            return fn if exponent is None else _apply(operator.pow, fn, exponent)
        if token == "\\log" and self.peek() == "_":  # "\log_2 8"; a bare \log has no agreed base
            self.take()
            base = self.argument()
            return _apply(operator.truediv, _call(cmath.log, self.power()), _call(cmath.log, base))
        raise _Unsupported

    def _series(self, command: str) -> Fn:
        """``\\sum_{k=a}^{b} body`` over integer bounds; the body is one product (``\\sum_{k=1}^{n} k^2 + 1``
        could mean either grouping, so a sum followed by + or - is left to math-verify)."""
        self.take("_")
        self.take("{")
        index = self.take()
        if not (len(index) == 1 and index.isalpha()):
            raise _Unsupported
        self.take("=")
        low = self.expr()
        self.take("}")
        self.take("^")
        high = self.group() if self.peek() == "{" else self.argument()
        outer, self.bound = set(self.names), self.bound | {index}
        body = self.term()
        if self.peek() in ("+", "-"):
            raise _Unsupported
        self.bound -= {index}
        self.names = outer | {name for name in self.names if name != index}
        return functools.partial(_series_at, command == "\\sum", index, low, high, body)

    def _function_power(self) -> Fn | None:
        if self.peek() != "^":
            return None
        self.take()
        if "-" in self.tokens[self.i : self.i + 2]:
            raise _Unsupported  # "\\sin^{-1} x" is the arcsine to some, 1 / sin x to others
        return self.group() if self.peek() == "{" else self.argument()

    def _sqrt(self) -> Fn:
        degree = _const(2)
        if self.peek() == "[":
            self.take()
            degree = self.expr()
            self.take("]")
        radicand = self.argument()

        def root(e: dict[str, complex]) -> complex:
            value, n = radicand(e), degree(e)
            if value.real < 0 and abs(value.imag) < 1e-12 and n.real % 2 == 1:  # odd roots of negatives are real
                return -((-value) ** (1 / n))
            return value ** (1 / n)

        return root


_OPEN_CLOSE = {"(": ")", "[": "]", "\\{": "\\}"}


def _split_items(text: str) -> tuple[str, list[str]]:
    """``(brackets, items)``: ``"(1, 2]"`` -> ``("(]", ["1", "2"])``; a bare list has brackets ``""``."""
    brackets = ""
    for left in ("\\{", "(", "["):
        if text.startswith(left) and (text.endswith(")") or text.endswith("]") or text.endswith("\\}")):
            right = text[-2:] if text.endswith("\\}") else text[-1]
            inner = text[len(left) : len(text) - len(right)]
            if _balanced(inner) and not (left + right == "()" and _balanced(inner.replace(",", ")("))):
                brackets, text = left + right, inner
            break
    items, depth, start = [], 0, 0
    for k, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:k])
            start = k + 1
    items.append(text[start:])
    return brackets, [item.strip() for item in items]


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if depth < 0:
            return False
    return depth == 0


def _values(item: str) -> Values | None:
    """The item's values at the sample points and whether it is written in decimals; None if unreadable."""
    if not item:
        return None
    if item.lstrip("+-") == "\\infty":
        return [complex(-math.inf if item.startswith("-") else math.inf)], 0
    try:
        parser = _Parser(item)
        fn = parser.parse()
        points = _POINTS if parser.names else _POINTS[:1]
        return [fn(point) for point in points], places(item)
    except (_Unsupported, ArithmeticError, ValueError, TypeError, OverflowError):
        return None


def _same(a: Values, b: Values) -> bool | None:
    """Equal, different, or None when too close to call in floating point."""
    if len(a[0]) != len(b[0]):  # one side has variables, the other not: it must be constant to be equal
        a = (a[0] * len(_POINTS), a[1]) if len(a[0]) == 1 else a
        b = (b[0] * len(_POINTS), b[1]) if len(b[0]) == 1 else b
    if any(cmath.isinf(x) for x in a[0] + b[0]):
        return a[0] == b[0]
    gaps = [abs(x - y) for x, y in zip(a[0], b[0], strict=True)]
    sizes = [max(abs(x), abs(y)) for x, y in zip(a[0], b[0], strict=True)]
    if any(gap > 1e-4 * max(1.0, size) for gap, size in zip(gaps, sizes, strict=True)):
        return False
    if max(sizes) > 1e9:
        return None  # beyond float's exactness for integers: 2^{100} and 2^{100} + 1 look alike
    allowed = [max(1e-13 * max(1.0, size), rounding_tolerance(a[1], b[1], size)) for size in sizes]
    return True if all(gap <= tol for gap, tol in zip(gaps, allowed, strict=True)) else None


_MATRIX = re.compile(r"^\(?\\begin\{(?P<env>[pbvB]?matrix|array)\}(?:\{[lcr|]*\})?(?P<body>.*)\\end\{(?P=env)\}\)?$", re.DOTALL)


def _matrix(text: str) -> list[list[str]] | None:
    """The cells of a ``pmatrix`` / ``bmatrix`` / ``(array)``, row by row; None for anything else."""
    match = _MATRIX.match(text.strip())
    if not match or match.group("env") == "vmatrix":  # |…| is a determinant, a number
        return None
    rows = [row for row in re.split(r"\\\\", match.group("body")) if row.strip()]
    return [[cell.strip() for cell in row.split("&")] for row in rows]


def _matrices_equal(gold: list[list[str]], pred: list[list[str]]) -> bool | None:
    if [len(row) for row in gold] != [len(row) for row in pred]:
        return False
    verdicts = [fast_equal(g, p) for g_row, p_row in zip(gold, pred, strict=True) for g, p in zip(g_row, p_row, strict=True)]
    if any(v is False for v in verdicts):
        return False
    return True if all(verdicts) else None


_FINE = re.compile(r"10\^\{?\(?-|\d{10,}|\.\d{9,}|[eE]-")
_ONE_SIDED = re.compile(r"^[a-z]\s*(<|>|\\le|\\ge)\s*([^<>=]+)$")
_TWO_SIDED = re.compile(r"^([^<>=]+?)(<|\\le)\s*[a-z]\s*(<|\\le)\s*([^<>=]+)$")


def _interval(text: str) -> str:
    """An inequality in one variable as the interval it describes (``x\\le3`` -> ``(-\\infty, 3]``)."""
    match = _TWO_SIDED.match(text)
    if match:
        low, left, right, high = match.groups()
        return f"{'(' if left == '<' else '['}{low}, {high}{')' if right == '<' else ']'}"
    match = _ONE_SIDED.match(text)
    if match:
        op, bound = match.groups()
        return {"<": f"(-\\infty, {bound})", "\\le": f"(-\\infty, {bound}]", ">": f"({bound}, \\infty)",
                "\\ge": f"[{bound}, \\infty)"}[op]
    return text


def fast_equal(gold: str, pred: str) -> bool | None:
    """Whether two normalized answers are equal, decided without sympy; None when math-verify must decide."""
    gold, pred = _interval(gold), _interval(pred)
    g_matrix, p_matrix = _matrix(gold), _matrix(pred)
    if g_matrix is not None and p_matrix is not None:
        return _matrices_equal(g_matrix, p_matrix)
    if g_matrix is not None or p_matrix is not None:
        return None
    g_brackets, g_items = _split_items(gold)
    p_brackets, p_items = _split_items(pred)
    if (len(g_items) == 1) != (len(p_items) == 1) and "\\{\\}" not in (g_brackets, p_brackets):
        if _values(g_items[0] if len(g_items) == 1 else p_items[0]) is not None:
            return False  # a tuple, interval or list never equals one number
    if g_brackets != p_brackets and {g_brackets, p_brackets} != {"", "\\{\\}"}:
        intervals = {"()", "[]", "(]", "[)"}
        return False if g_brackets in intervals and p_brackets in intervals else None
    if _FINE.search(gold) or _FINE.search(pred):
        return None  # a 10^{-13} or a twelfth decimal is below what floats can tell from rounding noise
    g_values = [_values(item) for item in g_items]
    p_values = [_values(item) for item in p_items]
    if any(v is None for v in g_values) or any(v is None for v in p_values):
        return None
    if g_brackets in ("", "\\{\\}") and p_brackets in ("", "\\{\\}"):  # sets: order and repeats do not count
        return _sets_equal(g_values, p_values)  # type: ignore[arg-type]
    if len(g_values) != len(p_values):
        return False
    verdicts = [_same(a, b) for a, b in zip(g_values, p_values, strict=True)]  # type: ignore[arg-type]
    if any(v is False for v in verdicts):
        return False
    return True if all(verdicts) else None


def _sets_equal(g_values: list[Values], p_values: list[Values]) -> bool | None:
    def covered(items: list[Values], others: list[Values]) -> bool | None:
        result: bool | None = True
        for item in items:
            verdicts = [_same(item, other) for other in others]
            if any(verdicts):
                continue
            if any(v is None for v in verdicts):
                result = None
            else:
                return False
        return result

    forward, backward = covered(g_values, p_values), covered(p_values, g_values)
    if forward is False or backward is False:
        return False
    return True if forward and backward else None
