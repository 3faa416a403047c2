"""PNG plots of an eval run (matplotlib on the Agg backend: no display needed).

Each function draws one figure from ``results.json`` data and returns the file name it wrote (or None when
there is nothing to draw); :func:`write_plots` draws them all into ``<out>/plots/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "write_plots"]

COLOR = "#3b6ea8"
PASS_COLOR = "#3a8a4f"
FAIL_COLOR = "#b8483e"


def _samples(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for task in results["tasks"] for s in task["samples"]]


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.3), dpi=110)
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def pass_at_k(results: Mapping[str, Any], path: Path) -> str | None:
    """Bars of pass@k with the bootstrap interval as whiskers."""
    entries = [(int(k), v) for k, v in results["metrics"]["pass_at_k"].items() if v["value"] is not None]
    if not entries:
        return None
    fig, ax = _figure(f"pass@k ({results['config']['confidence']:.0%} bootstrap CI over tasks)")
    xs = [f"pass@{k}" for k, _ in entries]
    values = [v["value"] for _, v in entries]
    low = [v["value"] - (v["ci"][0] if v["ci"][0] is not None else v["value"]) for _, v in entries]
    high = [(v["ci"][1] if v["ci"][1] is not None else v["value"]) - v["value"] for _, v in entries]
    bars = ax.bar(xs, values, color=COLOR, yerr=[low, high], capsize=6, ecolor="#333333")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.3f}",
            (bar.get_x() + bar.get_width() / 2, value),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("estimated pass rate")
    return _save(fig, path)


def reward_histogram(results: Mapping[str, Any], path: Path) -> str | None:
    """Episode rewards, passed and failed episodes stacked."""
    samples = _samples(results)
    if not samples:
        return None
    fig, ax = _figure("episode reward")
    passed = [s["reward"] for s in samples if s["passed"]]
    failed = [s["reward"] for s in samples if not s["passed"]]
    rewards = passed + failed
    lo, hi = min(rewards), max(rewards)
    half = 0.05 * max(1.0, abs(lo))  # one narrow bar when every episode got the same reward
    bins: Any = 20 if hi > lo else [lo - half, lo + half]
    ax.hist(
        [failed, passed],
        bins=bins,
        stacked=True,
        color=[FAIL_COLOR, PASS_COLOR],
        label=[f"failed ({len(failed)})", f"passed ({len(passed)})"],
    )
    rule = results["config"]["pass_rule"]
    if rule["on"] == "reward":
        ax.axvline(rule["threshold"], color="#333333", linestyle="--", linewidth=1, label="pass threshold")
    ax.set_xlabel("total reward")
    ax.set_ylabel("episodes")
    ax.legend(fontsize=8, frameon=False, loc="best")
    return _save(fig, path)


def passes_per_task(results: Mapping[str, Any], path: Path) -> str | None:
    """How many tasks had 0, 1, ..., k passing samples."""
    tasks = results["tasks"]
    if not tasks:
        return None
    k = max(t["n"] for t in tasks)
    counts = [sum(1 for t in tasks if t["passed"] == c) for c in range(k + 1)]
    fig, ax = _figure(f"tasks by passing samples (of {k})")
    ax.bar([str(c) for c in range(k + 1)], counts, color=COLOR)
    ax.set_xlabel("passing samples")
    ax.set_ylabel("tasks")
    return _save(fig, path)


def turns(results: Mapping[str, Any], path: Path) -> str | None:
    """Assistant turns per episode."""
    samples = _samples(results)
    if not samples:
        return None
    values = [s["turns"] for s in samples]
    xs = list(range(min(values), max(values) + 1))
    fig, ax = _figure("turns per episode")
    ax.bar([str(x) for x in xs], [values.count(x) for x in xs], color=COLOR)
    ax.set_xlabel("assistant turns")
    ax.set_ylabel("episodes")
    return _save(fig, path)


def _histogram(title: str, xlabel: str, values: Sequence[float], path: Path) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    fig, ax = _figure(title)
    lo, hi = min(values), max(values)
    ax.hist(values, bins=20 if hi > lo else [lo - 0.5, hi + 0.5], color=COLOR)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("episodes")
    return _save(fig, path)


def sampled_tokens(results: Mapping[str, Any], path: Path) -> str | None:
    """Tokens the policy sampled per episode."""
    return _histogram(
        "sampled tokens per episode", "tokens", [s["sampled_tokens"] for s in _samples(results)], path
    )


def latency(results: Mapping[str, Any], path: Path) -> str | None:
    """Wall-clock seconds per episode."""
    return _histogram("episode latency", "seconds", [s["latency_s"] for s in _samples(results)], path)


def stop_reasons(results: Mapping[str, Any], path: Path) -> str | None:
    """Episodes by stop reason."""
    counts = results["metrics"]["stop_reasons"]
    if not counts:
        return None
    fig, ax = _figure("stop reasons")
    names = list(counts)[::-1]
    ax.set_ylim(-0.5 - max(0, 3 - len(names)) / 2, len(names) - 0.5 + max(0, 3 - len(names)) / 2)
    colors = [PASS_COLOR if n == "terminated" else FAIL_COLOR if n == "error" else "#c99a2e" for n in names]
    ax.barh(names, [counts[n] for n in names], color=colors, height=0.6)
    ax.set_xlabel("episodes")
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    return _save(fig, path)


def reward_components(results: Mapping[str, Any], path: Path) -> str | None:
    """Mean of each reward component per episode."""
    components = results["metrics"]["reward_components"]
    if len(components) < 2:
        return None
    fig, ax = _figure("reward components (mean per episode)")
    names = list(components)
    ax.bar(names, [components[n] for n in names], color=COLOR)
    ax.axhline(0, color="#333333", linewidth=0.8)
    return _save(fig, path)


PLOTS: dict[str, tuple[Callable[[Mapping[str, Any], Path], str | None], str]] = {
    "pass_at_k": (
        pass_at_k,
        "pass@k: bars are the unbiased estimate, whiskers the bootstrap interval over tasks",
    ),
    "reward": (reward_histogram, "episode rewards, failed and passed episodes stacked"),
    "passes_per_task": (passes_per_task, "how many of each task's samples passed"),
    "components": (reward_components, "mean reward components per episode"),
    "turns": (turns, "assistant turns per episode"),
    "tokens": (sampled_tokens, "tokens sampled by the policy per episode"),
    "stop_reasons": (stop_reasons, "why episodes ended"),
    "latency": (latency, "wall-clock seconds per episode"),
}
"""name -> (draw function, caption)."""


def write_plots(out: Path, results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Draw every plot into ``out/plots``; returns ``(relative path, caption)`` of those drawn."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, (draw, caption) in PLOTS.items():
        written = draw(results, folder / f"{name}.png")
        if written is not None:
            drawn.append((f"plots/{written}", caption))
    return drawn
