"""``agentrl bench learner --vs trl``: our GRPO and TRL's ``GRPOTrainer`` side by side on one setup
(``--algo dpo``: our DPO and TRL's ``DPOTrainer``, see :mod:`agentrl.bench.learner_dpo`).

The setup: the tiny model warm-started by SFT (cached under ``--cache``), prompts "Add a and b. Put the
result in <answer></answer>." with a, b in 10..99, reward 1.0 for the right number inside the tags (0.5
for it untagged) plus 0.5 for the format, 8 prompts x 8 generations per step, 64 new tokens, temperature 1,
lr 2e-5, no KL, token-mean loss (TRL's default ``dapo``), one torch thread. Each side runs in its own
process (so peak RSS is its own) for ``--steps`` timed steps after one untimed warm-up step, and prints
CPU-s/step, wall s/step, completion tokens/s, peak RSS and its reward curve; then the ratios.

TRL runs with its defaults except what the setup fixes, and ``gradient_checkpointing=False`` (its default
is on; we do not checkpoint either, so that would only slow TRL down).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.types import Message

__all__ = ["AdditionEnv", "add_arguments", "addition_reward", "main"]

ENV_ID = "bench-addition-v0"
DPO_STEPS = 50
_ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def addition_reward(text: str, a: int, b: int) -> tuple[float, dict[str, float]]:
    """``(total, components)``: correct 1.0 for ``<answer>a+b</answer>`` (0.5 for the number untagged),
    format 0.5 for exactly one tagged integer and nothing else around it."""
    tagged = _ANSWER.findall(text)
    correct = 1.0 if str(a + b) in tagged else 0.5 if re.search(rf"(?<!\d){a + b}(?!\d)", text) else 0.0
    formatted = 0.5 if len(tagged) == 1 and _ANSWER.fullmatch(text.strip()) else 0.0
    return correct + formatted, {"correct": correct, "format": formatted}


def question(a: int, b: int) -> str:
    return f"Add {a} and {b}. Put the result in <answer></answer>."


class AdditionEnv(Env):
    """One-turn addition with a tagged answer (the learner benchmark's task)."""

    description = "Add two numbers and tag the result (the learner benchmark's task)"
    max_turns = 1

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        super().reset(seed=seed)
        self.a, self.b = (int(x) for x in self.np_random.integers(10, 100, size=2))
        return ResetResult([{"role": "user", "content": question(self.a, self.b)}], {})

    def step(self, action: str) -> StepResult:
        reward, components = addition_reward(action, self.a, self.b)
        return StepResult([], reward, True, False, {"reward_components": components})

    def demonstration(self, task: int) -> list[Message]:
        self.reset(seed=task)
        return [{"role": "user", "content": question(self.a, self.b)},
                {"role": "assistant", "content": f"<answer>{self.a + self.b}</answer>"}]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agentrl.bench import learner_dpo

    parser.add_argument("--algo", choices=["grpo", "dpo"], default="grpo", help="the learner to compare")
    parser.add_argument(
        "--vs", choices=["trl", "none"], default="trl", help="the baseline to run beside ours"
    )
    parser.add_argument(
        "--steps", type=int, help="timed steps per side, after the untimed warm-up (default: grpo 10 after "
        f"one, dpo {DPO_STEPS} after {learner_dpo.WARMUP_STEPS})",
    )  # fmt: skip
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="fp32")
    parser.add_argument("--sft-steps", type=int, default=150, help="SFT steps of the warm start (cached)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", default=os.path.expanduser("~/.cache/agentrl/bench"), help="warm-start cache"
    )
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    learner_dpo.add_arguments(parser)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)


# ---- the warm start -----------------------------------------------------------------------------
def warm_start(cache: Path, sft_steps: int, seed: int) -> Path:
    """The SFT checkpoint both sides start from, trained once per (steps, seed) and cached."""
    import agentrl
    from agentrl.learners.sft import SFTConfig, env_demonstrations, train_sft

    out = cache / f"addition-sft-{sft_steps}-{seed}"
    final = out / f"step-{sft_steps:06d}"
    if final.is_dir():
        return final
    _register()
    env = agentrl.make(ENV_ID)
    demos = env_demonstrations(env, range(10_000, 12_000))
    config = SFTConfig(
        max_steps=sft_steps,
        batch_size=32,
        lr=2e-3,
        warmup_steps=min(10, sft_steps // 2),
        output_dir=out,
        seed=seed,
    )
    print(f"warm start: SFT of the tiny model, {sft_steps} steps -> {final}", flush=True)
    result = train_sft(config, demos)
    assert result.checkpoint == final
    return final


def _register() -> None:
    import agentrl

    agentrl.register(ENV_ID, "agentrl.bench.learner:AdditionEnv", override=True, max_turns=1,
                     description=AdditionEnv.description)  # fmt: skip


# ---- one side per process -----------------------------------------------------------------------
def _ours(model: str, steps: int, precision: str, seed: int) -> dict[str, Any]:
    import time

    from agentrl.learners.grpo import GRPOConfig, train_grpo

    _register()
    marks: list[tuple[float, float, int, float]] = []

    def on_step(log: Any) -> None:
        marks.append((time.process_time(), time.perf_counter(), log.sampled_tokens, log.reward_mean))

    config = GRPOConfig(
        env=ENV_ID, model=model, max_steps=steps + 1, prompts_per_step=8, group_size=8, max_new_tokens=64,
        temperature=1.0, lr=2e-5, warmup_steps=0, min_lr_ratio=1.0, beta=0.0, aggregation="token-mean",
        precision=precision, seed=seed,
    )  # fmt: skip
    train_grpo(config, on_step=on_step)
    return _summary(marks)


def _trl(model: str, steps: int, precision: str, seed: int) -> dict[str, Any]:
    import random
    import time

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(8 * (steps + 2))]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": question(a, b)}], "a": a, "b": b}
                              for a, b in pairs])  # fmt: skip

    def reward(completions: list[Any], a: list[int], b: list[int], **_: Any) -> list[float | None]:
        return [addition_reward(c[0]["content"], x, y)[0] for c, x, y in zip(completions, a, b, strict=True)]

    marks: list[tuple[float, float, int, float]] = []
    step_logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs:
                step_logs.append(dict(logs))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append((time.process_time(), time.perf_counter(), 0, 0.0))

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=precision == "bf16", per_device_train_batch_size=64,
            num_generations=8, max_completion_length=64, temperature=1.0, learning_rate=2e-5, beta=0.0,
            max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no", seed=seed,
            gradient_checkpointing=False, lr_scheduler_type="constant", dataloader_num_workers=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=config, train_dataset=data, callbacks=[Clock()]
        )
        trainer.train()
    step_logs = [entry for entry in step_logs if "reward" in entry]
    marks = [(cpu, wall, int(64 * entry.get("completions/mean_length", 0)), float(entry["reward"]))
             for (cpu, wall, _, _), entry in zip(marks, step_logs, strict=False)]  # fmt: skip
    return _summary(marks)


