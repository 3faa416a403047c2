"""Math answer verification: :func:`verify` and the worker pool that runs it.

``verify(gold, pred)`` says whether a predicted answer equals the reference. It layers exact rules (answer
extraction, LaTeX normalization, rational arithmetic for numbers, choice letters, words) in front of
math-verify (see :mod:`agentrl.rewards._math_equiv`).

math-verify bounds its work with ``signal.alarm``, which only works in a process's main thread: called from a
trainer's worker thread it raises, and a framework that swallows that error scores every answer 0. So the
comparison never runs in the caller's process. A small pool of worker processes does it, each under a
deadline of its own; a worker that overruns the hard deadline is killed and replaced. A timeout, a crash or an
error counts as "not equal" and is counted in :attr:`MathVerifier.stats`; nothing reaches the caller.

Example:
    >>> from agentrl.rewards.math import verify
    >>> verify("\\\\frac{1}{2}", "The answer is $\\\\boxed{0.5}$.")
    True
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agentrl._fd import readable
from agentrl.errors import ConfigError, MissingDependencyError
from agentrl.rewards._math_equiv import ANSWER_MODES
from agentrl.rewards._math_extract import boxed_runs, chosen_letter, final_answer
from agentrl.rewards._math_numbers import DECIMAL_MARKS
from agentrl.rewards.answers import (
    extract_answer,
    extract_answer_tag,
    extract_boxed,
    extract_final_number,
    extract_hashes,
)

__all__ = [
    "ANSWER_MODES",
    "DECIMAL_MARKS",
    "MathVerifier",
    "VerifierLease",
    "VerifierStats",
    "averify",
    "boxed_runs",
    "check_options",
    "chosen_letter",
    "default_verifier",
    "extract_answer",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_number",
    "extract_hashes",
    "final_answer",
    "verify",
]

MAX_CHARS = 100_000
"""Longer texts keep their last MAX_CHARS characters (where a final answer is)."""


def check_options(mode: str, decimal: str) -> dict[str, str]:
    """The comparison options as the worker reads them.

    Raises:
        ConfigError: ``mode`` not in :data:`ANSWER_MODES` or ``decimal`` not in :data:`DECIMAL_MARKS`.
    """
    if mode not in ANSWER_MODES:
        raise ConfigError(f"unknown answer mode={mode!r}; choose one of {list(ANSWER_MODES)}")
    if decimal not in DECIMAL_MARKS:
        raise ConfigError(f"unknown decimal={decimal!r} (the decimal mark); choose one of {list(DECIMAL_MARKS)}")
    return {"mode": mode, "decimal": decimal}


@dataclass(frozen=True)
class VerifierStats:
    """Counters since the verifier started. ``timeouts``, ``errors`` and ``crashes`` all scored "not equal"."""

    calls: int = 0
    equal: int = 0
    timeouts: int = 0
    """Comparisons that ran out of time (the worker stopped itself, or was killed at the hard deadline)."""
    errors: int = 0
    """Comparisons that raised inside the worker."""
    crashes: int = 0
    """Workers that died or could not start."""
    restarts: int = 0
    """Workers started to replace a killed or dead one."""


class _Worker:
    """One ``agentrl.rewards._math_worker`` process and the line protocol to it."""

    def __init__(self, start_timeout: float):
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        # The worker imports agentrl the way this process did, installed or from a source tree.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentrl.rewards._math_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buffer = b""
        reply = self._read(time.monotonic() + start_timeout)
        if reply is None or "fatal" in reply:
            self.kill()
            if reply is not None and "math_verify" in str(reply["fatal"]):
                raise MissingDependencyError(
                    f"math answer verification needs math-verify ({reply['fatal']}); "
                    "install it with `pip install 'math-verify>=0.7'`"
                )
            raise RuntimeError(f"the math verifier worker did not start: {reply or 'no answer in time'}")

    def _read(self, deadline: float) -> dict[str, object] | None:
        """The next reply, or None when the deadline passes first. Raises EOFError when the worker died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not readable(fd, remaining):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the verifier worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, object] = json.loads(line)
        return reply

    def ask(
        self, gold: str, pred: str, options: dict[str, str], budget: float, deadline: float
    ) -> dict[str, object] | None:
        """Send one comparison; the reply, or None at the deadline. Raises OSError/EOFError if the worker died."""
        assert self.proc.stdin is not None
        request = {"gold": gold[-MAX_CHARS:], "pred": pred[-MAX_CHARS:], "budget": budget, **options}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(deadline)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


