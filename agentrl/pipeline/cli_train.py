"""``agentrl train``: SFT tool-format phase, RL and held-out evaluation in one run directory."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentrl.pipeline.config import Resolved, RunConfig
    from agentrl.pipeline.run import EvalResult

__all__ = ["add_arguments", "eval_lines", "main", "phases_off"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", help="registered env id, e.g. code-sandbox (see `agentrl envs`)")
    parser.add_argument("--model", help="starting model: 'tiny' (default), a hub id or a local directory")
    parser.add_argument("--algo", help="RL algorithm: grpo (default), dapo, dr_grpo, rloo, reinforce_pp, ppo, dpo")
    parser.add_argument("--rollout", metavar="{hf,vllm}", help="sampler backend: hf (default) or vllm; an API "
                        "endpoint cannot take trained weights, so it evaluates (agentrl eval --base-url)")  # fmt: skip
    parser.add_argument("--config", metavar="RUN.YAML", help="a run config file (see --dry-run for its keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set learner.lr=1e-5 (repeatable)")  # fmt: skip
    parser.add_argument("--output-dir", help="the run directory (default runs/<env>-<algo>-<time>)")
    parser.add_argument("--seed", type=int, help="seeds every phase (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; run nothing")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoints")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    parser.add_argument("--report-to", metavar="A,B", help="experiment trackers: tensorboard (default), wandb, "
                        "mlflow, trackio, comma-separated; 'none' for metrics.jsonl only (tracking.report_to)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from agentrl.errors import ConfigError
    from agentrl.pipeline.config import RunConfig, build_run_config, resolve

    if args.rollout == "openai":
        raise ConfigError(
            "--rollout openai cannot train: an OpenAI-compatible server cannot take the learner's weights after "
            "each step, so GRPO/PPO would keep sampling the starting policy. Train with --rollout hf or vllm "
            "(weights synced every step); evaluate API models with `agentrl eval --base-url URL`"
        )
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in ("env", "model", "algo", "rollout", "config", "output_dir",
                                                      "seed", "threads", "report_to") if getattr(args, k) is not None]  # fmt: skip
        if given or args.overrides:
            raise ConfigError(f"--resume continues a run with its saved config; drop {given or ['--set']}")
        from agentrl.tracking import check_run_dir

        saved = check_run_dir(args.resume)  # reads and checks every file; changes nothing
        try:
            run = RunConfig(**{**saved, "output_dir": args.resume})
        except ConfigError as exc:
            raise ConfigError(f"{args.resume}/config.yaml: {exc}") from None
    else:
        run = build_run_config(
            args.env, args.config, args.overrides, model=args.model, algo=args.algo, rollout=args.rollout,
            output_dir=args.output_dir, seed=args.seed, threads=args.threads, tracking=report_to(args.report_to),
        )  # fmt: skip
    resolved = resolve(run)
    from agentrl.learners import data_parallel

    ranks = data_parallel.world()
    if ranks.size > 1 and not args.dry_run:  # under torchrun: rank 0 runs the pipeline, the others join its updates
        for config in (resolved.learner, resolved.learner2):
            if config is not None:
                data_parallel.check(data_parallel.TRAINERS.get(str(resolved.train), run.algo), config)
        data_parallel.init(resolved.learner.device)
        if ranks.rank != 0:
            return data_parallel.serve_runs()
    for note in phases_off(run):
        print(f"note: {note}", file=sys.stderr)
    from agentrl.tracking import check_output_dir

    check_output_dir(resolved.run_dir, "--resume" if args.resume else "--output-dir")
    if args.dry_run:
        _print_resolved(resolved)
        return 0

    from agentrl.pipeline.run import run_pipeline

    print(f"agentrl train: {run.env} with {run.algo}, run directory {resolved.run_dir}", file=sys.stderr)
    print(device_line(resolved.learner.device, resolved.learner.precision), file=sys.stderr)
    started = time.perf_counter()
    summary = run_pipeline(resolved, report=not args.no_report)
    data_parallel.dismiss()  # after an error rank 0 leaves with it instead, and torchrun ends the others
    for stage, result in summary.evals.items():
        if result is not None:
            print("\n".join(eval_lines(stage, result)))
    phases = ", ".join(f"{name} {s / 60:.1f} min" for name, s in summary.seconds.items())
    print(f"run time: {(time.perf_counter() - started) / 60:.1f} min ({phases})")
    if summary.report is not None:
        print(f"report: {summary.report}")
    return 0


def device_line(device: str, precision: str) -> str:
    """The start-up line saying where the learner trains and in which precision, and how to choose otherwise."""
    if not device.startswith("cuda"):
        return f"device: {device}, precision {precision} (no GPU visible; --set learner.device=cuda:0 picks one)"
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "?"
    return (f"device: {device} ({name}), precision {precision} (a GPU is visible; --set learner.device=cpu "
            "--set learner.precision=fp32 keeps the CPU)")  # fmt: skip


def eval_lines(stage: str, result: EvalResult) -> list[str]:
    """The end-of-run lines of one held-out evaluation (scripts parse them; keep their shape).

    With the env's graded attempts (``result.first_attempt`` set), two lines::

        after SFT: final pass@1 31.0% [26.0, 36.3], first-attempt pass@1 22.0% [17.5, 26.9], recovery 11.5% [7.9, 15.4] (300 held-out tasks)
        after SFT: mean reward 0.412

    (``recovery n/a`` when no first attempt failed); otherwise the one line
    ``pass@1 after SFT: 31.0% (300 held-out tasks, mean reward 0.412)``.
    """
    name = stage.upper()
    if result.first_attempt is None:
        return [f"pass@1 after {name}: {_percent(result.pass_at_1)} "
                f"({result.tasks} held-out tasks, mean reward {result.reward_mean:.3f})"]  # fmt: skip
    parts = [
        f"final pass@1 {_percent(result.pass_at_1, result.ci)}",
        f"first-attempt pass@1 {_percent(result.first_attempt, result.first_attempt_ci)}",
        f"recovery {_percent(result.recovery, result.recovery_ci)}",
    ]
    return [f"after {name}: {', '.join(parts)} ({result.tasks} held-out tasks)",
            f"after {name}: mean reward {result.reward_mean:.3f}"]  # fmt: skip


def _percent(value: float | None, ci: tuple[float, float] | None = None) -> str:
    """``31.0%``, or ``31.0% [26.0, 36.3]`` with an interval; ``n/a`` for a share of no episodes (NaN)."""
    if value is None or math.isnan(value):
        return "n/a"
    if ci is None or any(math.isnan(x) for x in ci):
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def report_to(flag: str | None) -> dict[str, str] | None:
    """``--report-to`` as a ``tracking`` section override (None when the flag is not given)."""
    if flag is None:
        return None
    return {"report_to": "" if flag.strip().lower() == "none" else flag}


def phases_off(run: RunConfig) -> list[str]:
    """What of the pipeline a run leaves off (SFT, evaluation), each with the setting that turns it on.

    An env's ``default_run`` mapping is where these are set for a plain ``agentrl train --env <id>``; a
    plug-in env without one trains RL only unless the run sets them.
    """
    from agentrl.pipeline.config import env_recipe

    recipe = "" if env_recipe(run.env) else f" ({run.env} has no default_run recipe that sets it)"
    notes = []
    if run.sft.demos == 0:
        notes.append(f"the SFT phase is off: sft.demos is 0{recipe}; turn it on with --set sft.demos=N (N tasks "
                     "whose env.demonstration(task) episodes are the SFT data)")  # fmt: skip
    if run.eval.tasks == 0:
        notes.append(f"evaluation is off, so no pass@1 is reported: eval.tasks is 0{recipe}; turn it on with --set "
                     "eval.tasks=N (and eval.env_kwargs for held-out tasks, eval.pass_on for the component)")  # fmt: skip
    return notes


def _print_resolved(resolved: Resolved) -> None:
    import yaml

    sections = {
        "run": resolved.run.model_dump(mode="json"),
        "run_dir": str(resolved.run_dir),
        "sft.learner (resolved)": None if resolved.sft is None else resolved.sft.model_dump(mode="json"),
        "learner (resolved)": resolved.learner.model_dump(mode="json"),
    }
    for name, config in (("rejection.sampling", resolved.sampling), ("rejection.learner", resolved.rejection_sft),
                         ("rl2.learner", resolved.learner2)):  # fmt: skip
        if config is not None:
            sections[f"{name} (resolved)"] = config.model_dump(mode="json")
    print(yaml.safe_dump(sections, sort_keys=False), end="")
