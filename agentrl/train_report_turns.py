"""The multi-turn parts of a training run's report (:mod:`agentrl.train_report`): the evaluations' multi-turn
figures side by side, and a few transcripts of episodes that recovered from a failed first attempt.

Both read what the run already wrote: the eval phases' records in ``metrics.jsonl`` (``mt/*`` figures, see
:meth:`agentrl.pipeline.run.EvalResult.metrics`) and the harness's ``eval/<stage>/`` directories
(``results.json``, whose samples carry ``first_attempt_passed``, and ``episodes.jsonl``). Every piece of run
text is escaped; a directory that is missing or unreadable leaves its section out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentrl.tracking import MetricRecord

__all__ = ["EVAL_FIGURES", "multi_turn_eval_table", "recovered_episodes", "recovered_transcripts"]

EVAL_FIGURES = (
    ("pass@1", "final pass@1"),
    ("mt/first_attempt_pass", "first-attempt pass@1"),
    ("mt/recovery", "recovery"),
    ("mt/turns_per_episode", "turns / episode"),
    ("mt/attempts_per_episode", "attempts / episode"),
    ("mt/tool_calls_per_turn", "tool calls / turn"),
    ("mt/tool_error_rate", "tool error rate"),
)
"""The columns of the evaluations' multi-turn table: (metric in the eval record, heading)."""


def multi_turn_eval_table(records: Sequence[MetricRecord]) -> str:
    """The eval phases' multi-turn figures, one row per evaluation (SFT, RL, ...); '' when none has them."""
    from agentrl.train_report import _eval_label, _with_ci, escape, eval_rows

    rows = [r for r in eval_rows(records) if "mt/first_attempt_pass" in r.metrics]
    if not rows:
        return ""
    columns = [(key, head) for key, head in EVAL_FIGURES if any(key in r.metrics for r in rows)]
    head = "<tr><th>evaluation</th>" + "".join(f"<th>{escape(h)}</th>" for _, h in columns) + "</tr>"
    body = "".join(
        f"<tr><td>{escape(_eval_label(r.phase, records))}</td>"
        + "".join(f'<td class="num">{escape(_with_ci(r.metrics, key))}</td>' for key, _ in columns)
        + "</tr>"
        for r in rows
    )
    return (
        '<h2>Multi-turn evaluations</h2><p class="sub">First-attempt pass: the first graded attempt passed; '
        "recovery: of the episodes whose first attempt failed, the share that ended passing (95% bootstrap "
        f"intervals over tasks).</p><table>{head}{body}</table>"
    )


def _eval_dir(run_dir: Path, phase: str) -> Path:
    return run_dir / "eval" / (phase.removeprefix("eval-") if phase.startswith("eval-") else phase)


def recovered_episodes(eval_dir: Path, limit: int = 3) -> list[tuple[Any, dict[str, Any]]]:
    """Up to ``limit`` episodes of a harness output directory whose first attempt failed and that passed,
    in task order, as (trajectory, its sample entry of ``results.json``); [] when the directory has none."""
    from agentrl.data.trajectory import read_jsonl
    from agentrl.evaluation.store import EPISODES_FILE

    try:
        results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
        wanted = {
            (int(task["task_index"]), int(sample["sample"])): sample
            for task in results["tasks"]
            for sample in task["samples"]
            if sample.get("first_attempt_passed") is False and sample.get("passed")
        }
        if not wanted:
            return []
        found = []
        for trajectory in read_jsonl(eval_dir / EPISODES_FILE):
            key = (int(trajectory.meta.get("task_index", -1)), int(trajectory.meta.get("sample_index", -1)))
            if key in wanted:
                found.append((key, trajectory, {**wanted.pop(key), "task_id": trajectory.meta.get("group_id")}))
    except (OSError, ValueError, KeyError, TypeError):  # an eval that never finished: no section
        return []
    return [(trajectory, sample) for _, trajectory, sample in sorted(found, key=lambda f: f[0])[:limit]]


def recovered_transcripts(run_dir: Path, records: Sequence[MetricRecord], limit: int = 3) -> str:
    """The report's section of up to ``limit`` recovered episodes from the last evaluation's directory,
    rendered as the eval report renders transcripts; '' when there are none."""
    from agentrl.evaluation.report import render_sample
    from agentrl.train_report import _eval_label, escape, eval_rows

    evals = eval_rows(records)
    if not evals:
        return ""
    last = evals[-1].phase
    episodes = recovered_episodes(_eval_dir(Path(run_dir), last), limit)
    if not episodes:
        return ""
    blocks = "".join(
        f'<h3>{escape(sample.get("task_id") or "task")}</h3>{render_sample(trajectory, sample, open_=i == 0)}'
        for i, (trajectory, sample) in enumerate(episodes)
    )
    return (
        f"<h2>Recovered episodes ({escape(_eval_label(last, records))})</h2>"
        f'<p class="sub">Episodes of the last evaluation whose first attempt failed and that ended passing; '
        f"every transcript is in {escape(_eval_dir(Path('.'), last).as_posix())}/report.html.</p>{blocks}"
    )