class MathVerifier:
    """A pool of verifier processes; thread-safe, usable from any thread or event loop.

    Workers start on first use (about a second each, to import sympy) and are reused; at most ``workers``
    comparisons run at once and further callers wait their turn.

    Args:
        workers: Most worker processes; default ``min(4, cpu_count)``.
        timeout: Hard deadline per comparison in seconds. The worker stops itself at 80% of it; a worker still
            busy at the deadline is killed (it may be stuck in C code) and replaced.
        start_timeout: Seconds a new worker may take to import math-verify and report ready.

    Raises:
        ConfigError: ``workers < 1`` or ``timeout <= 0``.
    """

    def __init__(self, workers: int | None = None, timeout: float = 5.0, start_timeout: float = 120.0):
        workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        if workers < 1:
            raise ConfigError(f"MathVerifier needs at least one worker, got workers={workers}")
        if not timeout > 0:
            raise ConfigError(f"MathVerifier timeout must be positive seconds, got {timeout!r}")
        self.workers, self.timeout, self.start_timeout = workers, float(timeout), float(start_timeout)
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._counts = {name: 0 for name in VerifierStats.__dataclass_fields__}
        self._started = 0
        self._leases = 0
        self._finalizer = weakref.finalize(self, _kill_all, self._all)

    @property
    def stats(self) -> VerifierStats:
        with self._lock:
            return VerifierStats(**self._counts)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _acquire(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                worker.kill()  # died while idle (killed from outside): reap it and start another
                self._all.remove(worker)
                self._counts["crashes"] += 1
            replacing = self._started >= self.workers
            self._started += 1
        worker = _Worker(self.start_timeout)
        with self._lock:
            self._all.append(worker)
            if replacing:
                self._counts["restarts"] += 1
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def verify(self, gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
        """Whether ``pred`` states the same answer as ``gold``; see :func:`verify`.

        Raises:
            ConfigError: An unknown ``mode`` or ``decimal``.
            MissingDependencyError: math-verify is not installed.
        """
        options = check_options(mode, decimal)
        self._count("calls")
        if not isinstance(gold, str) or not isinstance(pred, str) or not gold.strip() or not pred.strip():
            return False
        with self._slots:
            try:
                worker = self._acquire()
            except MissingDependencyError:
                raise
            except (RuntimeError, OSError):
                self._count("crashes")
                return False
            try:
                deadline = time.monotonic() + self.timeout
                reply = worker.ask(gold, pred, options, 0.8 * self.timeout, deadline)
            except (OSError, EOFError, ValueError):
                self._discard(worker)
                self._count("crashes")
                return False
            if reply is None:  # stuck past the hard deadline: kill it; the next call starts a fresh one
                self._discard(worker)
                self._count("timeouts")
                return False
            with self._lock:
                self._idle.append(worker)
        if reply.get("timeout"):
            self._count("timeouts")
        elif "error" in reply:
            self._count("errors")
        elif reply.get("equal") is True:
            self._count("equal")
            return True
        return False

    def verify_many(
        self, pairs: Iterable[tuple[str, str]], *, mode: str = "math", decimal: str = "auto"
    ) -> list[bool]:
        """:meth:`verify` over many ``(gold, pred)`` pairs, using every worker; results in input order."""
        pairs = list(pairs)
        check_options(mode, decimal)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="agentrl-verify") as pool:
            return list(pool.map(lambda pair: self.verify(*pair, mode=mode, decimal=decimal), pairs))

    async def averify(self, gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
        """Async :meth:`verify`: waits in a thread, so the event loop keeps running."""
        return await asyncio.to_thread(functools.partial(self.verify, mode=mode, decimal=decimal), gold, pred)

    def lease(self) -> VerifierLease:
        """A handle for an owner (an env) that shares this verifier: when the last open lease closes, the
        workers stop (and start again on the next use), so no process outlives the envs that used it."""
        with self._lock:
            self._leases += 1
        return VerifierLease(self)

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            last = self._leases == 0
        if last:
            self.close()

    def close(self) -> None:
        """Stop every worker. Idempotent; the verifier restarts workers if used again."""
        with self._lock:
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._started = 0
        for worker in workers:
            worker.kill()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VerifierLease:
    """An owner's share of a :class:`MathVerifier` (see :meth:`MathVerifier.lease`)."""

    def __init__(self, verifier: MathVerifier):
        self.verifier = verifier
        self._open = True

    async def averify(self, gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
        return await self.verifier.averify(gold, pred, mode=mode, decimal=decimal)

    def verify(self, gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
        return self.verifier.verify(gold, pred, mode=mode, decimal=decimal)

    def close(self) -> None:
        """Give the share back. Idempotent."""
        if self._open:
            self._open = False
            self.verifier._release()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier :func:`verify` uses (created on first use, stopped at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
        return _default


def verify(gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
    """Whether the predicted answer ``pred`` is mathematically the same answer as ``gold``.

    Both may be bare answers (``\\\\frac{1}{2}``, ``0.5``, ``x = 5``, ``(A)``, ``[0, 1)``) or whole solutions
    whose final answer is found first (``\\\\boxed{}``, ``<answer>…</answer>``, ``#### N``, "the answer is …",
    the last math or number). Equal means: the same number (``1/2 = 0.5 = 50\\\\%``, thousands separators,
    scientific notation, units, ``\\\\$`` and ``^\\\\circ`` ignored), the same expression, equation, set, interval,
    tuple or matrix (checked by math-verify with sympy), the same choice letter or the same words.

    Thread-safe and safe to call from any thread: the work runs in the :func:`default_verifier` worker
    processes under a hard deadline. A timeout or an error returns False (counted in
    ``default_verifier().stats``); it never raises for bad input.

    Args:
        gold: The reference answer.
        pred: The model's answer or solution.
        mode: ``"math"`` or ``"choice"`` (multiple choice: the chosen letter is found in free text); see
            :data:`ANSWER_MODES`.
        decimal: The decimal mark: ``"auto"``, ``"point"`` or ``"comma"``; see
            :mod:`agentrl.rewards._math_numbers` for how ``1,000``, ``2,74`` and ``32, 349`` read under each.

    Returns:
        True when equivalent.

    Raises:
        ConfigError: An unknown ``mode`` or ``decimal``.
        MissingDependencyError: math-verify is not installed.
    """
    return default_verifier().verify(gold, pred, mode=mode, decimal=decimal)


async def averify(gold: str, pred: str, *, mode: str = "math", decimal: str = "auto") -> bool:
    """Async :func:`verify` for environments written with ``astep``."""
    return await default_verifier().averify(gold, pred, mode=mode, decimal=decimal)
