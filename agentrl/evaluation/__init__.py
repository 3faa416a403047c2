"""The evaluation harness behind ``agentrl eval``: any env × any policy, k samples per task, resumable.

- :mod:`~agentrl.evaluation.metrics`: pure functions: unbiased pass@k, bootstrap intervals over tasks, the
  pass rule, per-episode and per-run statistics.
- :mod:`~agentrl.evaluation.multiturn`: first-attempt pass, recovery, turns, attempts and tool calls per turn
  from the per-turn ``info["turn_metrics"]`` an env reports.
- :mod:`~agentrl.evaluation.harness`: :func:`evaluate` plays the missing (task, sample) pairs of a plan into
  an output directory and scores all of them; :func:`report_only` rescores saved episodes.
- :mod:`~agentrl.evaluation.report`, :mod:`~agentrl.evaluation.plots`: printed summary, ``report.html``,
  PNG plots and transcripts; :mod:`~agentrl.evaluation.compare`: two runs side by side.

Importing this package is cheap: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvalConfig", "PassRule", "bootstrap_ci", "evaluate", "pass_at_k", "report_only"]

_WHERE = {
    "EvalConfig": "agentrl.evaluation.config",
    "PassRule": "agentrl.evaluation.metrics",
    "bootstrap_ci": "agentrl.evaluation.metrics",
    "pass_at_k": "agentrl.evaluation.metrics",
    "evaluate": "agentrl.evaluation.harness",
    "report_only": "agentrl.evaluation.harness",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'agentrl.evaluation' has no attribute {name!r}")
