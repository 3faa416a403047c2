"""``agentrl eval --compare A B``: two eval runs side by side, with the differences and their intervals.

When both runs played the same tasks (same env, env arguments and task selection; for seeded draws also
the same seed), the difference ``B - A`` is computed over their common tasks with a paired bootstrap over
those tasks; otherwise each side's tasks are resampled on their own (a wider, unpaired interval), and the
output says so. Only ``results.json`` of each directory is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl.evaluation.metrics import paired_bootstrap, pass_at_k, unpaired_bootstrap
from agentrl.evaluation.report import escape, html_page

__all__ = ["compare_runs", "format_compare", "load_results", "render_compare"]


def load_results(path: str | Path) -> dict[str, Any]:
    """``results.json`` of an eval output directory (or the file itself).

    Raises:
        ConfigError: there is none, or it is not an eval's results.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    if not file.is_file():
        raise ConfigError(
            f"{path} has no results.json: pass the --out directory of a finished agentrl eval (an interrupted "
            f"one gets its results with `agentrl eval --report-only --out {path}`)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{file} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or not {"config", "metrics", "tasks"} <= set(data):
        raise ConfigError(f"{file} is not the results.json of agentrl eval (no config, metrics and tasks)")
    data["_path"] = str(file.parent)
    return data


def _same_tasks(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ["env", "env_kwargs", "task_option"] + ([] if a["config"].get("task_option") else ["seed"])
    return all(a["config"].get(key) == b["config"].get(key) for key in keys)


def _warnings(a: Mapping[str, Any], b: Mapping[str, Any], paired: bool) -> list[str]:
    notes = []
    if a["config"]["env"] != b["config"]["env"]:
        notes.append(f"different envs: A is {a['config']['env']}, B is {b['config']['env']}")
    if a["pass_rule"] != b["pass_rule"]:
        notes.append(
            f"different pass rules: A counts {a['pass_rule']}, B counts {b['pass_rule']}; rescore one "
            "with `agentrl eval --report-only --out DIR --pass-on ... --pass-threshold ...`"
        )
    if not paired:
        notes.append(
            "the runs played different tasks (env, --env-arg, --task-option or seed differ): unpaired "
            "bootstrap, each side's tasks resampled on their own"
        )
    return notes


def _task_values(
    tasks: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None]
) -> dict[int, float]:
    out = {}
    for task in tasks:
        v = value(task)
        if v is not None and math.isfinite(v):
            out[int(task["task_index"])] = float(v)
    return out


def _pass_k(k: int) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda t: pass_at_k(int(t["n"]), int(t["passed"]), k) if int(t["n"]) >= k else None


def compare_runs(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The comparison of two loaded results (see :func:`load_results`), JSON-ready.

    Returns:
        ``{"a", "b", "paired", "common_tasks", "rows", "warnings"}``; each row has ``metric``, ``a``, ``b``
        and, for the per-task metrics (pass@k, mean reward), ``diff``, ``low``, ``high``, ``p_b_not_better``.
    """
    paired = _same_tasks(a, b)
    ks = sorted(set(map(int, a["metrics"]["pass_at_k"])) & set(map(int, b["metrics"]["pass_at_k"])))
    per_task: list[tuple[str, Callable[[Mapping[str, Any]], float | None]]] = [
        (f"pass@{k}", _pass_k(k)) for k in ks
    ]
    per_task.append(("mean reward", lambda t: t.get("mean_reward")))
    common: set[int] = set()
    if paired:
        common = {int(t["task_index"]) for t in a["tasks"]} & {int(t["task_index"]) for t in b["tasks"]}
        paired = bool(common)
    rows: list[dict[str, Any]] = []
    for name, value in per_task:
        va, vb = _task_values(a["tasks"], value), _task_values(b["tasks"], value)
        if paired:
            shared = sorted(set(va) & set(vb) & common)
            xs, ys = [va[i] for i in shared], [vb[i] for i in shared]
            stats = paired_bootstrap(xs, ys, resamples=resamples, confidence=confidence, seed=seed)
        else:
            xs, ys = list(va.values()), list(vb.values())
            stats = unpaired_bootstrap(xs, ys, resamples=resamples, confidence=confidence, seed=seed)
        rows.append({"metric": name, "a": _mean(xs), "b": _mean(ys), "tasks": [len(xs), len(ys)], **stats})
    for name, get in (
        ("pass rate (episodes)", lambda m: m["pass_rate"]),
        ("mean turns", lambda m: m["turns"]["mean"]),
        ("mean sampled tokens", lambda m: m["sampled_tokens"]["mean"]),
        ("tool-call error rate", lambda m: m["tool_calls"]["error_rate"]),
        ("error episodes", lambda m: m["errors"]["count"]),
        ("latency p50 (s)", lambda m: m["latency_s"]["p50"]),
    ):
        va_, vb_ = get(a["metrics"]), get(b["metrics"])
        rows.append(
            {
                "metric": name,
                "a": va_,
                "b": vb_,
                "diff": vb_ - va_ if va_ is not None and vb_ is not None else None,
            }
        )
    return {
        "a": _side(a),
        "b": _side(b),
        "paired": paired,
        "common_tasks": len(common),
        "confidence": confidence,
        "resamples": resamples,
        "rows": rows,
        "warnings": _warnings(a, b, paired),
    }


def _side(results: Mapping[str, Any]) -> dict[str, Any]:
    config, metrics = results["config"], results["metrics"]
    return {
        "out": results["_path"],
        "env": config["env"],
        "model": config["model"],
        "backend": config["backend"],
        "pass_rule": results["pass_rule"],
        "episodes": metrics["episodes"],
        "tasks": metrics["tasks"],
    }


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):  # counts stay counts
        return f"{value:+d}" if sign else str(value)
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _diff_text(row: Mapping[str, Any]) -> str:
    if "low" not in row:
        return _f(row.get("diff"), sign=True)
    verdict = ""
    if row["low"] is not None and math.isfinite(row["low"]) and (row["low"] > 0 or row["high"] < 0):
        verdict = "  *"
    return (
        f"{_f(row['diff'], sign=True)} [{_f(row['low'], sign=True)}, {_f(row['high'], sign=True)}]{verdict}"
    )


def format_compare(result: Mapping[str, Any]) -> str:
    """The comparison as a text table; ``*`` marks a difference whose interval excludes 0."""
    a, b = result["a"], result["b"]
    how = (
        f"paired bootstrap over {result['common_tasks']} common tasks"
        if result["paired"]
        else "unpaired bootstrap (different tasks)"
    )
    lines = [
        f"A: {a['out']}  ({a['env']} × {a['backend']}:{a['model']}, {a['tasks']} tasks, {a['episodes']} episodes)",
        f"B: {b['out']}  ({b['env']} × {b['backend']}:{b['model']}, {b['tasks']} tasks, {b['episodes']} episodes)",
        f"B - A with {result['confidence']:.0%} intervals: {how}, {result['resamples']} resamples",
        f"{'metric':<24}{'A':>10}{'B':>10}   B - A",
    ]
    for row in result["rows"]:
        lines.append(f"{row['metric']:<24}{_f(row['a']):>10}{_f(row['b']):>10}   {_diff_text(row)}")
    lines.append("* the interval excludes 0")
    lines.extend(f"note: {w}" for w in result["warnings"])
    return "\n".join(lines)


def render_compare(result: Mapping[str, Any]) -> str:
    """The comparison as an HTML page (``compare.html``)."""
    a, b = result["a"], result["b"]
    rows = "".join(
        f'<tr><th>{escape(r["metric"])}</th><td class="num">{escape(_f(r["a"]))}</td>'
        f'<td class="num">{escape(_f(r["b"]))}</td><td class="num">{escape(_diff_text(r))}</td></tr>'
        for r in result["rows"]
    )
    notes = "".join(f'<p class="bad">{escape(w)}</p>' for w in result["warnings"])
    how = f"paired over {result['common_tasks']} common tasks" if result["paired"] else "unpaired"
    body = (
        f'<h1>A vs B</h1><p class="sub">A: {escape(a["out"])} ({escape(a["env"])} × {escape(a["model"])})<br>'
        f"B: {escape(b['out'])} ({escape(b['env'])} × {escape(b['model'])})</p>"
        f'<p class="sub">B − A with {result["confidence"]:.0%} bootstrap intervals ({escape(how)}); * the '
        f"interval excludes 0</p>{notes}<table><tr><th>metric</th><th>A</th><th>B</th><th>B − A [CI]</th></tr>{rows}</table>"
    )
    return html_page("agentrl eval: A vs B", body)
