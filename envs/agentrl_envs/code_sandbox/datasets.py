"""Loaders for HumanEval- and MBPP-format problems: JSONL, a JSON list (as sanitized MBPP ships), Parquet or
Arrow files, a ``save_to_disk`` directory, or a Hub id (e.g. ``openai/openai_humaneval``, split ``test``),
all read by :func:`agentrl.data.sources.load_records`.

- HumanEval rows: ``task_id``, ``prompt`` (signature and docstring), ``canonical_solution``, ``test``
  (defines ``check(candidate)``), ``entry_point``.
- MBPP rows: ``task_id``, ``text`` (original) or ``prompt`` (sanitized), ``code``, ``test_list`` (``assert``
  lines), optional ``test_imports`` / ``test_setup_code``.

Local files are read from where they are. :func:`dataset_path` resolves a file name against
``$AGENTRL_DATASETS`` (default: ``shared/datasets`` beside the project checkout); a name found nowhere that
reads as a Hub id is loaded with ``datasets`` (network, or the Hub cache with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl_envs.code_sandbox.tasks import AssertTests, CodeTask, parse_source

__all__ = ["DATASETS_ENV", "dataset_path", "load_humaneval", "load_mbpp", "load_tasks"]

DATASETS_ENV = "AGENTRL_DATASETS"
_DEFAULT_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"


def dataset_path(name: str) -> Path:
    """``name`` itself if it is an existing path, else ``$AGENTRL_DATASETS/name`` (or ``../shared/datasets``).

    Raises:
        ConfigError: the file is found nowhere; the message names where it looked and the variable to set.
    """
    direct = Path(name).expanduser()
    if direct.exists():
        return direct
    base = Path(os.environ.get(DATASETS_ENV) or _DEFAULT_DIR)
    candidate = base / name
    if candidate.exists():
        return candidate
    raise ConfigError(
        f"data set file {name!r} not found (looked at {direct} and {candidate}); pass a path, or set "
        f"${DATASETS_ENV} to the directory that holds it"
    )


def _source(name: str | os.PathLike[str]) -> tuple[str | Path, list[dict[str, Any]]]:
    """The data set ``name`` names (a local path, one under ``$AGENTRL_DATASETS``, or a Hub id; split
    ``test``, where HumanEval and MBPP keep their problems) and its rows.

    Raises:
        ConfigError: found nowhere, or unreadable.
    """
    from agentrl.data.sources import load_records, looks_local

    try:
        where: str | Path = dataset_path(str(name))
    except ConfigError:
        if looks_local(str(name)):
            raise
        where = str(name)  # a Hub id
    return where, load_records(where, split="test")


def _need(row: Mapping[str, Any], keys: tuple[str, ...], path: str | Path) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ConfigError(f"{path}: row {row.get('task_id', '?')!r} lacks {missing}; is this the right format?")


def humaneval_task(row: Mapping[str, Any]) -> CodeTask:
    """One HumanEval row as a task (the prompt's helpers are set up for the tests; the prompt is the task)."""
    prompt, entry = row["prompt"], row["entry_point"]
    return CodeTask(
        task_id=str(row["task_id"]),
        prompt=f"Complete this Python function; submit the whole program.\n\n{prompt.strip()}\n",
        entry_point=entry,
        reference=prompt + row["canonical_solution"],
        tests=AssertTests(setup=prompt, tests=row["test"], names=(entry,), check="check"),
        source="humaneval",
    )


def _called_names(lines: list[str]) -> list[str]:
    names: list[str] = []
    for line in lines:
        for node in ast.walk(parse_source(line)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in names:
                names.append(node.func.id)
    return names


def _signature(code: str, name: str) -> str:
    for node in parse_source(code).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return f"def {name}({ast.unparse(node.args)}):"
    return f"def {name}(...):"


def mbpp_task(row: Mapping[str, Any]) -> CodeTask:
    """One MBPP row as a task: the text, the signature of the tested function, and the first test as example.

    Raises:
        ConfigError: the tests call no function the reference code defines.
    """
    code, tests = row["code"], list(row["test_list"])
    defined = {n.name for n in parse_source(code).body if isinstance(n, ast.FunctionDef)}
    names = tuple(n for n in _called_names(tests) if n in defined)
    if not names:
        raise ConfigError(f"MBPP task {row.get('task_id')!r}: its tests call no function its code defines")
    text = str(row.get("text") or row.get("prompt") or "").strip()
    preamble = "\n".join([*row.get("test_imports", []), row.get("test_setup_code") or ""]).strip()
    # Run in one namespace with the code, as MBPP's own harness does, the tests also see the code's imports.
    imports = [ast.unparse(n) for n in parse_source(code).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    setup = "\n".join([preamble, *imports]).strip()
    prompt = f"{text}\nDefine it as `{_signature(code, names[0])}`. For example, this must hold:\n{tests[0]}\n"
    return CodeTask(
        task_id=f"MBPP/{row['task_id']}",
        prompt=prompt,
        entry_point=names[0],
        reference=code,
        tests=AssertTests(setup=setup, tests="\n".join(tests), names=names),
        source="mbpp",
        preamble=preamble,
    )


def load_humaneval(path: str | os.PathLike[str] = "humaneval.jsonl") -> list[CodeTask]:
    """Tasks from a HumanEval-format file (JSONL).

    Raises:
        ConfigError: the file is missing or a row lacks a field.
    """
    file, rows = _source(path)
    for row in rows:
        _need(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), file)
    return [humaneval_task(row) for row in rows]


def load_mbpp(path: str | os.PathLike[str] = "mbpp-sanitized.json") -> list[CodeTask]:
    """Tasks from an MBPP-format file (JSONL or a JSON list; ``text`` or ``prompt`` for the description).

    Raises:
        ConfigError: the file is missing or a row lacks a field.
    """
    file, rows = _source(path)
    for row in rows:
        _need(row, ("task_id", "code", "test_list"), file)
        if "text" not in row and "prompt" not in row:
            raise ConfigError(f"{file}: row {row['task_id']!r} has neither 'text' nor 'prompt'")
    return [mbpp_task(row) for row in rows]


def load_tasks(path: str | os.PathLike[str]) -> list[CodeTask]:
    """Tasks from a HumanEval- or MBPP-format file, told apart by the first row's fields.

    Raises:
        ConfigError: the file is missing, empty, or in neither format.
    """
    file, rows = _source(path)
    if not rows:
        raise ConfigError(f"{file}: no tasks in the file")
    if "entry_point" in rows[0]:
        return load_humaneval(file)
    if "test_list" in rows[0]:
        return load_mbpp(file)
    raise ConfigError(f"{file}: rows have neither HumanEval fields (entry_point, test) nor MBPP ones (test_list)")
