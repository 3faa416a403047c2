"""Plain-words descriptions of JSON-schema violations, written for a model to read and fix its tool call."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["describe_error", "path_text", "preview"]

_BOUNDS = {
    "minimum": ">= {}", "maximum": "<= {}", "exclusiveMinimum": "> {}", "exclusiveMaximum": "< {}",
    "minLength": "at least {} characters", "maxLength": "at most {} characters",
    "minItems": "at least {} items", "maxItems": "at most {} items", "multipleOf": "a multiple of {}",
    "minProperties": "at least {} keys", "maxProperties": "at most {} keys", "pattern": "a string matching {!r}",
}  # fmt: skip


def describe_error(error: Any, root: Mapping[str, Any]) -> list[str]:
    """Lines naming the argument, the expectation and the value given, for one jsonschema error."""
    path = list(error.absolute_path)
    where = f"argument {path_text(path)!r}" if path else "arguments"
    kind, expected = error.validator, error.validator_value
    if kind == "required":
        missing = [key for key in expected if key not in error.instance]
        if not path:
            return [f"missing required argument {key!r}" for key in missing]
        return [f"{where}: missing required field {key!r}" for key in missing]
    if kind == "additionalProperties" and expected is False:
        allowed = sorted(error.schema.get("properties", {}))
        accepted = f" (accepted: {', '.join(map(repr, allowed))})" if allowed else " (it takes none)"
        noun = "argument" if not path else f"field in {where}:"
        return [f"unexpected {noun} {key!r}{accepted}" for key in error.instance if key not in allowed]
    if kind in ("anyOf", "oneOf") and error.context:
        # When one alternative has the right type, its inner errors say more than "expected X or Y".
        branches: dict[Any, list[Any]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        shape = ("type", "enum", "const")
        near = [
            b
            for b in branches.values()
            if not any(len(s.absolute_path) == len(path) and s.validator in shape for s in b)
        ]
        if len(near) == 1:
            return [line for sub in near[0] for line in describe_error(sub, root)]
    if kind == "type":
        want = " or ".join(expected) if isinstance(expected, list) else str(expected)
    elif kind in ("anyOf", "oneOf"):
        want = " or ".join(describe_schema(s, root) for s in expected)
    elif kind in ("enum", "const"):
        want = describe_schema({kind: expected}, root)
    elif kind in _BOUNDS:
        want = _BOUNDS[kind].format(expected)
    else:
        return [f"{where}: {error.message}"]
    return [f"{where}: expected {want}, got {preview(error.instance)}"]


def path_text(path: list[Any]) -> str:
    return str(path[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])


def describe_schema(schema: Any, root: Mapping[str, Any], depth: int = 0) -> str:
    """A few words for what a schema accepts, e.g. ``integer``, ``one of "a", "b"``, ``object or null``."""
    if not isinstance(schema, Mapping) or depth > 8:
        return "a value matching the schema"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return describe_schema(target, root, depth + 1)
    if "enum" in schema:
        values = [preview(v, 30) for v in schema["enum"][:10]]
        return "one of " + ", ".join(values) + (", …" if len(schema["enum"]) > 10 else "")
    if "const" in schema:
        return preview(schema["const"])
    if "type" in schema:
        return " or ".join(schema["type"]) if isinstance(schema["type"], list) else str(schema["type"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " or ".join(describe_schema(s, root, depth + 1) for s in schema[key])
    return "a value matching the schema"


def preview(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 1] + "…"
