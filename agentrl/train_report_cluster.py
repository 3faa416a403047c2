"""The cluster part of a training run's report (:mod:`agentrl.train_report`): what the rollouts on Ray did.

A run with a ``cluster`` section logs ``cluster/<name>`` figures with each RL step (:mod:`agentrl.cluster.metrics`).
:func:`cluster_section` draws them, per phase that logged them: throughput and the learner's idle share, the
busy shares of the generation engines and env workers, the queue depths, the staleness of the trained samples
(stacked shares per staleness, with the maximum and the ``max_staleness`` bound), the means of what was sampled
against what was trained (the bias asynchrony brings), and a table of the fault counters at the end of the phase.
A run without ``cluster/`` figures gets no section at all.

Reading the log is kept apart from drawing: :func:`cluster_charts` and :func:`fault_counts` are pure functions
of the records, :func:`draw_cluster_chart` renders one chart with matplotlib, as the rest of the report does.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.tracking import MetricRecord
from agentrl.train_report import Series, _mpl_text, _number, _smooth, chart_axes, escape, is_eval_phase

__all__ = [
    "FAULT_COUNTERS",
    "PREFIX",
    "ClusterChart",
    "cluster_charts",
    "cluster_phases",
    "cluster_section",
    "counter_total",
    "draw_cluster_chart",
    "fault_counts",
    "staleness_shares",
]

PREFIX = "cluster/"

FAULT_COUNTERS = (
    ("worker_lost", "episodes whose env-worker actor died under them (replayed on another worker)"),
    ("engine_lost", "generation requests whose engine died (retried on another engine)"),
    (
        "engine_timeout",
        "generation requests that outlasted cluster.engine_timeout_s (retried on another engine)",
    ),
    ("engine_unavailable", "episodes whose requests found no live engine after every retry (replayed)"),
    ("sandbox_lost", "episodes whose sandbox failed under them (replayed)"),
    ("replayed", "replays of episodes lost to the infrastructure, with the same seeds"),
    ("lost", "episodes still lost after cluster.episode_retries replays: left out of their group"),
    ("dropped_groups", "groups staler than max_staleness, discarded (admission 'drop')"),
    ("duplicates", "outcomes of an episode already settled, ignored"),
    ("settled", "episodes settled (each exactly once)"),
)
"""The cumulative counters of a cluster run, in the table's order: (name under ``cluster/``, what it counts)."""

_INFRA_NOTE = (
    "An infrastructure failure never enters a group as a reward of 0: the episode is replayed, and one still "
    "lost is left out of its group."
)


@dataclass(frozen=True)
class ClusterChart:
    """A cluster plot: ``left`` on the main axis (stacked as shares when ``stacked``), ``right`` on a second
    axis (``right_label``), ``bound`` a dashed horizontal line on it; ``share``: the main axis runs 0..1;
    ``missing``: what it looks for, shown when the log has none."""

    name: str
    title: str
    note: str
    left: Sequence[Series]
    left_label: str
    right: Sequence[Series] = ()
    right_label: str = ""
    stacked: bool = False
    share: bool = False
    bound: float | None = None
    missing: str = ""


# ---- what to draw --------------------------------------------------------------------------------------
def cluster_phases(records: Sequence[MetricRecord]) -> dict[str, list[MetricRecord]]:
    """The records of each training phase that logged ``cluster/`` figures, by phase in run order."""
    out: dict[str, list[MetricRecord]] = {}
    for record in records:
        if not is_eval_phase(record.phase) and any(k.startswith(PREFIX) for k in record.metrics):
            out.setdefault(record.phase, []).append(record)
    return out


def _line(rows: Sequence[MetricRecord], name: str, label: str) -> list[Series]:
    """``cluster/<name>`` over the steps that logged it as a number, as one series ([] when none did)."""
    points = [(r.step, v) for r in rows if (v := _number(r.metrics.get(PREFIX + name))) is not None]
    return [Series(label, [s for s, _ in points], [v for _, v in points])] if points else []


def staleness_shares(rows: Sequence[MetricRecord]) -> tuple[list[Series], list[Series]]:
    """The share of each step's trained samples per staleness (``staleness/<k>`` counts over their sum), one
    series per ``k`` seen, and the step's maximum; steps that trained nothing are left out of both."""
    counts: list[tuple[int, dict[int, float]]] = []
    for r in rows:
        found = {int(key.rsplit("/", 1)[1]): v for key, raw in r.metrics.items()
                 if key.startswith(PREFIX + "staleness/") and key.rsplit("/", 1)[1].isdigit()
                 and (v := _number(raw)) is not None}  # fmt: skip
        if sum(found.values()) > 0:
            counts.append((r.step, found))
    steps = [step for step, _ in counts]
    shares = [
        Series(f"{k} behind", steps, [c.get(k, 0.0) / sum(c.values()) for _, c in counts])
        for k in sorted({k for _, c in counts for k in c})
    ]
    trained = {step for step, _ in counts}
    return shares, _line([r for r in rows if r.step in trained], "staleness_max", "max")


