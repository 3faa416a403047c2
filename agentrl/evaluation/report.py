"""The report of an eval run: a printed summary, ``report.html`` with PNG plots, one transcript page per task.

Every piece of text from a run (model output, tool results, errors, task prompts, config values) is
escaped with :func:`escape` before it reaches HTML; the pages carry no scripts.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agentrl._safe_text import escape_surrogates
from agentrl.data.trajectory import Trajectory

__all__ = [
    "escape",
    "format_summary",
    "html_page",
    "multi_turn_rows",
    "render_report",
    "render_sample",
    "render_transcript",
    "write_report",
]

MAX_MESSAGE_CHARS = 20_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:34px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#5b6573;margin:0} a{color:#2a5d9f}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:150px}
.card .v{font-size:24px;font-weight:600} .card .l{color:#5b6573;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px}
figure img{width:100%;height:auto} figcaption{color:#5b6573;font-size:13px;padding:2px 6px}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#2f7a43;font-weight:600} .bad{color:#a8392f;font-weight:600} .muted{color:#7a8491}
.dots a{text-decoration:none;font-family:monospace;font-size:15px}
details.sample{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:10px 0;padding:6px 12px}
details.sample>summary{cursor:pointer;font-weight:600;padding:4px 0}
.msg{border-left:4px solid #c5ccd5;margin:10px 0;padding:2px 10px}
.msg .role{font-size:12px;color:#5b6573} .msg .role .name{text-transform:uppercase;letter-spacing:.05em}
.msg.assistant{border-color:#3b6ea8} .msg.tool{border-color:#c99a2e} .msg.user{border-color:#3a8a4f}
.msg.system{border-color:#8a8f96}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
.reward{font-size:13px;color:#2a5d9f;margin:2px 0 0} .error{background:#fbeceb;border:1px solid #e8b9b4;padding:6px 10px;border-radius:6px}
nav{margin:8px 0 16px} nav a{margin-right:14px}
.call{margin:4px 0;font-size:14px} .call .arg{margin:2px 0 0 18px;color:#5b6573;font-size:13px}
pre.code{margin-left:18px;background:#f3f5f8;padding:6px 8px;border-radius:4px}
.msg details summary{cursor:pointer;color:#7a8491;font-size:12px}
"""


def escape(text: Any) -> str:
    """Text made safe for HTML element content and quoted attributes: markup characters escaped, control
    characters (invalid in HTML) shown as ``\\xNN``, lone surrogates (not encodable) as ``\\udXXX``."""
    escaped = html.escape(str(text), quote=True)
    return escape_surrogates(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", escaped))


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _ci(entry: Mapping[str, Any]) -> str:
    low, high = entry.get("ci") or (None, None)
    return f"[{_num(low)}, {_num(high)}]" if low is not None else ""


def _title(results: Mapping[str, Any]) -> str:
    config = results["config"]
    return f"{config['env']} × {config['backend']}:{config['model']}"


def _selection_table(results: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[str]]]:
    """Test-time selection beside pass@k: notes on how it was done, the column heads and one row per N
    (each cell ``value [low, high]``); no rows when neither best-of-N nor maj@k was asked for."""
    metrics = results["metrics"]
    pass_k, best, maj = metrics["pass_at_k"], metrics.get("best_of_n"), metrics.get("maj_at_k")
    if not best and not maj:
        return [], [], []
    about = metrics.get("selection", {})
    columns: list[tuple[str, Any]] = [("pass@1", {k: pass_k["1"] for k in pass_k})] if "1" in pass_k else []
    columns.append(("pass@N", pass_k))
    notes = []
    if best:
        columns.append((f"best-of-N (by {about.get('best_of_n_by')})", best))
        notes.append(
            f"best-of-N: the sample with the highest score by {about.get('best_of_n_by')} "
            f"({about.get('scored', 0)} of {about.get('scored', 0) + about.get('unscored', 0)} episodes "
            "scored; ties drawn at random)"
        )
    if maj:
        columns.append(("maj@N", maj))
        notes.append(
            f"maj@N: the most frequent {about.get('answer_format')} answer "
            f"({about.get('answered', 0)} of {about.get('answered', 0) + about.get('unanswered', 0)} "
            "episodes gave one)"
        )
    rows = []
    for k in pass_k:
        if k in (best or {}) or k in (maj or {}):
            cells = [
                f"{_num(col[k]['value'])} {_ci(col[k])}".strip() if k in col else "–" for _, col in columns
            ]
            rows.append([k, *cells])
    return notes, ["N", *(name for name, _ in columns)], rows


