"""Grading speed: ``python -m agentrl_envs.code_sandbox.bench [--programs 128] [--parallel 1 2 4] [--validate]``.

Grades a batch of submissions (as an RL step would: one per sampled completion) and prints milliseconds
per grading, sequentially in one sandbox pair and spread over several pairs at once. Submissions are the
references of generated tasks (half of them broken, so failing paths are timed too), then HumanEval and
MBPP references (their one-off recording of the tests is timed apart). ``--validate`` first grades every
HumanEval and MBPP reference solution and prints how many score full marks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from agentrl_envs.code_sandbox import grading
from agentrl_envs.code_sandbox.datasets import load_humaneval, load_mbpp
from agentrl_envs.code_sandbox.generator import generate_tasks
from agentrl_envs.code_sandbox.grading import SandboxPair, grade, record
from agentrl_envs.code_sandbox.tasks import CodeTask


async def _batch(items: Sequence[tuple[CodeTask, str]], pairs: list[SandboxPair]) -> tuple[float, list[float]]:
    """Wall seconds for the whole batch (items dealt round-robin to ``pairs``) and each grading's seconds."""
    queues = [list(items[i :: len(pairs)]) for i in range(len(pairs))]

    async def worker(pair: SandboxPair, queue: list[tuple[CodeTask, str]]) -> list[float]:
        return [(await grade(task, code, pair)).seconds for task, code in queue]

    start = time.perf_counter()
    per_pair = await asyncio.gather(*(worker(p, q) for p, q in zip(pairs, queues, strict=True)))
    return time.perf_counter() - start, [s for seconds in per_pair for s in seconds]


def _line(name: str, parallel: int, wall: float, seconds: list[float]) -> str:
    n = len(seconds)
    return (f"{name:<10} x{n:<4} pairs={parallel}  batch {wall * 1000:7.0f} ms  = {wall / n * 1000:5.1f} ms/program"
            f"  (one grading: median {statistics.median(seconds) * 1000:5.1f} ms, "
            f"max {max(seconds) * 1000:5.0f} ms)")


async def validate() -> None:
    """Grade every data set reference; each should pass all of its tests."""
    pair = SandboxPair()
    try:
        for name, tasks in (("humaneval", load_humaneval()), ("mbpp", load_mbpp())):
            results = [await grade(task, task.reference, pair) for task in tasks]
            failed = [(t.task_id, r.status, r.detail) for t, r in zip(tasks, results, strict=True) if not r.all_passed]
            print(f"{name:<10} references with full marks: {len(tasks) - len(failed)}/{len(tasks)} {failed[:5]}")
    finally:
        await pair.aclose()


async def main(programs: int, parallel: Sequence[int]) -> None:
    tasks = generate_tasks(programs, seed=0, config="rl")
    generated = [(t, t.reference if i % 2 else t.reference.replace("return", "return 0 or")) for i, t in
                 enumerate(tasks)]
    humaneval = [(t, t.reference) for t in load_humaneval()[:programs]]
    mbpp = [(t, t.reference) for t in load_mbpp()[:programs]]
    pairs = [SandboxPair() for _ in range(max(parallel))]
    try:
        await _batch(generated[:4], pairs)  # start every sandbox
        grading._RECORDINGS.clear()  # time the recordings even after --validate made them
        for name, items in (("humaneval", humaneval), ("mbpp", mbpp)):
            start = time.perf_counter()
            for task, _ in items:
                await record(task, await pairs[0].trusted())
            print(f"{name:<10} recording the tests once per task: {(time.perf_counter() - start) / len(items) * 1000:.1f}"
                  " ms/task")
        for name, items in (("generated", generated), ("humaneval", humaneval), ("mbpp", mbpp)):
            for n in parallel:
                print(_line(name, n, *await _batch(items, pairs[:n])))
    finally:
        for pair in pairs:
            await pair.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=128)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--validate", action="store_true", help="grade every data set reference first")
    args = parser.parse_args()
    if args.validate:
        asyncio.run(validate())
    asyncio.run(main(args.programs, args.parallel))
