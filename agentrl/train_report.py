"""The end-of-run report of a training run: ``report.html`` with PNG plots, drawn from its run directory.

:func:`write_train_report` reads ``metrics.jsonl``, ``state.json`` and ``config.yaml`` (see
:mod:`agentrl.tracking`) and writes ``plots/*.png`` and ``report.html``. The page stands alone: the plots are
embedded in it (base64), the PNG files are kept beside it for slides and notes. It carries no scripts, and
every piece of text from the run (config values, metric and phase names) is escaped.

What it draws, from whatever the log has (a plot without data is skipped, and the page says so):
reward (mean ± std), pass rate, reward components, KL, entropy, response length, the reward-hacking monitors
(:mod:`agentrl.rewards.monitors`, logged bare or under ``monitor/`` or ``monitors/``), training loss (SFT, DPO), the
multi-turn figures (``mt/*``: first-attempt pass, recovery, turns per episode, tool calls per turn) and the
evaluations. Where the evaluations graded attempts, their multi-turn figures stand side by side and the page
shows a few transcripts of episodes of the last evaluation that recovered from a failed first attempt
(:mod:`agentrl.train_report_turns`). A run whose rollouts played on Ray gets a Cluster section
(:mod:`agentrl.train_report_cluster`).

Evaluations are phases named ``eval`` or ``eval-<label>`` (``eval-sft``: the policy after the ``sft``
phase). Their records carry ``pass@<k>`` (optionally ``pass@<k>/ci_low`` and ``pass@<k>/ci_high``) and
``reward_mean``; the nested form ``pass_at_k/<k>/value`` is read too. The last record of each is a headline.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.progress import format_duration
from agentrl.tracking import (
    CONFIG_FILE,
    STATE_FILE,
    MetricRecord,
    atomic_write_text,
    read_metrics,
)

__all__ = [
    "REPORT_FILE",
    "Chart",
    "Series",
    "chart_axes",
    "charts_for",
    "draw_chart",
    "eval_rows",
    "is_eval_phase",
    "pass_at",
    "render_train_report",
    "write_train_report",
]

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
_PASS = re.compile(r"^pass(?:@|_at_k/)(\d+)(?:/value)?$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Series:
    """One line of a chart: a phase's values of one metric over its steps (``band``: ± this, e.g. std)."""

    label: str
    steps: Sequence[int]
    values: Sequence[float]
    band: Sequence[float] | None = None


@dataclass(frozen=True)
class Chart:
    """A plot to draw: ``name`` is its file stem, ``note`` its caption; ``missing`` says which metrics it
    looks for, shown when the log has none; ``legend`` names even a single series."""

    name: str
    title: str
    ylabel: str
    series: Sequence[Series]
    note: str = ""
    missing: str = ""
    bars: bool = False
    legend: bool = False


# ---- what to draw --------------------------------------------------------------------------------------
def is_eval_phase(phase: str) -> bool:
    """Whether ``phase`` is an evaluation (``eval`` or ``eval-<label>``)."""
    return phase == "eval" or phase.startswith("eval-")


def _series(records: Sequence[MetricRecord], pattern: str, *, phases: str = "train",
            band: str | None = None) -> list[Series]:  # fmt: skip
    """Every (phase, metric) whose name fully matches ``pattern``, as a series over the phase's steps.

    A series is labelled with the metric's last name part (``update/kl`` -> ``kl``), prefixed by its phase
    when several phases have one.
    """
    regex = re.compile(pattern)
    found: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for record in records:
        if is_eval_phase(record.phase) != (phases == "eval"):
            continue
        for name, raw in record.metrics.items():
            if regex.fullmatch(name) and (value := _number(raw)) is not None:
                spread = _number(record.metrics.get(band)) if band else None
                found.setdefault(record.phase, {}).setdefault(name, []).append(
                    (record.step, value, spread or 0.0)
                )
    out = []
    for phase, metrics in found.items():
        for name, points in sorted(metrics.items()):
            label = name.rsplit("/", 1)[-1] if len(found) == 1 else f"{phase}: {name.rsplit('/', 1)[-1]}"
            bands = [p[2] for p in points] if band else None
            out.append(Series(label, [p[0] for p in points], [p[1] for p in points], bands))
    return out


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def eval_rows(records: Sequence[MetricRecord]) -> list[MetricRecord]:
    """The last record of each eval phase, in the order the phases first logged."""
    last: dict[str, MetricRecord] = {}
    for record in records:
        if is_eval_phase(record.phase):
            last[record.phase] = record  # a dict keeps the first insertion's place
    return list(last.values())


