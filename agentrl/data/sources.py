"""Rows of a data set from wherever it lives, with column mapping: the one loader behind tasks, SFT
conversations and preference pairs.

A *source* is any of:

- a JSONL file (``.jsonl``), or a ``.json`` file holding a list of objects or JSON lines: read line by line
  as written (no schema is imposed; errors name the file and line);
- a Parquet, Arrow or CSV file (``.parquet``, ``.arrow``, ``.csv``): read with ``datasets``;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``;
- any other directory, or a Hub id such as ``openai/openai_humaneval``: ``datasets.load_dataset`` (a Hub id
  needs network, or the Hub cache with ``HF_HUB_OFFLINE=1``);
- a ``datasets.Dataset`` object.

``columns`` maps the field names agentrl reads to the source's column names, e.g. ``{"prompt": "question",
"answer": "solution"}``; the other columns are kept under their own names (a ``ToolEnv`` keeps them as task
metadata). Arrow-typed sources fill keys a row lacks with null (a message without ``tool_calls`` gets
``tool_calls: None``); those null keys are dropped again from message objects (dicts in a list column, and
the dicts in their ``tool_calls``), so a conversation reads as it was written.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["check_source", "load_records", "looks_local", "parse_columns", "placed_records"]

_JSON_SUFFIXES = {".jsonl", ".json"}
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def load_records(
    source: Any,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``source`` (see the module docstring) as dicts, with ``columns`` renamed.

    Args:
        source: a file, a directory, a Hub id or a ``datasets.Dataset``.
        columns: ``{field agentrl reads: the source's column}``.
        split: the split of a ``DatasetDict`` or a ``load_dataset`` source, e.g. ``"test"``.
        name: the configuration of a ``load_dataset`` source, e.g. ``"sanitized"`` for MBPP.
        limit: keep the first ``limit`` rows.

    Raises:
        ConfigError: a missing file, a source ``datasets`` cannot load (with its reason), an unknown split,
            a mapped column the source lacks (naming the columns it has), a row that is not an object.
    """
    return [row for _, row in placed_records(source, columns=columns, split=split, name=name, limit=limit)]


def placed_records(
    source: Any,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """:func:`load_records` with where each row is, for messages: ``"data.jsonl:3"`` (file and line) or
    ``"data.parquet row 3"``.

    Raises:
        ConfigError: as :func:`load_records`.
    """
    if isinstance(source, str | os.PathLike):
        placed = _load(source, split, name)
    elif hasattr(source, "to_list") and hasattr(source, "column_names"):
        placed = [(f"the dataset row {i}", row) for i, row in enumerate(_clean(source.to_list()), 1)]
    else:
        raise ConfigError(f"a data source is a path, a Hub id or a datasets.Dataset, got {type(source).__name__}")
    placed = placed[:limit] if limit is not None else placed
    return [(place, _mapped(row, columns or {}, place)) for place, row in placed]


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=question,answer=solution"`` (a command-line flag) or a mapping, as ``{field: column}``.

    Raises:
        ConfigError: a part without ``=``.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): str(v) for k, v in text.items()}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ConfigError(f"--columns {text!r}: write field=column pairs, e.g. prompt=question,answer=solution")
        out[field.strip()] = column.strip()
    return out


def check_source(source: str, flag: str) -> None:
    """Fail at once on a source that names a local file that is not there (a Hub id passes unchecked).

    Raises:
        ConfigError: naming ``flag``, the path and what a source can be.
    """
    path = Path(source).expanduser()
    if path.exists() or not looks_local(source):
        return
    raise ConfigError(f"{flag} {source} does not exist: pass a JSONL/JSON/Parquet/Arrow/CSV file, a directory "
                      "written by save_to_disk, or a Hub data set id")  # fmt: skip


def looks_local(source: str) -> bool:
    """Whether ``source`` reads as a local path (a data file suffix, ``./ / ~``, or two slashes) rather than
    a Hub id such as ``org/name``."""
    path = Path(source)
    return path.suffix in {*_JSON_SUFFIXES, *_BUILDERS} or source.startswith((".", "/", "~")) or source.count("/") > 1


def _load(source: str | os.PathLike[str], split: str, name: str | None) -> list[tuple[str, dict[str, Any]]]:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in _JSON_SUFFIXES:
        return _json_rows(path)
    check_source(str(source), "data source")
    if path.is_file() and path.suffix not in _BUILDERS:
        raise ConfigError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json, .parquet, .arrow or .csv")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {source} needs the `datasets` package: pip install 'agentrl[datasets]'") from None
    try:
        if path.is_file():
            loaded: Any = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ConfigError(f"{path} has no split {split!r}; it has {sorted(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(source), name, split=split)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise ConfigError(f"cannot load data set {str(source)!r} ({type(exc).__name__}: {exc}); pass a local file "
                          "or directory, or a Hub id reachable from here (network, or the cache with "
                          "HF_HUB_OFFLINE=1)") from None  # fmt: skip
    return [(f"{source} row {i}", row) for i, row in enumerate(_clean(loaded.to_list()), 1)]


def _json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    from agentrl.data.jsonl import jsonl_records

    text_start = path.read_text(encoding="utf-8").lstrip()[:1]
    if text_start == "[":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not a JSON list ({exc})") from None
        numbered = [(f"{path} item {at}", row) for at, row in enumerate(rows, 1)]
    else:
        numbered = [(f"{path}:{lineno}", row) for lineno, row in jsonl_records(path)]
    for place, row in numbered:
        if not isinstance(row, dict):
            raise ConfigError(f"{place}: a {type(row).__name__}, not an object; write one object per row")
    return numbered


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the null keys Arrow's schema adds to message objects (see the module docstring)."""
    return [{key: _clean_messages(value) for key, value in row.items()} for row in rows]


def _clean_messages(value: Any) -> Any:
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return value
    out = []
    for message in value:
        kept = {k: v for k, v in message.items() if v is not None}
        if isinstance(kept.get("tool_calls"), list):
            kept["tool_calls"] = [{k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c
                                  for c in kept["tool_calls"]]  # fmt: skip
        out.append(kept)
    return out


def _mapped(row: dict[str, Any], columns: Mapping[str, str], place: str) -> dict[str, Any]:
    missing = [column for column in columns.values() if column not in row]
    if missing:
        close = difflib.get_close_matches(missing[0], list(row), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{place}: no column {missing[0]!r}{hint}; its columns are {sorted(row)}. "
                          "Fix the column mapping (field=column)")  # fmt: skip
    renamed = {field: row[column] for field, column in columns.items()}
    return {**{k: v for k, v in row.items() if k not in set(columns.values())}, **renamed}
