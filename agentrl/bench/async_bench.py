"""``agentrl bench async``: GRPO on a multi-turn env with long-tailed tool latency, four ways side by side.

The env is ``bench-latency-v0`` (:mod:`agentrl.bench.async_env`): each tool answer takes a lognormal time
(default median 50 ms, 99th percentile 2 s), the tiny model replies. The same GRPO run (same seed, tasks and
steps) is played:

- ``single``: one process, synchronous (the default path, no Ray);
- ``ray-sync``: env workers and an engine on a local Ray instance, synchronous;
- ``ray-pace``: asynchronous, ``max_staleness`` kept by pacing (episodes start only when they will be trained
  within the bound);
- ``ray-drop``: asynchronous, episodes start freely and staler groups are dropped.

Printed per mode, over the steps after the first (which pays for starting actors): episodes/s, sampled
tokens/s, the learner's idle share (waiting for data), the reward curve, and the trained-vs-sampled means of
length and reward (the bias an asynchronous mode can bring: slow episodes come back late). Ratios are against
``single``. Target: ``ray-pace`` >= 2x ``single`` episodes/s with the same reward curve.

Two curves, because an asynchronous step trains samples of older weights: the *reward curve* (by step: the
mean reward of what each step trained) lags by about ``max_staleness`` steps even when learning is unchanged;
the curve *by the version that sampled it* (the oldest turn's) says how good the weights after ``v`` updates
are, which is what "learns as well" means. With ``max_staleness`` 1 under pacing, a step can overlap one
rollout with one update and no more: its period is at least ``max(rollout, update)``, so the speed-up over the
synchronous ``rollout + update`` is at most 2x, reached only when the two take equal time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["MODES", "add_arguments", "main"]

MODES = ("single", "ray-sync", "ray-pace", "ray-drop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per mode (default 8)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per step (default 8)")
    parser.add_argument("--group", type=int, default=4, help="samples per task (default 4)")
    parser.add_argument("--turns", type=int, default=3, help="turns per episode (default 3)")
    parser.add_argument(
        "--p50", type=float, default=0.05, help="median tool latency in seconds (default 0.05)"
    )
    parser.add_argument(
        "--p99", type=float, default=2.0, help="99th-percentile tool latency in seconds (default 2)"
    )
    parser.add_argument("--env-workers", type=int, default=2, help="env-worker actors (default 2)")
    parser.add_argument("--engines", type=int, default=1, help="generation engines (default 1)")
    parser.add_argument("--max-staleness", type=int, default=1, help="the asynchronous bound (default 1)")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the run seed of every mode (default 0)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="which runs, in order")


def _config(args: argparse.Namespace, mode: str) -> Any:
    from agentrl.learners.grpo import GRPOConfig

    fields: dict[str, Any] = {
        "env": "bench-latency-v0", "env_kwargs": {"turns": args.turns, "p50_s": args.p50, "p99_s": args.p99},
        "prompts_per_step": args.tasks, "group_size": args.group, "max_new_tokens": 12, "max_steps": args.steps,
        "warmup_steps": 0, "lr": 2e-2, "seed": args.seed, "episode_deadline_s": None,
    }  # fmt: skip
    if mode != "single":
        fields["cluster"] = {"env_workers": args.env_workers, "engines": args.engines,
                             "setup": ["agentrl.bench.async_env"], "admission": "drop" if mode == "ray-drop" else "pace"}  # fmt: skip
    if mode in ("ray-pace", "ray-drop"):
        fields["max_staleness"] = args.max_staleness
    return GRPOConfig(**fields)


def _measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One run; figures over the steps after the first."""
    from agentrl.learners.grpo import train_grpo

    by_version: dict[int, list[float]] = {}

    def on_rollout(step: int, groups: Any) -> None:
        for trajectory in (t for g in groups for t in g):
            by_version.setdefault(trajectory.policy_version, []).append(trajectory.total_reward)

    started = time.perf_counter()
    history = train_grpo(_config(args, mode), on_rollout=on_rollout).history
    total = time.perf_counter() - started
    steady = history[1:] or history
    seconds = sum(log.seconds for log in steady)
    episodes = sum(log.samples for log in steady)
    row: dict[str, Any] = {
        "mode": mode, "episodes_per_s": episodes / seconds, "tokens_per_s": sum(log.sampled_tokens for log in steady) / seconds,
        "learner_idle": sum(log.rollout_seconds for log in steady) / seconds, "wall_s": total,
        "rewards": [round(log.reward_mean, 3) for log in history],
        "by_version": [round(sum(r) / len(r), 3) for _, r in sorted(by_version.items())],
    }  # fmt: skip
    if steady[0].cluster:
        for key in ("sampled/length", "trained/length", "sampled/reward", "trained/reward"):
            values = [log.cluster[key] for log in steady if key in log.cluster]
            row[key] = sum(values) / len(values) if values else float("nan")
        row["dropped_groups"] = steady[-1].cluster.get("dropped_groups", 0.0)
        row["staleness_max"] = max(log.cluster.get("staleness_max", 0.0) for log in steady)
    else:  # one process, synchronous: everything played is trained (failed episodes aside)
        row["sampled/length"] = row["trained/length"] = sum(log.response_tokens_mean for log in steady) / len(
            steady
        )
        row["sampled/reward"] = row["trained/reward"] = sum(log.reward_mean for log in steady) / len(steady)
    return row


def main(args: argparse.Namespace) -> int:
    import torch

    import agentrl.bench.async_env  # noqa: F401  (registers bench-latency-v0 here too)

    torch.set_num_threads(1)
    rows = []
    ray_started = False
    try:
        for mode in args.modes:
            if mode != "single" and not ray_started:
                import ray

                ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
                ray_started = True
            rows.append(_measure(args, mode))
            _print_row(rows[-1], rows[0])
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    return 0


def _print_row(row: dict[str, Any], base: dict[str, Any]) -> None:
    ratio = row["episodes_per_s"] / base["episodes_per_s"]
    print(f"{row['mode']:<9} episodes/s {row['episodes_per_s']:7.2f} ({ratio:4.2f}x {base['mode']})  "
          f"tokens/s {row['tokens_per_s']:8.1f}  learner idle {row['learner_idle']:5.1%}  wall {row['wall_s']:6.1f}s")  # fmt: skip
    print(f"          length sampled {row['sampled/length']:6.2f} trained {row['trained/length']:6.2f}  "
          f"reward sampled {row['sampled/reward']:6.3f} trained {row['trained/reward']:6.3f}"
          + (f"  dropped groups {row['dropped_groups']:.0f}  max staleness {row['staleness_max']:.0f}"
             if "dropped_groups" in row else ""))  # fmt: skip
    print(f"          reward curve {row['rewards']}")
    print(f"          reward by the version that sampled it {row['by_version']}", flush=True)