def cluster_charts(rows: Sequence[MetricRecord], max_staleness: float | None = None) -> list[ClusterChart]:
    """The cluster plots of one phase's records; a chart whose figures were never logged has no series."""
    shares, most = staleness_shares(rows)
    both = "sampled: every episode that came back during the step; trained: those its update trained on"
    return [
        ClusterChart("cluster_throughput", "Throughput and learner idle", "Episodes that came back per second "
                     "of the step (left); the share of the step the learner waited for data (right, dashed).",
                     _line(rows, "episodes_per_s", "episodes/s"), "episodes / s",
                     _line(rows, "learner_idle", "learner idle"), "share of the step",
                     missing="cluster/episodes_per_s or cluster/learner_idle"),
        ClusterChart("cluster_busy", "Engine and env-worker busy", "Share of the step's wall time a generation "
                     "engine (an env worker) had at least one request (episode) in flight, averaged over them.",
                     _line(rows, "engine_busy", "engines") + _line(rows, "worker_busy", "env workers"),
                     "busy share", share=True, missing="cluster/engine_busy or cluster/worker_busy"),
        ClusterChart("cluster_queues", "Queues", "At the end of the step: episodes submitted and not back, "
                     "generation requests at the engines, finished groups waiting for the learner.",
                     _line(rows, "queue/episodes", "episodes in flight")
                     + _line(rows, "queue/requests", "requests at engines")
                     + _line(rows, "queue/groups_ready", "groups ready"), "count", missing="cluster/queue/*"),
        ClusterChart("cluster_staleness", "Staleness of trained samples", "Share of each step's trained samples "
                     "by how many weight versions their oldest turn is behind the learner; the maximum (right, "
                     "dashed) and the max_staleness bound. Steps that trained nothing are left out.",
                     shares, "share of trained samples", most, "versions behind", stacked=True, share=True,
                     bound=max_staleness, missing="cluster/staleness/<k> (no step trained a sample)"),
        ClusterChart("cluster_reward_bias", "Reward: sampled vs trained", f"Mean episode reward; {both}. A "
                     "gap is the bias asynchrony brings (slow, long episodes come back late).",
                     _line(rows, "sampled/reward", "sampled") + _line(rows, "trained/reward", "trained"),
                     "reward per episode", missing="cluster/sampled/reward or cluster/trained/reward"),
        ClusterChart("cluster_length_bias", "Length: sampled vs trained", f"Mean sampled tokens per episode; "
                     f"{both}.", _line(rows, "sampled/length", "sampled") + _line(rows, "trained/length", "trained"),
                     "sampled tokens per episode", missing="cluster/sampled/length or cluster/trained/length"),
    ]  # fmt: skip


def counter_total(values: Sequence[float]) -> float:
    """A cumulative counter's total over a phase's steps: its last value, plus the value it had before each
    restart (a drop: a resumed phase counts from 0 again)."""
    total = previous = 0.0
    for value in values:
        if value < previous:
            total += previous
        previous = value
    return total + previous


def fault_counts(rows: Sequence[MetricRecord]) -> dict[str, float]:
    """The total of each of :data:`FAULT_COUNTERS` over one phase's records (one never logged counted 0: a
    counter is logged once it first counts)."""
    return {
        name: counter_total([_number(r.metrics.get(PREFIX + name)) or 0.0 for r in rows])
        for name, _ in FAULT_COUNTERS
    }


# ---- drawing -------------------------------------------------------------------------------------------
def _draw_lines(ax: Any, series: Sequence[Series], first_color: int, style: str = "-") -> None:
    for i, s in enumerate(series, start=first_color):
        color = f"C{i % 10}"
        smooth = _smooth(s.values)
        ax.plot(s.steps, s.values, style, color=color, alpha=0.35 if smooth else 1.0, lw=1.2,
                marker="o" if len(s.steps) < 30 else None, ms=3, label=None if smooth else _mpl_text(s.label))  # fmt: skip
        if smooth:
            ax.plot(s.steps, smooth, style, color=color, lw=1.8, label=_mpl_text(s.label))


def _draw_stacked(ax: Any, series: Sequence[Series]) -> None:
    from matplotlib import colormaps

    colors = colormaps["viridis"]
    bottom = [0.0] * len(series[0].steps)
    width = 0.8 if len(bottom) <= 60 else 1.0  # many steps: bars touch, as an area would
    for i, s in enumerate(series):
        color = colors(0.15 + 0.7 * i / max(1, len(series) - 1))
        ax.bar(s.steps, s.values, bottom=bottom, width=width, color=color, lw=0, label=_mpl_text(s.label))
        bottom = [b + v for b, v in zip(bottom, s.values, strict=True)]


