"""HumanEval and MBPP for tests: loaded from ``$AGENTRL_DATASETS`` (or ``../shared/datasets``), or the test skips.

A clone has no data sets beside it unless someone put them there; tests that need one skip with the reason
(the file looked for and the variable that points at it) instead of failing.
"""

from __future__ import annotations

import pytest
from agentrl_envs.code_sandbox import load_humaneval, load_mbpp
from agentrl_envs.code_sandbox.datasets import dataset_path

from agentrl.errors import ConfigError

__all__ = ["FILES", "humaneval", "mbpp", "require_dataset", "task"]

FILES = {"humaneval": "humaneval.jsonl", "mbpp": "mbpp-sanitized.json"}


def require_dataset(name: str) -> None:
    """Skip the calling test unless the data set ``name`` ("humaneval" or "mbpp") is found."""
    try:
        dataset_path(FILES[name])
    except ConfigError as exc:
        pytest.skip(f"needs the {name} data set: {exc}")


def humaneval():
    require_dataset("humaneval")
    return load_humaneval()


def mbpp():
    require_dataset("mbpp")
    return load_mbpp()


def task(task_id: str):
    """One task of HumanEval or MBPP by id (``"HumanEval/0"``, ``"MBPP/2"``), or skip."""
    rows = humaneval() if task_id.startswith("HumanEval/") else mbpp()
    return next(t for t in rows if t.task_id == task_id)