def pass_at(metrics: Mapping[str, Any]) -> dict[int, float]:
    """``{k: pass@k}`` from an eval record's metrics, smallest k first."""
    found = {
        int(m.group(1)): x
        for key, v in metrics.items()
        if (m := _PASS.match(key)) and (x := _number(v)) is not None
    }
    return dict(sorted(found.items()))


_SMOOTH_NOTE = " Long runs: faint line per step, bold line a moving average."
_MONITORS_NOTE = (
    "reward_length_corr: correlation of reward with length (a reward paying for length); "
    "repeated_ngram_rate: looping samples; error / truncated: shares of episodes ending so."
)

_GOLD_NOTE = (
    "gold: a held-out score from another verifier or judge than the training reward; gold_proxy: the training "
    "reward's mean since the last gold measurement; overoptimised: 1 once gold fell from its best while the "
    "training reward kept its gain."
)


def charts_for(records: Sequence[MetricRecord]) -> list[Chart]:
    """The report's charts for a run's records, each with its series or the metrics it found none of."""
    components = _series(records, r"reward_components/.+") or _series(records, r"(monitors?/)?reward/.+")
    monitors = r"(monitors?/)?(reward_length_corr|repeated_ngram_rate|error|truncated)"
    # A KL logged as exactly 0 at every step was not measured (beta = 0): say so rather than draw a flat line.
    kl = [s for s in _series(records, r"(update/)?kl") if any(v != 0 for v in s.values)]
    charts = [
        Chart("reward", "Reward", "reward", _series(records, r"reward_mean", band="reward_std"),
              "Mean episode reward per step; the band is ± its std over the step's samples." + _SMOOTH_NOTE,
              "reward_mean"),
        Chart("pass_rate", "Pass rate", "share of episodes", _series(records, r"pass_rate"),
              "Share of the step's episodes that passed." + _SMOOTH_NOTE, "pass_rate"),
        Chart("reward_components", "Reward components", "reward per episode", components,
              "Mean per episode of each named part of the reward; one rising alone can be a hack.",
              "reward_components/* or reward/*", legend=True),
        Chart("kl", "KL to the reference", "KL per token", kl,
              "Mean per-token KL of the policy to the reference model.",
              "kl or update/kl (not measured when beta = 0: no reference model is loaded)"),
        Chart("entropy", "Policy entropy", "nats per token", _series(records, r"(update/)?entropy"),
              "Mean per-token entropy of the policy on its samples; a collapse means it stopped exploring.",
              "entropy or update/entropy"),
        Chart("response_length", "Response length", "sampled tokens per episode",
              _series(records, r"response_tokens_mean"), "Mean tokens the policy sampled per episode.",
              "response_tokens_mean"),
        Chart("monitors", "Reward-hacking monitors", "value", _series(records, monitors), _MONITORS_NOTE,
              "reward_length_corr, repeated_ngram_rate, error or truncated", legend=True),
        Chart("loss", "Training loss", "loss", _series(records, r"loss"),
              "Loss per optimizer step of the supervised and preference phases (SFT, DPO).", "loss"),
    ]  # fmt: skip
    gold = _series(records, r"monitors/(gold|gold_proxy|overoptimised)")
    if gold:  # only runs with a GoldMonitor measure it
        charts.append(Chart("overoptimisation", "Over-optimisation: training reward vs held-out gold", "score",
                            gold, _GOLD_NOTE, legend=True))  # fmt: skip
    charts += _multi_turn_charts(records)
    rows = [(r, pass_at(r.metrics)) for r in eval_rows(records)]
    k = next((next(iter(passes)) for _, passes in rows if passes), 1)
    finals = [
        Series(_eval_label(r.phase, records), [r.step], [passes[k]]) for r, passes in rows if k in passes
    ]
    charts.append(Chart("eval", f"Evaluations: pass@{k}", f"pass@{k}", finals,
                        "The last evaluation of each eval phase, in run order.", "pass@k in an eval phase",
                        bars=True))  # fmt: skip
    during = [s for s in _series(records, r"pass@\d+", phases="eval") if len(s.steps) > 1]
    if during:
        charts.append(Chart("eval_during", "Evaluations during training", "pass@k", during,
                            "Eval phases run more than once, over the step of the policy evaluated."))  # fmt: skip
    return charts


