"""The progress display of a phase: a bar on a terminal, plain lines in a log, with the step's headline
numbers and an ETA."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from agentrl.tracking import flatten_metrics

__all__ = ["Progress", "eta_seconds", "format_duration", "progress_fields"]


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


# ---- progress -------------------------------------------------------------------------------------------
# Shown in this order when a step's metrics have them: metric name -> label.
_SHOWN = {"reward_mean": "reward", "pass_rate": "pass", "pass@1": "pass@1", "loss": "loss", "accuracy": "acc"}


def progress_fields(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The fields a progress display shows for one step's (flattened) metrics.

    ``reward``, ``pass``, ``loss``... when present, and ``tok/s``: ``tokens_per_s`` if logged, else
    ``sampled_tokens`` (RL) or ``tokens`` (SFT) over the step's ``seconds``.
    """

    def number(name: str) -> float | None:
        value = metrics.get(name)
        return value if isinstance(value, int | float) else None

    fields = {label: f"{value:.3f}" for name, label in _SHOWN.items() if (value := number(name)) is not None}
    rate, seconds = number("tokens_per_s"), number("seconds")
    tokens = number("sampled_tokens") if number("sampled_tokens") is not None else number("tokens")
    if rate is None and tokens is not None and seconds:
        rate = tokens / seconds
    if rate is not None:
        fields["tok/s"] = f"{rate:.0f}"
    return fields


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"``, ``"2h04m"``: short, for progress lines and reports."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(done: int, remaining: int, seconds_since_first: float, budget_left: float | None) -> float | None:
    """Seconds left: the pace of the steps after the first (the first pays for loading and warm-up, so it
    says little of the rest) times the steps remaining, capped by what is left of a time budget. None before
    a second step when no budget is known."""
    pace = seconds_since_first / done if done > 0 else None
    estimate = pace * remaining if pace is not None else None
    if budget_left is None:
        return estimate
    return max(0.0, budget_left) if estimate is None else min(estimate, max(0.0, budget_left))


class Progress:
    """A phase's progress: a tqdm bar on a terminal, plain lines elsewhere (CI logs, files, pipes).

    Plain lines look like ``[rl] step 12/100 (12%) reward 0.431 pass 0.380 tok/s 1520 | 1m02s, eta 7m35s``;
    one is printed for the first step, the last step, and otherwise at most every ``interval_s`` seconds.
    The ETA follows the pace of the steps after the first and, for a phase with a time budget, never runs
    past it (``eta 4m10s (budget)``); :meth:`stopped_early` prints the line that says a budget ended it.
    """

    def __init__(self, phase: str, total: int | None = None, *, initial: int = 0, stream: IO[str] | None = None,
                 tty: bool | None = None, interval_s: float = 10.0, budget_s: float | None = None):  # fmt: skip
        """Start the display (a bar at once on a terminal; plain mode prints from the first update).

        Args:
            phase: the name shown.
            total: the phase's steps, if known (for percent and ETA).
            initial: the step a resumed phase starts from (the ETA counts only steps run here).
            stream: where to write; ``sys.stderr`` by default.
            tty: force the mode; ``None`` draws a bar exactly when ``stream`` is a terminal.
            interval_s: plain mode: the least seconds between two lines (0: a line per step).
            budget_s: the phase's time budget in seconds (e.g. RL's ``max_seconds``), counted from here.
        """
        self.phase, self.total, self.interval_s, self.budget_s = phase, total, interval_s, budget_s
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._initial, self._started, self._last_line = initial, time.monotonic(), -math.inf
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            sized = _columns(self.stream) > 0  # a terminal that reports no size (some containers) gets 100
            self._bar = tqdm(total=total, initial=initial, desc=phase, file=self.stream, unit="step",
                             dynamic_ncols=sized, ncols=None if sized else 100)  # fmt: skip

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Show that ``step`` is done, with its metrics (flattened or nested)."""
        fields = progress_fields(flatten_metrics(metrics or {}))
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        if self._bar is not None:
            if self.budget_s is not None:
                fields["budget left"] = format_duration(self.budget_s - (now - self._started))
            self._bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in fields.items()), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        last = self.total is not None and step >= self.total
        if step == self._initial + 1 or last or now - self._last_line >= self.interval_s:
            self._last_line = now
            print(self.line(step, fields, now - self._started), file=self.stream, flush=True)

    def line(self, step: int, fields: Mapping[str, str], elapsed: float) -> str:
        """The plain-mode line for ``step`` after ``elapsed`` seconds of this session."""
        head = f"[{self.phase}] step {step}"
        if self.total:
            head += f"/{self.total} ({100 * step / self.total:.0f}%)"
        body = "".join(f" {k} {v}" for k, v in fields.items())
        tail = format_duration(elapsed)
        first_step, first_at = self._first if self._first is not None else (step, self._started + elapsed)
        if self.total and step < self.total:
            budget_left = None if self.budget_s is None else self.budget_s - elapsed
            eta = eta_seconds(step - first_step, self.total - step, self._started + elapsed - first_at, budget_left)
            if eta is not None:
                by_budget = budget_left is not None and eta >= budget_left
                tail += f", eta {format_duration(eta)}" + (" (budget)" if by_budget else "")
        return f"{head}{body} | {tail}"

    def stopped_early(self, step: int, reason: str) -> None:
        """Say that ``reason`` (e.g. ``"its 8.5-minute time budget"``) ended the phase at ``step``, before its
        total; on a terminal too, below the bar."""
        of = f"/{self.total}" if self.total else ""
        line = f"[{self.phase}] stopped at step {step}{of} by {reason}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar (idempotent); plain mode has nothing to end."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
