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

__all__ = ["Progress", "format_duration", "progress_fields"]


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


class Progress:
    """A phase's progress: a tqdm bar on a terminal, plain lines elsewhere (CI logs, files, pipes).

    Plain lines look like ``[rl] step 12/100 (12%) reward 0.431 pass 0.380 tok/s 1520 | 1m02s, eta 7m35s``;
    one is printed for the first step, the last step, and otherwise at most every ``interval_s`` seconds.
    """

    def __init__(self, phase: str, total: int | None = None, *, initial: int = 0, stream: IO[str] | None = None,
                 tty: bool | None = None, interval_s: float = 10.0):  # fmt: skip
        """Start the display (a bar at once on a terminal; plain mode prints from the first update).

        Args:
            phase: the name shown.
            total: the phase's steps, if known (for percent and ETA).
            initial: the step a resumed phase starts from (the ETA counts only steps run here).
            stream: where to write; ``sys.stderr`` by default.
            tty: force the mode; ``None`` draws a bar exactly when ``stream`` is a terminal.
            interval_s: plain mode: the least seconds between two lines (0: a line per step).
        """
        self.phase, self.total, self.interval_s = phase, total, interval_s
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
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in fields.items()), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
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
        done = step - self._initial
        if self.total and 0 < done and step < self.total:
            tail += f", eta {format_duration(elapsed / done * (self.total - step))}"
        return f"{head}{body} | {tail}"

    def close(self) -> None:
        """End the bar (idempotent); plain mode has nothing to end."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