def _multi_turn_charts(records: Sequence[MetricRecord]) -> list[Chart]:
    """Charts of the ``mt/*`` figures the RL phases log per step (:mod:`agentrl.evaluation.multiturn`); only
    those the log has (an env without graded attempts or tool counts logs none of theirs)."""
    wanted = [
        ("mt_recovery", "First attempts and recovery", "share of episodes", r"mt/(final_pass|first_attempt_pass|recovery)",
         "Per step: episodes passing in the end, passing at their first attempt, and the share of failed first "
         "attempts that ended passing (recovery)."),
        ("mt_turns", "Turns per episode", "per episode", r"mt/(turns_per_episode|attempts_per_episode)",
         "Mean turns and graded attempts per episode."),
        ("mt_tools", "Tool calls per turn", "per turn / share", r"mt/(tool_calls_per_turn|tool_error_rate)",
         "Mean tool calls per turn, and the share of them that errored."),
    ]  # fmt: skip
    charts = []
    for name, title, ylabel, pattern, note in wanted:
        series = _series(records, pattern)
        if series:
            charts.append(Chart(name, title, ylabel, series, note, legend=True))
    return charts


def _eval_label(phase: str, records: Sequence[MetricRecord]) -> str:
    """``eval-sft`` -> ``after sft`` when ``sft`` is a phase of the run, else the suffix."""
    if phase == "eval":
        return phase
    suffix = phase.removeprefix("eval-")
    return f"after {suffix}" if any(r.phase == suffix for r in records) else suffix


