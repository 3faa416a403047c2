"""Plain data on the wire between graded programs and the host: encode inside the sandbox, decode on the host.

What crosses is built-in data: ``None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset,
dict``. An instance of a *subclass* of one of these (a ``Counter``, a named tuple, an ``IntEnum``) crosses as
the built-in value it holds, read through the built-in type's own methods, so no method of the program runs
and an overridden ``__eq__`` stays behind. Any other object (a ``re.Match``, an object whose ``__eq__``
always says yes) crosses as an :class:`Opaque` stand-in that keeps only the object's type name and its
truth value: it equals nothing but itself. :func:`decode` builds nothing but built-ins and stand-ins from
JSON, so a value the host or the trusted checker compares never carries code of the program under test.

JSON shape: ``null``/``true``/``false``/numbers/strings stand for themselves and a JSON array is a list; every
other type is a one-key object, e.g. ``{"t": [...]}`` for a tuple, ``{"d": [[k, v], ...]}`` for a dict.

This file is stdlib-only and self-contained: the graders send its source into the sandbox as the first part
of each harness program, so keep it free of imports from agentrl.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64
MAX_ITEMS = 100_000
MAX_INT_DIGITS = 4300  # CPython's own default cap on int <-> str conversion
MAX_JSON_DEPTH = 3 * MAX_DEPTH + 8  # a dict level is 3 JSON levels ({"d": [[k, v]]}), plus the report's own


class WireError(ValueError):
    """A value that is not plain data, or JSON that does not decode to plain data."""


def encode(value: Any, strict: bool = False) -> Any:
    """The JSON-ready form of ``value``.

    Args:
        value: what to send.
        strict: refuse subclasses and other objects instead of converting them (for call arguments, which
            must reach the function under test exactly as the tests built them).

    Raises:
        WireError: too deep or too large, or (``strict``) not exactly built-in data.
    """
    return _Encoder(strict).encode(value, 0)


class _Encoder:
    def __init__(self, strict: bool):
        self.strict, self.left = strict, MAX_ITEMS

    def encode(self, value: Any, depth: int) -> Any:
        self.left -= 1
        if depth > MAX_DEPTH or self.left < 0:
            raise WireError("value too deep or too large")
        kind = type(value)  # the real type: isinstance() could be fooled by a __class__ property
        if value is None or kind is bool or kind is int or kind is str:
            return value
        if kind is float:
            return value if math.isfinite(value) else {"x": repr(value)}
        if kind is list:
            return [self.encode(v, depth + 1) for v in value]
        tag = _TAGS.get(kind)
        if tag is None:
            return self.other(value, depth)
        if kind is dict:
            return {tag: [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()]}
        if kind is complex:
            return {tag: [self.encode(value.real, depth + 1), self.encode(value.imag, depth + 1)]}
        if kind is bytes:
            return {tag: value.hex()}
        return {tag: [self.encode(v, depth + 1) for v in value]}

    def other(self, value: Any, depth: int) -> Any:
        """A subclass of a built-in as the built-in it holds; anything else as an opaque stand-in."""
        kind = type(value)
        if self.strict:
            raise WireError(f"a {kind.__name__} is not plain data")
        for base, convert in _BASES:
            if issubclass(kind, base):
                return self.encode(convert(value), depth)
        truth = bool(value)
        if type(truth) is not bool:
            raise WireError("__bool__ returned a non-bool")
        return {"o": [str(kind.__name__)[:100], truth]}


_TAGS: dict[type, str] = {tuple: "t", set: "s", frozenset: "f", dict: "d", complex: "c", bytes: "b"}
# Each conversion calls the built-in type's own method, never one the subclass overrides.
_BASES: tuple[tuple[type, Any], ...] = (
    (int, int.__int__),
    (float, float.__float__),
    (str, str.__str__),
    (bytes, lambda v: bytes(memoryview(v))),
    (complex, complex.__complex__),
    (list, lambda v: list(list.__iter__(v))),
    (tuple, lambda v: tuple(tuple.__iter__(v))),
    (dict, lambda v: dict(dict.items(v))),
    (set, lambda v: set(set.__iter__(v))),
    (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
)


class Opaque:
    """Stands in for a returned object that is not plain data: equal only to itself, with its truth value.

    Attributes:
        type_name: the object's type name, for messages.
        truth: ``bool(obj)`` as the program computed it (a test may ask only whether the result is truthy).
    """

    __slots__ = ("truth", "type_name")

    def __init__(self, type_name: str, truth: bool):
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


def dumps(value: Any) -> str:
    """``json.dumps(encode(value))`` on one line."""
    return json.dumps(encode(value), separators=(",", ":"))


def decode(data: Any) -> Any:
    """Build the value that :func:`encode` produced ``data`` from; raises :class:`WireError` if malformed."""
    return _dec(data, 0)


def _dec(data: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError("value too deep")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [_dec(v, depth + 1) for v in data]
    if kind is not dict or len(data) != 1:
        raise WireError(f"malformed wire value {data!r:.80}")
    ((tag, body),) = data.items()
    try:
        return _DECODERS[tag](body, depth + 1)
    except KeyError:
        raise WireError(f"unknown wire tag {tag!r:.20}") from None
    except TypeError as exc:  # unhashable members of a set or keys of a dict, wrong shapes
        raise WireError(f"malformed {tag!r} value: {exc}") from None


def _items(body: Any, depth: int) -> list[Any]:
    if type(body) is not list:
        raise WireError("a container body must be a list")
    return [_dec(v, depth) for v in body]


def _float(body: Any, depth: int) -> float:
    if body not in ("inf", "-inf", "nan"):
        raise WireError(f"bad special float {body!r:.20}")
    return float(body)


def _pairs(body: Any, depth: int) -> dict[Any, Any]:
    pairs = _items(body, depth)
    if not all(type(p) is list and len(p) == 2 for p in pairs):
        raise WireError("a dict body must be [key, value] pairs")
    return dict(pairs)


def _opaque(body: Any, depth: int) -> Opaque:
    if not (type(body) is list and len(body) == 2 and type(body[0]) is str and type(body[1]) is bool):
        raise WireError("an opaque body must be [type name, truth]")
    return Opaque(body[0], body[1])


def _complex(body: Any, depth: int) -> complex:
    parts = _items(body, depth)
    if len(parts) != 2 or not all(type(p) is float for p in parts):
        raise WireError("a complex body must be [real, imag]")
    return complex(parts[0], parts[1])


def _bytes(body: Any, depth: int) -> bytes:
    if type(body) is not str:
        raise WireError("a bytes body must be a hex string")
    try:
        return bytes.fromhex(body)
    except ValueError as exc:
        raise WireError(f"bad bytes body: {exc}") from None


_DECODERS = {
    "t": lambda body, depth: tuple(_items(body, depth)),
    "s": lambda body, depth: set(_items(body, depth)),
    "f": lambda body, depth: frozenset(_items(body, depth)),
    "d": _pairs,
    "c": _complex,
    "b": _bytes,
    "x": _float,
    "o": _opaque,
}


def loads(text: str) -> Any:
    """Decode one line written by :func:`dumps`; raises :class:`WireError` on anything else."""
    try:
        return decode(json.loads(text))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"not wire JSON: {exc}") from None


def parse_json(text: str, max_chars: int) -> Any:
    """``json.loads`` with bounds on size, nesting depth and digits of an int, for text a program controls.

    Raises:
        WireError: the text is longer than ``max_chars``, nests deeper than ``MAX_JSON_DEPTH``, holds an
            int of more than ``MAX_INT_DIGITS`` digits, or is not JSON.
    """
    if len(text) > max_chars:
        raise WireError(f"JSON text of {len(text)} characters; at most {max_chars}")
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub('""', text))
    if max(accumulate(map(_NESTING.__getitem__, brackets)), default=0) > MAX_JSON_DEPTH:
        raise WireError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise WireError(f"not wire JSON: {exc}"[:300]) from None


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise WireError(f"an int of more than {MAX_INT_DIGITS} digits")
    return int(digits)


def same(a: Any, b: Any) -> bool:
    """Strict structural equality of plain values: equal *and* of the same types all the way down.

    ``True`` is not ``1`` and ``(1,)`` is not ``[1]`` here, unlike ``==``; NaN equals NaN, and floats must be
    equal within 1e-9 relative (summation order differs between correct programs).
    """
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:  # keys as members of a set: ``{True: 'a'}`` has no key ``1``
        keyed = {_key(k): v for k, v in b.items()}
        return len(a) == len(keyed) and all(_key(k) in keyed and same(v, keyed[_key(k)]) for k, v in a.items())
    if type(a) in (set, frozenset):
        return len(a) == len(b) and {_key(x) for x in a} == {_key(x) for x in b}
    return bool(a == b)


def _key(value: Any) -> Any:
    """A hashable value's identity with its types all the way down, for members of sets and keys of dicts."""
    kind = type(value)
    if kind is tuple:
        return kind, tuple(map(_key, value))
    if kind is frozenset:
        return kind, frozenset(map(_key, value))
    return kind, value