def draw_cluster_chart(chart: ClusterChart, path: Path) -> Path:
    """Render ``chart`` to the PNG ``path`` in the look of :func:`agentrl.train_report.draw_chart`."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = chart_axes(chart.title)
    if chart.stacked and chart.left:
        _draw_stacked(ax, chart.left)
    else:
        _draw_lines(ax, chart.left, 0)
    if chart.share:
        ax.set_ylim(0, 1.05)
    elif all(v >= 0 for s in chart.left for v in s.values):  # from 0, so a flat rate reads as one
        ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel(_mpl_text(chart.left_label))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if chart.right:
        twin = ax.twinx()
        twin.spines[["top"]].set_visible(False)
        first = 7 if chart.stacked else len(chart.left)  # C7: grey over the coloured bars
        _draw_lines(twin, chart.right, first, "--")
        if chart.bound is not None:
            twin.axhline(chart.bound, color="#c0392b", ls=":", lw=1.2, label="max_staleness")
        twin.set_ylabel(_mpl_text(chart.right_label))
        if chart.stacked:
            twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max(1.0, chart.bound or 0.0, *(v for s in chart.right for v in s.values))
        twin.set_ylim(0, top * 1.1)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if chart.stacked:  # beside the bars, which fill the axes
        fig.legend(handles, labels, fontsize=8, frameon=False, loc="outside right upper")
    else:
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---- the page ------------------------------------------------------------------------------------------
def _setup(config: Mapping[str, Any]) -> str:
    """A line on the run's cluster from its config (env workers, engines, the asynchronous bound); '' if none."""
    cluster, learner = config.get("cluster"), config.get("learner")
    if not isinstance(cluster, Mapping):
        return ""
    parts = [_count(cluster.get("env_workers"), "env worker"), _count(cluster.get("engines"), "engine")]
    staleness = learner.get("max_staleness") if isinstance(learner, Mapping) else None
    parts.append(f"asynchronous, max_staleness {staleness}, admission {cluster.get('admission', 'pace')}"
                 if staleness is not None else "synchronous")  # fmt: skip
    return "; ".join(parts)


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fault_table(phases: Mapping[str, Sequence[MetricRecord]]) -> str:
    totals = {phase: fault_counts(rows) for phase, rows in phases.items()}
    head = (
        "<tr><th>counter</th>"
        + "".join(f"<th>{escape(p)}</th>" for p in totals)
        + "<th>what it counts</th></tr>"
    )
    body = "".join(
        f"<tr><td><code>{escape(name)}</code></td>"
        + "".join(f'<td class="num">{counts[name]:.0f}</td>' for counts in totals.values())
        + f"<td>{escape(meaning)}</td></tr>"
        for name, meaning in FAULT_COUNTERS
    )
    caption = f"Totals at the end of each phase (cluster/&lt;counter&gt;). {escape(_INFRA_NOTE)}"
    return f'<table class="faults"><caption class="sub">{caption}</caption>{head}{body}</table>'


def cluster_section(run_dir: Path, records: Sequence[MetricRecord], config: Mapping[str, Any]) -> str:
    """The report's Cluster section: its plots, drawn to ``run_dir/plots/cluster_*.png`` and embedded, and the
    fault counters; '' (and no cluster plot left in ``plots/``) when no phase logged ``cluster/`` figures."""
    phases = cluster_phases(records)
    learner = config.get("learner")
    bound = _number(learner.get("max_staleness")) if isinstance(learner, Mapping) else None
    figures, missing, drawn = [], [], set()
    for phase, rows in phases.items():
        for chart in cluster_charts(rows, bound):
            suffix = f" ({phase})" if len(phases) > 1 else ""
            if not chart.left and not chart.right:
                missing.append(f"{chart.title}{suffix}: no {chart.missing}")
                continue
            name = f"{chart.name}_{phase}" if len(phases) > 1 else chart.name
            png = draw_cluster_chart(chart, run_dir / "plots" / f"{name}.png").read_bytes()
            drawn.add(f"{name}.png")
            figures.append(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                           f'alt="{escape(chart.title + suffix)}"><figcaption>{escape(chart.note + suffix)}'
                           "</figcaption></figure>")  # fmt: skip
    for stale in (run_dir / "plots").glob("cluster_*.png"):  # drawn by an earlier report
        if stale.name not in drawn:
            stale.unlink()
    if not phases:
        return ""
    setup = _setup(config)
    return (
        '<h2>Cluster</h2><p class="sub">Rollouts on Ray' + (f": {escape(setup)}" if setup else "")
        + ". Per RL step, from the cluster/* figures of metrics.jsonl.</p>"
        + f'<div class="grid">{"".join(figures)}</div>'
        + ('<p class="sub">Not plotted (no data in the log):</p><ul class="sub">'
           + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>" if missing else "")
        + f"<h3>Faults</h3>{_fault_table(phases)}"
    )  # fmt: skip