def _summary(marks: list[tuple[float, float, int, float]], warmup: int = 1) -> dict[str, Any]:
    """The timed steps' figures from per-step ``(process time, wall time, tokens, value)`` marks, the first
    ``warmup`` steps untimed; ``rewards`` lists every step's value."""
    import resource

    (cpu0, wall0, _, _), timed = marks[warmup - 1], marks[warmup:]
    steps = len(timed)
    return {
        "steps": steps,
        "cpu_s_per_step": (timed[-1][0] - cpu0) / steps,
        "wall_s_per_step": (timed[-1][1] - wall0) / steps,
        "completion_tokens_per_s": sum(m[2] for m in timed) / (timed[-1][1] - wall0),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "rewards": [round(m[3], 4) for m in marks],
    }


def _side(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.algo == "dpo":
        from agentrl.bench.learner_dpo import run_side

        result = run_side(args.side, args.model, args.steps, args.precision, args.seed, args.ref)
    else:
        run = _ours if args.side == "agentrl" else _trl
        result = run(args.model, args.steps, args.precision, args.seed)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _spawn(
    side: str, model: Path, precision: str, ref: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    command = [sys.executable, "-m", "agentrl.cli", "bench", "learner", "--side", side, "--model", str(model),
               "--precision", precision, "--steps", str(args.steps), "--threads", str(args.threads),
               "--seed", str(args.seed), "--algo", args.algo, *(["--ref", ref] if ref else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(args: argparse.Namespace) -> int:
    dpo = args.algo == "dpo"
    if args.steps is None:
        args.steps = DPO_STEPS if dpo else 10
    if args.side:
        return _side(args)
    model = warm_start(Path(args.cache), args.sft_steps, args.seed)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    sides = ["agentrl", "trl"] if args.vs == "trl" else ["agentrl"]
    refs: list[str | None] = [None]
    if dpo:
        refs = ["precomputed", "online"] if args.ref == "both" else [args.ref]
    results = {
        (side, p, r): _spawn(side, model, p, r, args) for p in precisions for r in refs for side in sides
    }
    _print_results(results, dpo)
    if args.json_out:
        payload = {"/".join(k for k in key if k): r for key, r in results.items()}
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def _print_results(results: dict[tuple[str, str, str | None], dict[str, Any]], dpo: bool) -> None:
    """The table (with a reference column for DPO), then each side's rewards (DPO: losses) per step."""
    from agentrl.bench.learner_dpo import WARMUP_STEPS

    ref_head = f"{'reference':>13}" if dpo else ""
    print(f"\n{'learner':<10}{'precision':>10}{ref_head}{'CPU-s/step':>12}{'wall s/step':>13}{'tokens/s':>10}"
          f"{'peak RSS GB':>13}{'CPU vs trl':>12}")  # fmt: skip
    for (side, p, ref), r in results.items():
        base = results.get(("trl", p, ref))
        ratio = f"{r['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x" if base else "-"
        tokens = r["tokens_per_s"] if dpo else r["completion_tokens_per_s"]
        ref_cell = f"{ref:>13}" if ref else ""
        print(f"{side:<10}{p:>10}{ref_cell}{r['cpu_s_per_step']:>12.3f}{r['wall_s_per_step']:>13.3f}"
              f"{tokens:>10.0f}{r['peak_rss_gb']:>13.2f}{ratio:>12}")  # fmt: skip
    if dpo:
        print(f"\nloss per step (the first {WARMUP_STEPS} are untimed warm-up steps):")
    else:
        print("\nmean reward per step (the first is the untimed warm-up step):")
    for (side, p, ref), r in results.items():
        label = f"{side:<8}{p:<5}" + (f"{ref:<12}" if ref else "")
        print(f"  {label} " + " ".join(f"{x:.3f}" for x in r["losses" if dpo else "rewards"]))