# ---- plots --------------------------------------------------------------------------------------------------
def _mpl_text(text: str) -> str:
    """Text that matplotlib shows as written: ``$`` opens math mode, a leading ``_`` hides a legend entry."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _smooth(values: Sequence[float]) -> list[float] | None:
    """A trailing moving average over ~5% of the points, for noisy curves with many steps; None if few."""
    n = len(values)
    if n < 40:
        return None
    window = max(2, n // 20)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(n)]


def chart_axes(title: str) -> tuple[Any, Any]:
    """A new figure and its axes in the report's look (size, title, spines, grid), on matplotlib's Agg canvas
    (pyplot's global state is untouched)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.set_title(_mpl_text(title), fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def draw_chart(chart: Chart, path: Path) -> Path:
    """Render ``chart`` to the PNG ``path``."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = chart_axes(chart.title)
    if chart.bars:
        labels = [_mpl_text(s.label) for s in chart.series]
        values = [s.values[0] for s in chart.series]
        bars = ax.bar(range(len(values)), values, color="#3b6ea8", width=0.6)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=9)
        ax.set_xticks(range(len(values)), labels)
        ax.set_ylim(0, max(1.0, *values) * 1.12)
    else:
        for i, s in enumerate(chart.series):
            color = f"C{i % 10}"
            smooth = _smooth(s.values)
            ax.plot(s.steps, s.values, color=color, alpha=0.35 if smooth else 1.0, lw=1.2,
                    marker="o" if len(s.steps) < 30 else None, ms=3, label=None if smooth else _mpl_text(s.label))  # fmt: skip
            if smooth:
                ax.plot(s.steps, smooth, color=color, lw=1.8, label=_mpl_text(s.label))
            if s.band is not None:
                low = [v - b for v, b in zip(s.values, s.band, strict=True)]
                high = [v + b for v, b in zip(s.values, s.band, strict=True)]
                ax.fill_between(s.steps, low, high, color=color, alpha=0.12, lw=0)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if chart.legend or len(chart.series) > 1:
            ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_ylabel(_mpl_text(chart.ylabel))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---- the page -------------------------------------------------------------------------------------------------
def escape(text: Any) -> str:
    """Text made safe for HTML content and quoted attributes; control characters shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", html.escape(str(text), quote=True))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _cards(records: Sequence[MetricRecord], phases: Mapping[str, Mapping[str, Any]]) -> str:
    cards: list[tuple[str, str, str]] = []
    previous: tuple[str, int, float] | None = None  # the last eval's label, k and pass@k
    for row in eval_rows(records):
        passes = pass_at(row.metrics)
        if not passes:
            continue
        k, value = next(iter(passes.items()))
        label = _eval_label(row.phase, records)
        interval = _with_ci(row.metrics, f"pass@{k}").partition(" ")[2]
        sub = f"{interval or row.phase}, step {row.step}"
        if previous is not None and previous[1] == k:
            sub += f" · {value - previous[2]:+.3f} vs {previous[0]}"
        cards.append((f"pass@{k} {label}", f"{value:.3f}", sub))
        previous = (label, k, value)
    for phase, rows in _by_phase(records).items():
        tail = [v for r in rows[-10:] if (v := _number(r.metrics.get("reward_mean"))) is not None]
        if tail and not is_eval_phase(phase):
            cards.append(
                (f"reward, {phase}", f"{sum(tail) / len(tail):.3f}", f"mean of its last {len(tail)} steps")
            )
    total = sum(_seconds(p, rows, phases) for p, rows in _by_phase(records).items())
    cards.append(("run time", format_duration(total), f"{len(_by_phase(records))} phases"))
    return "".join(f'<div class="card"><div class="l">{escape(label)}</div><div class="v">{escape(value)}</div>'
                   f'<div class="l">{escape(sub)}</div></div>' for label, value, sub in cards)  # fmt: skip


def _by_phase(records: Sequence[MetricRecord]) -> dict[str, list[MetricRecord]]:
    out: dict[str, list[MetricRecord]] = {}
    for record in records:
        out.setdefault(record.phase, []).append(record)
    return out


def _seconds(phase: str, rows: Sequence[MetricRecord], phases: Mapping[str, Mapping[str, Any]]) -> float:
    seconds = phases.get(phase, {}).get("seconds")
    value = _number(seconds)
    return value if value is not None else (rows[-1].elapsed if rows else 0.0)


def _phase_table(records: Sequence[MetricRecord], phases: Mapping[str, Mapping[str, Any]]) -> str:
    by_phase = _by_phase(records)
    head = "<tr><th>phase</th><th>status</th><th>steps</th><th>run time</th><th>last values</th></tr>"
    rows = []
    for phase in dict.fromkeys([*phases, *by_phase]):
        entry, logged = phases.get(phase, {}), by_phase.get(phase, [])
        last = logged[-1].metrics if logged else {}
        keys = [
            k
            for k in ("pass_rate", "reward_mean", "loss", "reward_std", "accuracy")
            if _number(last.get(k)) is not None
        ]
        keys += [k for k in last if _PASS.match(k) and _number(last[k]) is not None]
        shown = ", ".join(f"{k} {_fmt(last[k])}" for k in keys) or "–"
        step = entry.get("step", logged[-1].step if logged else 0)
        steps = f"{step}/{entry['total']}" if entry.get("total") else str(step)
        if is_eval_phase(phase):  # its step is the evaluated policy's: say how often it ran instead
            steps = f"{len(logged)} run" + ("s" if len(logged) != 1 else "")
        rows.append(f"<tr><td>{escape(phase)}</td><td>{escape(entry.get('status', 'not in state.json'))}</td>"
                    f'<td class="num">{escape(steps)}</td><td class="num">{escape(format_duration(_seconds(phase, logged, phases)))}'
                    f"</td><td>{escape(shown)}</td></tr>")  # fmt: skip
    return f"<table>{head}{''.join(rows)}</table>"


def _with_ci(metrics: Mapping[str, Any], name: str) -> str:
    """A metric's value, followed by ``[low, high]`` when ``<name>/ci_low`` and ``<name>/ci_high`` are logged."""
    low, high = _number(metrics.get(f"{name}/ci_low")), _number(metrics.get(f"{name}/ci_high"))
    interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
    return _fmt(metrics.get(name)) + interval


def _eval_table(records: Sequence[MetricRecord]) -> str:
    rows = eval_rows(records)
    if not rows:
        return ""
    names = {k for r in rows for k, v in r.metrics.items() if v is not None and not k.startswith("mt/")}
    names -= {n for n in names if n.endswith(("/ci_low", "/ci_high")) and n.rsplit("/", 1)[0] in names}
    ordered = sorted(names, key=lambda k: (not _PASS.match(k), k))
    head = (
        "<tr><th>evaluation</th><th>step</th>" + "".join(f"<th>{escape(n)}</th>" for n in ordered) + "</tr>"
    )
    body = "".join(
        f"<tr><td>{escape(_eval_label(r.phase, records))}</td><td class=\"num\">{r.step}</td>"
        + "".join(f'<td class="num">{escape(_with_ci(r.metrics, n))}</td>' for n in ordered) + "</tr>"
        for r in rows
    )  # fmt: skip
    return f"<h2>Evaluations</h2><table>{head}{body}</table>"


def render_train_report(records: Sequence[MetricRecord], state: Mapping[str, Any], config: Mapping[str, Any],
                        charts: Sequence[Chart], images: Mapping[str, bytes], *, title: str,
                        transcripts: str = "", cluster: str = "") -> str:  # fmt: skip
    """The report page: headline cards, phases, evaluations (with their multi-turn figures side by side),
    the charts drawn (``images``: PNG bytes by chart name, embedded), the charts without data, ``cluster``
    (HTML of :func:`agentrl.train_report_cluster.cluster_section`), ``transcripts`` (HTML of
    :func:`agentrl.train_report_turns.recovered_transcripts`) and the config."""
    from agentrl.evaluation.report import CSS as TRANSCRIPT_CSS
    from agentrl.train_report_turns import multi_turn_eval_table

    phases = state.get("phases", {})
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(images[c.name]).decode()}" alt="{escape(c.title)}">'
        f"<figcaption>{escape(c.note)}</figcaption></figure>"
        for c in charts if c.name in images
    )  # fmt: skip
    missing = "".join(
        f"<li>{escape(c.title)}: no {escape(c.missing)}</li>" for c in charts if c.name not in images
    )
    config_rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(json.dumps(v, default=str))}</code></td></tr>"
                          for k, v in _flatten(config))  # fmt: skip
    body = (
        f"<h1>{escape(title)}</h1>"
        f'<p class="sub">{len(records)} records in {len(_by_phase(records))} phases · report written '
        f"{escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
        f'<div class="cards">{_cards(records, phases)}</div>'
        f"<h2>Phases</h2>{_phase_table(records, phases)}"
        f"{_eval_table(records)}{multi_turn_eval_table(records)}"
        f'<h2>Plots</h2><div class="grid">{figures or "<p>No metrics logged yet.</p>"}</div>'
        + (f'<p class="sub">Not plotted (no data in the log):</p><ul class="sub">{missing}</ul>' if missing else "")
        + cluster
        + transcripts
        + (f"<h2>Config</h2><table>{config_rows}</table>" if config_rows else "")
    )  # fmt: skip
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}{TRANSCRIPT_CSS if transcripts else ''}</style></head>\n"
            f"<body><main>\n{body}\n</main></body></html>\n")  # fmt: skip


