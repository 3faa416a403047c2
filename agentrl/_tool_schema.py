"""Tool schemas from Python: Google-style docstrings and typed signatures to JSON schema and a binder.

Used by :meth:`agentrl.tools.Tool.from_function` and :meth:`~agentrl.tools.Tool.from_model`; pydantic is
imported inside the function that needs it.

Why not ``transformers.utils.get_json_schema``: it agrees with this module on names, descriptions, base types
and required arguments (a test holds both to that), but it requires every argument to be documented, knows no
constraints (``Annotated[int, Field(ge=0)]``), enums, pydantic models or positional-only parameters, writes
optionals with OpenAPI's ``nullable`` (which JSON-schema validation ignores) and forbids nothing extra. The
schema here is the one calls are validated against and the binder builds values from; a schema made by
``get_json_schema`` is still accepted as is (:meth:`~agentrl.tools.Tool.from_schema`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["Binder", "parse_docstring", "signature_schema", "strip_titles"]

Binder = Callable[[dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]

_SECTION = re.compile(r"^(\w+(?: \w+)?):\s*$")
_ARG_SECTIONS = {"Args", "Arguments", "Parameters", "Params", "Attributes", "Keyword Args"}
_ARG_ITEM = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SCHEMA_MAPS = {"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"}
_DATA_KEYS = {"enum", "const", "default", "examples"}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its first paragraph and its ``Args:``/``Attributes:`` entries."""
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        summary.append(line.strip())
    entries: dict[str, str] = {}
    in_args, current, indent = False, None, None
    for line in lines:
        if not line.strip():
            continue
        header = _SECTION.match(line)
        if header or not line[0].isspace():
            in_args, current, indent = header is not None and header.group(1) in _ARG_SECTIONS, None, None
            continue
        if not in_args:
            continue
        width = len(line) - len(line.lstrip())
        item = _ARG_ITEM.match(line.strip())
        if item and (indent is None or width <= indent):
            indent, current = width, item.group(1)
            entries[current] = item.group(2).strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return " ".join(summary), entries


def signature_schema(fn: Callable[..., Any], name: str, arg_docs: Mapping[str, str]) -> tuple[dict, Binder]:
    """The JSON schema of ``fn``'s parameters and the binder that calls it with validated values."""
    from pydantic import ConfigDict, Field, create_model

    try:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
    except (NameError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the signature of tool {name!r}: {exc}") from exc
    fields: dict[str, Any] = {}
    for i, param in enumerate(params):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {name!r}: replace *{param.name} by named parameters")
        if type(param.default).__name__ == "FieldInfo":
            raise ConfigError(f"tool {name!r}: write `{param.name}: Annotated[<type>, Field(...)]`")
        if param.annotation is param.empty:
            raise ConfigError(f"tool {name!r}: parameter {param.name!r} needs a type hint")
        extra: dict[str, Any] = {"description": arg_docs[param.name]} if param.name in arg_docs else {}
        default = ... if param.default is param.empty else param.default
        # Aliased internal names let parameters be called `json`, `schema` or `model_config`.
        fields[f"p{i}"] = (param.annotation, Field(default, alias=param.name, **extra))
    try:
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        schema = strip_titles(model.model_json_schema())
    except Exception as exc:  # pydantic raises several error types for types it cannot describe
        raise ConfigError(f"tool {name!r}: cannot build a JSON schema from its type hints: {exc}") from exc
    positional = [i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY]
    positional_names = {params[i].name for i in positional}

    def bind(arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = model.model_validate(arguments)
        args = tuple(getattr(values, f"p{i}") for i in positional)
        # Only arguments the model gave are passed, so the function's own defaults apply to the rest.
        given = values.model_fields_set
        kwargs = {p.name: getattr(values, f"p{i}") for i, p in enumerate(params) if f"p{i}" in given}
        return args, {k: v for k, v in kwargs.items() if k not in positional_names}

    return schema, bind


def strip_titles(node: Any) -> Any:
    """Drop pydantic's generated ``title`` keys: they repeat the names and cost prompt tokens."""
    if isinstance(node, list):
        return [strip_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _DATA_KEYS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strip_titles(sub) for name, sub in value.items()}
        else:
            out[key] = strip_titles(value)
    return out
