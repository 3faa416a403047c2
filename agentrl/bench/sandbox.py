"""``agentrl bench sandbox``: the sandbox backends side by side with a plain ``subprocess`` runner.

The baseline is what human-eval-style harnesses do: start a fresh ``python3 -I -S -c`` per program (no
isolation at all). Each backend runs the same programs with 1 and 2 workers (one sandbox per worker, warm:
start-up is reported apart), in interleaved rounds so that machine noise hits every runner alike. Printed:
p50/p95 latency per program, programs/s, and each runner's throughput relative to the baseline with the
same number of workers.
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

__all__ = ["Measurement", "add_arguments", "main", "percentile"]

PROGRAMS = {
    "trivial": "pass",
    "compute": "print(sum(i * i for i in range(20000)))",
    "io": "import json, sys\ndata = json.loads(sys.stdin.read())\nprint(len(data))",
}
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--programs", type=int, default=200, help="programs per runner and worker count (default 200)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the programs are split into")
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="trivial", help="which program to run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--backends", nargs="+", default=["local", "docker"], help="sandbox backends to compare")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter of the subprocess baseline")


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


async def _timed(queue: asyncio.Queue[int], run_one: Callable[[], Awaitable[bool]], out: Measurement) -> None:
    while True:
        try:
            queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        started = time.perf_counter()
        ok = await run_one()
        out.latencies.append(time.perf_counter() - started)
        out.errors += not ok


async def _round(runner: str, workers: int, count: int, args: argparse.Namespace, out: Measurement,
                 sandboxes: list[Any]) -> None:
    code = PROGRAMS[args.program]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    def one(worker: int) -> Callable[[], Awaitable[bool]]:
        if runner == "subprocess":
            return lambda: _subprocess_run(args.python, code, _STDIN)

        async def in_sandbox() -> bool:
            return (await sandboxes[worker].exec(code, stdin=_STDIN)).ok

        return in_sandbox

    started = time.perf_counter()
    await asyncio.gather(*(_timed(queue, one(w), out) for w in range(workers)))
    out.wall += time.perf_counter() - started


async def _measure(args: argparse.Namespace) -> tuple[list[Measurement], dict[str, str]]:
    from agentrl.sandbox import SandboxError, SandboxLimits, open_sandbox

    skipped: dict[str, str] = {}
    runners = ["subprocess", *args.backends]
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
        for count in per_round:
            for runner in runners:
                if runner in skipped:
                    continue
                for workers in args.workers:
                    await _round(runner, workers, count, args, results[(runner, workers)],
                                 pools.get((runner, workers), []))
    finally:
        for pool in pools.values():
            await asyncio.gather(*(sb.close() for sb in pool), return_exceptions=True)
    return [m for m in results.values() if m.runner not in skipped], skipped


def _report(measurements: list[Measurement], skipped: dict[str, str], args: argparse.Namespace) -> str:
    baseline = {m.workers: m for m in measurements if m.runner == "subprocess"}
    lines = [
        f"agentrl bench sandbox: {args.programs} x {args.program!r} program per runner and worker count, "
        f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs",
        f"{'runner':<11} {'workers':>7} {'p50 ms':>8} {'p95 ms':>8} {'programs/s':>11} {'vs subprocess':>14} "
        f"{'p50 ratio':>10} {'start s':>8} {'errors':>6}",
    ]
    for m in measurements:
        base = baseline[m.workers]
        p50, p95 = percentile(m.latencies, 50) * 1e3, percentile(m.latencies, 95) * 1e3
        speedup = m.throughput / base.throughput if base.throughput else float("nan")
        p50_ratio = percentile(base.latencies, 50) * 1e3 / p50 if p50 else float("nan")
        start = f"{m.start:.2f}" if m.runner != "subprocess" else "-"
        lines.append(f"{m.runner:<11} {m.workers:>7} {p50:>8.2f} {p95:>8.2f} {m.throughput:>11.0f} "
                     f"{speedup:>13.2f}x {p50_ratio:>9.2f}x {start:>8} {m.errors:>6}")
    for runner, reason in skipped.items():
        lines.append(f"{runner}: not measured: {reason}")
    lines.append("targets (trivial program): local p50 <= 6 ms and >= 2x subprocess programs/s; docker p50 <= 10 ms")
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