def write_train_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write ``plots/*.png`` and ``report.html`` into ``run_dir`` from its logs (runs finished or not).

    Args:
        run_dir: a run directory (:class:`agentrl.tracking.RunDir`).
        title: the page's heading; by default ``agentrl train: <env> · <model>`` from the config, or the
            directory's name.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: a corrupt ``metrics.jsonl`` line (see :func:`agentrl.tracking.read_metrics`).
    """
    import yaml

    run = Path(run_dir)
    records = read_metrics(run)
    state = json.loads((run / STATE_FILE).read_text(encoding="utf-8")) if (run / STATE_FILE).is_file() else {}
    config_file = run / CONFIG_FILE
    config = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}) if config_file.is_file() else {}
    if title is None:
        parts = [str(config[k]) for k in ("env", "model") if isinstance(config, Mapping) and config.get(k)]
        title = f"agentrl train: {' · '.join(parts) or run.resolve().name}"
    charts = charts_for(records)
    images = {}
    for chart in charts:
        path = run / PLOTS_DIR / f"{chart.name}.png"
        if chart.series:
            images[chart.name] = draw_chart(chart, path).read_bytes()
        else:
            path.unlink(missing_ok=True)  # drawn by an earlier report, before a resume cut its data
    mapping = config if isinstance(config, Mapping) else {}
    from agentrl.train_report_cluster import cluster_section
    from agentrl.train_report_turns import recovered_transcripts

    transcripts = recovered_transcripts(run, records)
    cluster = cluster_section(run, records, mapping)
    page = render_train_report(records, state, mapping, charts, images, title=title, transcripts=transcripts,
                               cluster=cluster)  # fmt: skip
    atomic_write_text(run / REPORT_FILE, page)
    return run / REPORT_FILE


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:30px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#5b6573;margin:4px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:160px}
.card .v{font-size:24px;font-weight:600} .card .l{color:#5b6573;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px}
figure img{width:100%;height:auto} figcaption{color:#5b6573;font-size:13px;padding:2px 6px}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600} caption{text-align:left;padding:2px 0 6px} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:13px ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
"""