# ---------------------------------------------------------------------------------------------- text summary
def format_summary(results: Mapping[str, Any]) -> str:
    """The summary printed at the end of a run: headline metrics with intervals, then the rest."""
    config, metrics, timing = results["config"], results["metrics"], results.get("timing", {})
    planned = results["planned"]
    lines = [
        f"{_title(results)}: {metrics['tasks']} tasks x {planned['samples_per_task']} samples = "
        f"{metrics['episodes']} episodes ({timing.get('played', 0)} played now, {timing.get('resumed', 0)} "
        f"resumed; {_num(timing.get('wall_s'), 1)} s)",
        f"pass rule: {results['pass_rule']}; intervals: {config['confidence']:.0%} bootstrap over tasks, "
        f"{config['resamples']} resamples",
    ]
    distinct = metrics.get("distinct_tasks", metrics["tasks"])
    if distinct < metrics["tasks"]:
        lines.append(
            f"  the env drew {distinct} distinct tasks for the {metrics['tasks']} (drawn by seed, with repeats): "
            "intervals resample the distinct ones, repeats together; --task-option picks each task once"
        )
    for k, entry in metrics["pass_at_k"].items():
        lines.append(
            f"  {'pass@' + k:<18}{_num(entry['value']):>8}  {_ci(entry):<18} ({entry['tasks']} tasks)"
        )
    notes, head, rows = _selection_table(results)
    if rows:
        lines.append("  test-time selection (expected pass over random N-subsets of each task's samples):")
        lines += [f"    {note}" for note in notes]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append(("    " + "  ".join(cells)).rstrip())
    reward = metrics["reward"]
    lines.append(f"  {'mean reward':<18}{_num(reward['value']):>8}  {_ci(reward)}")
    for name, value in metrics["reward_components"].items():
        lines.append(f"    {name:<16}{_num(value):>8}")
    for label, key, unit in (
        ("turns", "turns", ""),
        ("sampled tokens", "sampled_tokens", ""),
        ("latency", "latency_s", " s"),
    ):
        d = metrics[key]
        lines.append(
            f"  {label:<18}{_num(d['mean'], 2):>8}  mean; p50 {_num(d['p50'], 2)}, p90 "
            f"{_num(d['p90'], 2)}, max {_num(d['max'], 2)}{unit}"
        )
    turn_rows = multi_turn_rows(metrics)
    if turn_rows:
        lines.append("  multi-turn (the env's graded attempts; intervals over tasks as above):")
        for label, value, interval, note in turn_rows:
            lines.append(f"    {label:<20}{value:>8}  {interval:<18} {note}".rstrip())
    calls = metrics["tool_calls"]
    lines.append(
        f"  {'tool calls':<18}{calls['calls']:>8}  {calls['failed']} failed "
        f"(error rate {100 * calls['error_rate']:.1f}%)"
    )
    stops = ", ".join(f"{name} {count}" for name, count in metrics["stop_reasons"].items())
    lines.append(f"  {'stop reasons':<18}{stops}")
    errors = metrics["errors"]
    if errors["count"]:
        lines.append(
            f"  {'errors':<18}{errors['count']:>8}  most frequent: {errors['top'][0]['error'][:160]}"
        )
        lines.append("  (rerun with --retry-errors to play the failed episodes again)")
    return "\n".join(lines)


