"""A safe arithmetic evaluator for the ``calculator`` tool: exact rational arithmetic over a parsed AST.

Only numbers, ``+ - * / // % **``, parentheses and unary signs are allowed; names, calls, attributes and
everything else are rejected before anything is evaluated. Exponents and operand sizes are bounded so that
``9**9**9`` is an error message, not a frozen process.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from fractions import Fraction

__all__ = ["CalculatorError", "calculate", "format_number"]

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_DIGITS = 100

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic or cannot be evaluated; the message says why."""


def _check_size(value: Fraction) -> Fraction:
    if max(len(str(abs(value.numerator))), len(str(value.denominator))) > MAX_DIGITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only whole-number exponents are supported")
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponents are limited to ±{MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    return _check_size(base ** int(exponent))


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"the operator {type(node.op).__name__} is not supported")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        return _check_size(op(left, right))
    raise CalculatorError(
        f"{type(node).__name__} is not allowed: use numbers, + - * / // % ** and parentheses"
    )


def format_number(value: Fraction) -> str:
    """An integer as ``12``, a terminating fraction as a decimal ``0.25``, any other as ``7/3``."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        return f"{float(value):.12g}"
    return f"{value.numerator}/{value.denominator}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: e.g. ``"(17 + 25) * 3 / 4"``; ``^`` is read as a power.

    Returns:
        The value, formatted by :func:`format_number`.

    Raises:
        CalculatorError: Anything but arithmetic, a syntax error, division by zero, or a result too large.
    """
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"syntax error: {exc.msg}") from None
    return format_number(_eval(tree))