def multi_turn_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``metrics.multi_turn`` of ``results.json`` as (label, value, interval, note) rows; none without it."""
    section = metrics.get("multi_turn")
    if not section:
        return []
    rows = []
    for key, label, note in (
        ("final_pass", "final pass", "share of episodes passing"),
        ("first_attempt_pass", "first-attempt pass", "share whose first attempt passed"),
        ("recovery", "recovery", "of the {n} episodes whose first attempt failed, the share ending passing"),
    ):
        entry = section[key]
        rows.append((label, _num(entry["value"]), _ci(entry), note.format(n=entry["episodes"])))
    for key, label, note in (
        ("turns_per_episode", "turns / episode", ""),
        ("attempts_per_episode", "attempts / episode", "graded attempts"),
        ("tool_calls_per_turn", "tool calls / turn", "as the env counted them"),
        ("tool_error_rate", "tool error rate", "errored calls / calls, as the env counted them"),
    ):
        if key in section:
            rows.append((label, _num(section[key], 2), "", note))
    return rows


# ---------------------------------------------------------------------------------------------- report.html
def _cards(results: Mapping[str, Any]) -> str:
    metrics = results["metrics"]
    cards = [(f"pass@{k}", _num(e["value"]), _ci(e)) for k, e in metrics["pass_at_k"].items()]
    cards.append(("mean reward", _num(metrics["reward"]["value"]), _ci(metrics["reward"])))
    cards.append(("episodes", str(metrics["episodes"]), f"{metrics['tasks']} tasks"))
    cards.append(
        (
            "errors",
            str(metrics["errors"]["count"]),
            f"{100 * (metrics['stop_shares']['truncated'] or 0):.0f}% truncated",
        )
    )
    return "".join(
        f'<div class="card"><div class="l">{escape(label)}</div><div class="v">{escape(value)}</div>'
        f'<div class="l">{escape(sub)}</div></div>'
        for label, value, sub in cards
    )


def _metrics_table(results: Mapping[str, Any]) -> str:
    metrics = results["metrics"]
    rows = []
    for k, e in metrics["pass_at_k"].items():
        rows.append((f"pass@{k}", _num(e["value"]), _ci(e), f"{e['tasks']} tasks"))
    rows.append(
        ("mean reward", _num(metrics["reward"]["value"]), _ci(metrics["reward"]), "mean of task means")
    )
    rows.append(("pass rate", _num(metrics["pass_rate"]), "", "share of passed episodes"))
    for name, value in metrics["reward_components"].items():
        rows.append((f"reward / {name}", _num(value), "", "mean per episode"))
    for label, key in (
        ("turns", "turns"),
        ("sampled tokens", "sampled_tokens"),
        ("total tokens", "total_tokens"),
        ("latency (s)", "latency_s"),
    ):
        d = metrics[key]
        rows.append(
            (
                label,
                _num(d["mean"], 2),
                f"p50 {_num(d['p50'], 2)} · p90 {_num(d['p90'], 2)}",
                f"min {_num(d['min'], 2)} · max {_num(d['max'], 2)}",
            )
        )
    calls = metrics["tool_calls"]
    rows.append(
        (
            "tool-call error rate",
            _num(calls["error_rate"]),
            f"{calls['failed']} of {calls['calls']} calls",
            "",
        )
    )
    body = "".join(
        f'<tr><th>{escape(a)}</th><td class="num">{escape(b)}</td><td>{escape(c)}</td><td class="muted">{escape(d)}</td></tr>'
        for a, b, c, d in rows
    )
    return f"<table>{body}</table>"


def _selection_html(results: Mapping[str, Any]) -> str:
    notes, head, rows = _selection_table(results)
    if not rows:
        return ""
    heads = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        f"<tr><th>{escape(row[0])}</th>"
        + "".join(f'<td class="num">{escape(c)}</td>' for c in row[1:])
        + "</tr>"
        for row in rows
    )
    return (
        f'<h2>Test-time selection</h2><p class="sub">{escape("; ".join(notes))}. Each value is the expected '
        "pass over random N-subsets of a task's samples, with a bootstrap interval over tasks.</p>"
        f"<table><tr>{heads}</tr>{body}</table>"
    )


def _multi_turn_html(results: Mapping[str, Any]) -> str:
    """The multi-turn figures, and links to the episodes that recovered from a failed first attempt."""
    rows = multi_turn_rows(results["metrics"])
    if not rows:
        return ""
    body = "".join(
        f'<tr><th>{escape(a)}</th><td class="num">{escape(b)}</td><td>{escape(c)}</td><td class="muted">{escape(d)}</td></tr>'
        for a, b, c, d in rows
    )
    recovered = [
        (task, sample)
        for task in results["tasks"]
        for sample in task["samples"]
        if sample.get("first_attempt_passed") is False and sample["passed"]
    ]
    links = ", ".join(
        f'<a href="{transcript_name(task["task_index"])}#sample-{s["sample"]}">{escape(task["task_id"])} '
        f"sample {s['sample']}</a>"
        for task, s in recovered[:30]
    )
    more = f" and {len(recovered) - 30} more" if len(recovered) > 30 else ""
    listed = f'<p class="sub">Recovered ↻: {links}{more}.</p>' if recovered else ""
    return f"<h2>Multi-turn</h2><table>{body}</table>{listed}"


def _stop_table(results: Mapping[str, Any]) -> str:
    counts = results["metrics"]["stop_reasons"]
    total = max(1, sum(counts.values()))
    body = "".join(
        f'<tr><td>{escape(name)}</td><td class="num">{count}</td><td class="num">{100 * count / total:.1f}%</td></tr>'
        for name, count in counts.items()
    )
    errors = results["metrics"]["errors"]["top"]
    error_rows = "".join(
        f'<tr><td class="num">{e["count"]}</td><td><pre>{escape(e["error"][:2000])}</pre></td></tr>'
        for e in errors
    )
    error_table = (
        f"<h3>Most frequent errors</h3><table><tr><th>episodes</th><th>error</th></tr>{error_rows}</table>"
    )
    return f"<table><tr><th>stop reason</th><th>episodes</th><th>share</th></tr>{body}</table>" + (
        error_table if errors else ""
    )


def transcript_name(task_index: int) -> str:
    return f"transcripts/task-{int(task_index):05d}.html"


def _tasks_table(results: Mapping[str, Any]) -> str:
    ks = list(results["metrics"]["pass_at_k"])
    head = "".join(f"<th>pass@{escape(k)}</th>" for k in ks)
    with_env_ids = any(task.get("env_task_id") is not None for task in results["tasks"])
    rows = []
    for task in results["tasks"]:
        link = transcript_name(task["task_index"])
        dots = "".join(
            f'<a href="{link}#sample-{s["sample"]}" class="{"ok" if s["passed"] else "bad"}" '
            f'title="sample {s["sample"]}: reward {_num(s["reward"])}, {escape(s["stop_reason"])}">'
            f"{('↻' if s.get('first_attempt_passed') is False else '●') if s['passed'] else '○'}</a>"
            for s in task["samples"]
        )
        cells = "".join(f'<td class="num">{_num(task["pass_at_k"].get(k))}</td>' for k in ks)
        turns = sum(s["turns"] for s in task["samples"]) / max(1, len(task["samples"]))
        env_id = f"<td>{escape(task.get('env_task_id', ''))}</td>" if with_env_ids else ""
        rows.append(
            f'<tr><td><a href="{link}">{escape(task["task_id"])}</a></td>{env_id}'
            f'<td class="num">{task["passed"]}/{task["n"]}</td><td class="dots">{dots}</td>{cells}'
            f'<td class="num">{_num(task["mean_reward"])}</td><td class="num">{turns:.1f}</td></tr>'
        )
    return (
        f"<table><tr><th>task</th>{'<th>env task id</th>' if with_env_ids else ''}<th>passed</th><th>samples</th>{head}"
        f"<th>mean reward</th><th>mean turns</th></tr>{''.join(rows)}</table>"
    )


def _config_table(config: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{escape(key)}</th><td><code>{escape(json.dumps(value, default=str))}</code></td></tr>"
        for key, value in config.items()
    )
    return f"<table>{rows}</table>"


def html_page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    )


def render_report(results: Mapping[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    """``report.html``: headline cards, plots, metrics, stop reasons, tasks with transcript links, config."""
    config, planned = results["config"], results["planned"]
    figures = "".join(
        f'<figure><img src="{escape(src)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'
        for src, caption in plots
    )
    missing = planned["episodes"] - results["metrics"]["episodes"]
    note = (
        f'<p class="bad">{missing} planned episodes are missing: rerun the eval to play them.</p>'
        if missing > 0
        else ""
    )
    body = (
        f"<h1>{escape(_title(results))}</h1>"
        f'<p class="sub">{results["metrics"]["tasks"]} tasks × {planned["samples_per_task"]} samples · '
        f"temperature {escape(config['temperature'])} · seed {escape(config['seed'])} · {escape(results['created'])}"
        f" · agentrl {escape(results['agentrl_version'])}</p>"
        f'<p class="sub">passed: {escape(results["pass_rule"])} · intervals: {config["confidence"]:.0%} bootstrap '
        f"over tasks ({escape(config['resamples'])} resamples)</p>{note}"
        f'<div class="cards">{_cards(results)}</div>'
        f'<h2>Plots</h2><div class="grid">{figures}</div>'
        f"{_selection_html(results)}{_multi_turn_html(results)}"
        f"<h2>Metrics</h2>{_metrics_table(results)}"
        f"<h2>Stop reasons</h2>{_stop_table(results)}"
        f'<h2>Tasks</h2><p class="sub">● passed ○ failed{" ↻ passed after a failed first attempt" if "multi_turn" in results["metrics"] else ""}; each links to its transcript.</p>{_tasks_table(results)}'
        f"<h2>Config</h2>{_config_table(config)}"
    )
    return html_page(f"agentrl eval: {_title(results)}", body)


# ---------------------------------------------------------------------------------------------- transcripts
def _tool_calls(content: str) -> str:
    """An assistant turn with tool calls: its text, then each call with its arguments laid out (code with
    real line breaks), the malformed blocks counted, and the raw text one click away. '' for no calls."""
    from agentrl.tools import parse_tool_calls

    parsed = parse_tool_calls(content)
    if not parsed.calls:
        return ""
    parts = [f"<pre>{escape(parsed.content)}</pre>"] if parsed.content else []
    for call in parsed.calls:
        args = []
        for name, value in call.arguments.items():
            if isinstance(value, str) and ("\n" in value or len(value) > 80):
                args.append(f'<div class="arg">{escape(name)}:</div><pre class="code">{escape(value)}</pre>')
            else:
                args.append(
                    f'<div class="arg">{escape(name)} = <code>{escape(json.dumps(value))}</code></div>'
                )
        parts.append(f'<div class="call">→ call <strong>{escape(call.name)}</strong>{"".join(args)}</div>')
    if parsed.errors:
        parts.append(f'<p class="bad">{len(parsed.errors)} malformed tool call(s); see the raw text</p>')
    parts.append(f"<details><summary>raw text</summary><pre>{escape(content)}</pre></details>")
    return "".join(parts)


def _message(message: Mapping[str, Any], reward_line: str) -> str:
    role = str(message.get("role", "?"))
    label = f'<span class="name">{escape(role)}</span>'
    for key in ("name", "tool_call_id"):  # shown as sent: ids are case-sensitive
        if message.get(key):
            label += f" · {escape(message[key])}"
    content = str(message.get("content") or "")
    more = ""
    if len(content) > MAX_MESSAGE_CHARS:
        more = f'<p class="muted">… {len(content) - MAX_MESSAGE_CHARS} more characters (full text in episodes.jsonl)</p>'
        content = content[:MAX_MESSAGE_CHARS]
    role_class = role if role in ("system", "user", "assistant", "tool") else "other"
    body = (_tool_calls(content) if role == "assistant" else "") or f"<pre>{escape(content)}</pre>"
    return f'<div class="msg {role_class}"><div class="role">{label}</div>{body}{more}{reward_line}</div>'


def render_sample(trajectory: Trajectory, sample: Mapping[str, Any], open_: bool) -> str:
    """One episode as a ``<details>`` block: its messages with per-turn rewards, the error if any, and a
    summary line from ``sample`` (an entry of a task's ``samples`` in ``results.json``). Needs :data:`CSS`."""
    turn_iter = iter(trajectory.turns)
    parts = []
    for message in trajectory.messages:
        reward_line = ""
        if message.get("role") == "assistant":
            turn = next(turn_iter, None)
            if turn is not None:
                parts_text = ", ".join(f"{k} {v:g}" for k, v in turn.reward_components.items())
                reward_line = f'<p class="reward">turn reward {turn.reward:g}{f" ({escape(parts_text)})" if parts_text else ""}</p>'
        parts.append(_message(message, reward_line))
    verdict = '<span class="ok">passed</span>' if sample["passed"] else '<span class="bad">failed</span>'
    turns = f"{sample['turns']} turn" + ("" if sample["turns"] == 1 else "s")
    summary = (
        f"sample {sample['sample']} · {verdict} · reward {_num(sample['reward'])} · {turns} · "
        f"{sample['sampled_tokens']} tokens · {escape(sample['stop_reason'])} · {_num(sample['latency_s'], 2)} s"
    )
    if "score" in sample:
        summary += f" · score {_num(sample['score'])}"
    if "answer" in sample:
        summary += f" · answer {escape(sample['answer'] if sample['answer'] is not None else '–')}"
    if sample.get("first_attempt_passed") is False:
        summary += " · first attempt failed" + (", recovered ↻" if sample["passed"] else "")
    error = f'<div class="error"><pre>{escape(trajectory.error)}</pre></div>' if trajectory.error else ""
    return (
        f'<details class="sample" id="sample-{sample["sample"]}"{" open" if open_ else ""}><summary>{summary}</summary>'
        f"{error}{''.join(parts)}</details>"
    )


def render_transcript(
    results: Mapping[str, Any],
    task: Mapping[str, Any],
    trajectories: Sequence[Trajectory],
    neighbours: tuple[Any, Any],
) -> str:
    """One task's page: every sample's conversation with per-turn rewards, stop reason and error."""
    by_sample = {int(t.meta["sample_index"]): t for t in trajectories}
    previous, following = neighbours
    nav = ['<a href="../report.html">← report</a>']
    if previous is not None:
        nav.append(f'<a href="../{transcript_name(previous)}">previous task</a>')
    if following is not None:
        nav.append(f'<a href="../{transcript_name(following)}">next task</a>')
    samples = "".join(
        render_sample(by_sample[int(s["sample"])], s, open_=i == 0)
        for i, s in enumerate(task["samples"])
        if int(s["sample"]) in by_sample
    )
    env_id = f" ({escape(task['env_task_id'])})" if task.get("env_task_id") is not None else ""
    body = (
        f"<nav>{''.join(nav)}</nav><h1>{escape(task['task_id'])}{env_id}</h1>"
        f'<p class="sub">{escape(_title(results))} · passed {task["passed"]}/{task["n"]} · mean reward '
        f"{_num(task['mean_reward'])} · passed means {escape(results['pass_rule'])}</p>{samples}"
    )
    return html_page(f"{task['task_id']} · {_title(results)}", body)


def write_report(out: Path, results: Mapping[str, Any], trajectories: Sequence[Trajectory]) -> Path:
    """Write plots, ``report.html`` and one transcript page per task into ``out``; returns the report's path."""
    from agentrl.evaluation.plots import write_plots

    out = Path(out)
    plots = write_plots(out, results)
    by_task: dict[int, list[Trajectory]] = {}
    for trajectory in trajectories:
        by_task.setdefault(int(trajectory.meta["task_index"]), []).append(trajectory)
    (out / "transcripts").mkdir(parents=True, exist_ok=True)
    indices = [int(task["task_index"]) for task in results["tasks"]]
    for n, task in enumerate(results["tasks"]):
        neighbours = (indices[n - 1] if n > 0 else None, indices[n + 1] if n + 1 < len(indices) else None)
        page = render_transcript(results, task, by_task.get(int(task["task_index"]), []), neighbours)
        # backslashreplace: a string that reached the page without escape() still cannot stop the write
        (out / transcript_name(task["task_index"])).write_text(page, encoding="utf-8", errors="backslashreplace")
    path = out / "report.html"
    path.write_text(render_report(results, plots), encoding="utf-8", errors="backslashreplace")
    return path
