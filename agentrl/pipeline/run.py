"""Run a whole training run in its run directory: SFT tool-format phase, held-out evaluation, RL, evaluation
again, then the report. Every phase logs to the run directory (:class:`agentrl.tracking.RunDir`) and
checkpoints as it goes, so ``resume=True`` skips finished phases and continues the current one from its
newest checkpoint with optimizer, scheduler, RNG, step and data position restored.

Phases, in order (each skipped when its section turns it off)::

    sft       the env's reference demonstrations (``env.demonstration(i)`` for i < sft.demos), or the
              conversations of the data set ``sft.data`` -> SFT learner
    eval-sft  greedy episodes on ``eval.tasks`` held-out tasks by the evaluation harness (``eval/sft/``:
              results.json, report.html with every transcript): pass@1 with its interval, mean reward
    rl        the algorithm's learner from the SFT checkpoint (or the starting model)
    eval-rl   the same held-out tasks with the RL checkpoint
    rejection (``rejection.tasks`` > 0) the RL model samples G episodes per task; the best of each task
              become SFT data for it (rejection-sampling SFT)
    eval-rejection
    rl2       (``rl2.max_steps`` > 0) a second RL stage from the last model, its reward the env's plus
              ``rl2.judge_weight`` x an LLM judge's score when ``rl2.judge`` names one
    eval-rl2

With ``gold.every`` > 0 the RL stages measure a held-out gold score every few steps and flag
over-optimisation (:class:`~agentrl.learners.gold.GoldMonitor`). All four stages together are the R1-style
recipe (cold-start SFT, RL on verifiable rewards, rejection sampling, RL with verifiable and judge rewards).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agentrl.data.buffer import TrajectoryGroup
from agentrl.errors import ConfigError
from agentrl.pipeline.config import Resolved
from agentrl.progress import Progress
from agentrl.tracking import RunDir, flatten_metrics

__all__ = ["EvalResult", "RunSummary", "evaluate_checkpoint", "run_pipeline"]


@dataclass(frozen=True)
class EvalResult:
    """Greedy held-out evaluation by the harness: pass@1 with its bootstrap interval, the mean reward, and
    the directory with the episodes, ``results.json`` and the HTML report with every transcript.

    Where the env grades attempts (``metrics.multi_turn`` of ``results.json``), also the first-attempt
    pass@1 and the recovery rate with their intervals (None otherwise; ``recovery`` is NaN when no first
    attempt failed), and the other multi-turn figures in ``turn_figures`` (``turns_per_episode``, ...).
    """

    pass_at_1: float
    ci: tuple[float, float]
    reward_mean: float
    tasks: int
    out: Path
    first_attempt: float | None = None
    first_attempt_ci: tuple[float, float] | None = None
    recovery: float | None = None
    recovery_ci: tuple[float, float] | None = None
    turn_figures: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_results(cls, results: Mapping[str, Any], out: Path) -> EvalResult:
        metrics = results["metrics"]
        pass1 = metrics["pass_at_k"]["1"]
        result = cls(_nan(pass1["value"]), _interval(pass1["ci"]), _nan(metrics["reward"]["value"]),
                     metrics["tasks"], out)  # fmt: skip
        section = metrics.get("multi_turn")
        if not section:
            return result
        first, recovery = section["first_attempt_pass"], section["recovery"]
        figures = {k: _nan(v) for k, v in section.items() if isinstance(v, int | float | None) and k != "episodes"}
        return dataclasses.replace(
            result, first_attempt=_nan(first["value"]), first_attempt_ci=_interval(first["ci"]),
            recovery=_nan(recovery["value"]), recovery_ci=_interval(recovery["ci"]), turn_figures=figures,
        )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The numbers logged for the evaluation (``metrics.jsonl``, the model card): ``pass@1`` (with
        ``/ci_low``, ``/ci_high``), ``reward_mean``, ``tasks``, and with graded attempts ``mt/first_attempt_pass``
        and ``mt/recovery`` (each with ``/ci_low``, ``/ci_high``) and ``mt/<figure>`` for the other figures
        (a share of no episodes, NaN, is left out)."""
        out = {"pass@1": self.pass_at_1, "pass@1/ci_low": self.ci[0], "pass@1/ci_high": self.ci[1],
               "reward_mean": self.reward_mean, "tasks": self.tasks}  # fmt: skip
        for name, value, ci in (("mt/first_attempt_pass", self.first_attempt, self.first_attempt_ci),
                                ("mt/recovery", self.recovery, self.recovery_ci)):  # fmt: skip
            if value is not None and ci is not None:
                out.update({name: value, f"{name}/ci_low": ci[0], f"{name}/ci_high": ci[1]})
        out.update({f"mt/{k}": v for k, v in self.turn_figures.items()})
        return {k: v for k, v in out.items() if not (k.startswith("mt/") and math.isnan(v))}  # NaN: no episodes


def _nan(value: Any) -> float:
    """A number of ``results.json`` (null stands for NaN there)."""
    return math.nan if value is None else float(value)


def _interval(ci: Sequence[Any]) -> tuple[float, float]:
    return _nan(ci[0]), _nan(ci[1])


@dataclass(frozen=True)
class RunSummary:
    """What a run printed at its end: the run directory, the evaluations, seconds per phase, the report."""

    run_dir: Path
    evals: Mapping[str, EvalResult | None]
    seconds: Mapping[str, float]
    report: Path | None


def evaluate_checkpoint(checkpoint: Path, resolved: Resolved, out: Path, max_new_tokens: int) -> EvalResult:
    """Play each of ``eval.tasks`` held-out tasks once, greedily, with the model at ``checkpoint``, through
    the evaluation harness (resumable in ``out``)."""
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.harness import evaluate
    from agentrl.evaluation.metrics import PassRule

    section = resolved.run.eval
    config = EvalConfig(
        env=resolved.run.env, env_kwargs=section.env_kwargs, model=str(checkpoint), n=section.tasks, k=1,
        temperature=0.0, max_new_tokens=max_new_tokens, seed=section.seed, concurrency=min(section.tasks, 128),
        pass_rule=PassRule(section.pass_on, section.pass_threshold), template=resolved.learner.template,
        device=resolved.learner.device, out=out,
    )  # fmt: skip
    outcome = evaluate(config, echo=lambda line: None, show_progress=False)
    if outcome.failed_all:  # e.g. a sandbox that cannot start: an error, not a pass@1 of 0
        first = outcome.results["metrics"]["errors"]["top"][0]["error"]
        raise ConfigError(f"every held-out episode failed ({out}); the first error: {first}")
    return EvalResult.from_results(outcome.results, out)


def run_pipeline(resolved: Resolved, *, stream: IO[str] | None = None, report: bool = True) -> RunSummary:
    """Run (or continue) every phase of ``resolved`` in ``resolved.run_dir``; see the module docstring.

    Raises:
        ConfigError: the env offers no demonstrations for a requested SFT phase, or a learner setting the
            model or env cannot honour.
    """
    import torch

    run = resolved.run
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    with _quiet_transformers():
        return _run_phases(resolved, report, stream)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") among the phases' own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _run_phases(resolved: Resolved, report: bool, stream: IO[str] | None) -> RunSummary:
    run = resolved.run
    run_started = time.perf_counter()
    _probe_envs(resolved)
    out = RunDir(resolved.run_dir, tracking=run.tracking.settings())
    out.write_config(run)
    evals: dict[str, EvalResult | None] = {}
    seconds: dict[str, float] = {}
    max_new = run.eval.max_new_tokens or int(getattr(resolved.learner, "max_new_tokens", 256))
    try:
        sft_model = None
        if resolved.sft is not None:
            started = time.perf_counter()
            sft_model = _sft_phase(resolved, out, stream)
            seconds["sft"] = time.perf_counter() - started
            started = time.perf_counter()
            evals["sft"] = _eval_phase("eval-sft", sft_model, resolved, out, max_new, stream)
            seconds["eval-sft"] = time.perf_counter() - started
        budget = rl_seconds(run.budget_minutes, time.perf_counter() - run_started, seconds.get("eval-sft"),
                            resolved.learner.max_seconds)  # fmt: skip
        started = time.perf_counter()
        rl_model = _rl_phase(resolved, out, stream, start=sft_model, budget_s=budget)
        seconds["rl"] = time.perf_counter() - started
        evals["rl"] = _eval_phase("eval-rl", rl_model, resolved, out, max_new, stream)
        last = rl_model
        if resolved.rejection_sft is not None and rl_model is not None:
            started = time.perf_counter()
            last = rejection_model = _rejection_phase(resolved, out, stream, rl_model)
            seconds["rejection"] = time.perf_counter() - started
            evals["rejection"] = _eval_phase("eval-rejection", rejection_model, resolved, out, max_new, stream)
        if resolved.learner2 is not None:
            started = time.perf_counter()
            rl2_model = _rl_phase(resolved, out, stream, "rl2", last)
            seconds["rl2"] = time.perf_counter() - started
            evals["rl2"] = _eval_phase("eval-rl2", rl2_model, resolved, out, max_new, stream)
    finally:
        out.close()
    path = None
    if report:
        from agentrl.train_report import write_train_report

        path = write_train_report(out.path)
    return RunSummary(out.path, evals, seconds, path)


def rl_seconds(budget_minutes: float | None, spent: float, eval_seconds: float | None,
               max_seconds: float | None) -> float | None:  # fmt: skip
    """RL's time budget within a run's ``budget_minutes``: what is left after ``spent`` seconds, less the
    evaluation to come (as long as the one after SFT took, ``eval_seconds``, plus a quarter) and 15 s for the
    report; never more than the learner's own ``max_seconds`` and never under 30 s.
    """
    if budget_minutes is None:
        return max_seconds
    reserve = 1.25 * (eval_seconds or 0.0) + 15.0
    left = max(30.0, 60.0 * budget_minutes - spent - reserve)
    return left if max_seconds is None else min(max_seconds, left)


def _probe_envs(resolved: Resolved) -> None:
    """Run each env setting's own probe (:meth:`~agentrl.core.Env.aprobe`, e.g. its sandbox) before any phase,
    so a setup that cannot run episodes fails in seconds, not after training.

    Raises:
        ConfigError: a probe failed (the message names the section and the reason).
    """
    import agentrl

    run = resolved.run
    settings = {"env_kwargs": run.env_kwargs, "eval.env_kwargs": run.eval.env_kwargs if run.eval.tasks else None,
                "gold.env_kwargs": run.gold.env_kwargs if run.gold.every else None}  # fmt: skip
    for section, kwargs in settings.items():
        if kwargs is None:
            continue
        env = agentrl.make(run.env, **kwargs)
        try:
            asyncio.run(_probe_and_close(env))
        except Exception as exc:
            raise ConfigError(f"{run.env} with {section}={kwargs} cannot run episodes: {type(exc).__name__}: {exc}") from None


async def _probe_and_close(env: Any) -> None:
    """One event loop for both: what the probe started (a sandbox's processes) is closed on its own loop."""
    try:
        await env.aprobe()
    finally:
        await env.aclose()


# ---- phases ---------------------------------------------------------------------------------------
def _resume_point(out: RunDir, phase: str, config: Any) -> tuple[Any, int]:
    """``config`` continuing from the phase's newest checkpoint (and its step), or as it is (step 0)."""
    latest = out.latest_checkpoint(phase)
    if latest is None:
        return config, 0
    path, step = latest
    return config.model_copy(update={"resume_from": path}), step


def _last_checkpoint(out: RunDir, phase: str, final: Path) -> Path:
    """A finished phase's model: its newest checkpoint (a time budget can end a phase before max_steps)."""
    latest = out.latest_checkpoint(phase)
    return latest[0] if latest is not None else final


def _sft_phase(resolved: Resolved, out: RunDir, stream: IO[str] | None) -> Path:
    """Train on the env's demonstrations; returns the final checkpoint."""
    import agentrl
    from agentrl.learners import checkpoints
    from agentrl.learners.sft import env_demonstrations, train_sft

    config = resolved.sft
    final = checkpoints.step_dir(config.output_dir, config.max_steps)
    if out.is_finished("sft"):
        return _last_checkpoint(out, "sft", final)
    section = resolved.run.sft
    if section.data is not None:
        from agentrl.learners.sft import read_messages

        demos = read_messages(section.data, columns=section.columns, split=section.split)
    else:
        env = agentrl.make(resolved.run.env, **section.env_kwargs)
        try:
            demos = env_demonstrations(env, range(section.demos), section.demo_options)
        finally:
            env.close()
    key = None
    if section.cache:
        from agentrl.pipeline import sft_cache

        key = sft_cache.sft_key(config.model_dump(mode="json"), demos)
        if (entry := sft_cache.lookup(key)) is not None:
            return _reuse_sft(out, config, entry, stream)
    config, step = _resume_point(out, "sft", config)
    out.start_phase("sft", total=config.max_steps, step=step)
    records: list[dict[str, Any]] = []
    with Progress("sft", config.max_steps, initial=step, stream=stream, budget_s=config.max_seconds) as bar:

        def on_step(log: Any) -> None:
            metrics = {**vars(log), "tokens_per_s": log.tokens / log.seconds if log.seconds else 0.0}
            out.log("sft", log.step, metrics)
            records.append({"step": log.step, "metrics": metrics})
            bar.update(log.step, metrics)

        result = train_sft(config, demos, on_step=on_step)
        last = result.history[-1].step if result.history else step
        if config.max_seconds is not None and last < config.max_steps:
            bar.stopped_early(last, f"its time budget (sft.learner.max_seconds = {config.max_seconds:g} s)")
    out.finish_phase("sft")
    if key is not None and step == 0 and result.checkpoint is not None:  # a resumed phase has part of its log
        sft_cache.store(key, result.checkpoint, last, records)
    return result.checkpoint or final


def _reuse_sft(out: RunDir, config: Any, entry: Any, stream: IO[str] | None) -> Path:
    """Take a cached SFT phase: its checkpoint into this run's ``checkpoints/sft/``, its records into the log."""
    import shutil

    from agentrl.learners import checkpoints

    target = checkpoints.step_dir(config.output_dir, entry.step)
    if not target.is_dir():
        shutil.copytree(entry.checkpoint, target)
    out.start_phase("sft", total=config.max_steps)
    for record in entry.records():
        out.log("sft", record["step"], record["metrics"])
    out.finish_phase("sft")
    print(f"[sft] took the finished phase with the same settings, data, model and code from {entry.path} "
          "(sft.cache; --set sft.cache=false trains it again)", file=stream or sys.stderr, flush=True)  # fmt: skip
    return target


def _rejection_phase(resolved: Resolved, out: RunDir, stream: IO[str] | None, rl_model: Path) -> Path:
    """Sample from the RL model, keep each task's best episodes, fine-tune on them; returns the checkpoint."""
    from agentrl.learners import checkpoints
    from agentrl.learners.rejection import sample_groups, select_best
    from agentrl.learners.sft import train_sft

    config, section = resolved.rejection_sft.model_copy(update={"model": str(rl_model)}), resolved.run.rejection
    final = checkpoints.step_dir(config.output_dir, config.max_steps)
    if out.is_finished("rejection"):
        return _last_checkpoint(out, "rejection", final)
    sampling = resolved.sampling.model_copy(update={"model": str(rl_model)})
    groups = sample_groups(sampling, section.tasks)  # seeded: a resumed phase draws the same data
    best = select_best(groups, section.per_task, section.min_reward)
    if not best:
        raise ConfigError(f"rejection: no sampled episode reached min_reward={section.min_reward}; lower it "
                          "(--set rejection.min_reward=...) or sample more (rejection.group_size)")  # fmt: skip
    played = [t for g in groups for t in g]
    sampled = {"sampled_reward_mean": sum(t.total_reward for t in played) / len(played), "kept": len(best),
               "kept_reward_mean": sum(t.total_reward for t in best) / len(best)}  # fmt: skip
    config, step = _resume_point(out, "rejection", config)
    out.start_phase("rejection", total=config.max_steps, step=step)
    with Progress("rejection", config.max_steps, initial=step, stream=stream) as bar:

        def on_step(log: Any) -> None:
            metrics = {**vars(log), **(sampled if log.step == 1 else {})}
            out.log("rejection", log.step, metrics)
            bar.update(log.step, metrics)

        result = train_sft(config, best, on_step=on_step)
    out.finish_phase("rejection")
    return result.checkpoint or final


def _rl_hooks(resolved: Resolved, phase: str) -> dict[str, Any]:
    """``rescore`` (the judge, in the second stage) and ``monitor`` (the gold score) for the online learner."""
    run, hooks = resolved.run, dict[str, Any]()
    if phase == "rl2" and run.rl2.judge is not None:
        from agentrl.judge import JudgeGroupReward, load_judge_config

        judge = load_judge_config(run.rl2.judge).build()
        hooks["rescore"] = JudgeGroupReward(judge, run.rl2.judge_weight, mode=run.rl2.judge_mode)
    if run.gold.every > 0:
        from agentrl.learners.gold import GoldMonitor

        gold = run.gold
        hooks["monitor"] = GoldMonitor(
            run.env, env_kwargs=gold.env_kwargs, gold=gold.metric, every=gold.every, tasks=gold.tasks,
            max_new_tokens=run.eval.max_new_tokens or resolved.learner.max_new_tokens, temperature=gold.temperature,
            max_turns=resolved.learner.max_turns, template=resolved.learner.template, tolerance=gold.tolerance,
            patience=gold.patience, echo=lambda line: print(f"{phase}: {line}", file=sys.stderr),
        )  # fmt: skip
    return hooks


def _rl_phase(resolved: Resolved, out: RunDir, stream: IO[str] | None, phase: str = "rl",
              start: Path | None = None, budget_s: float | None = None) -> Path | None:  # fmt: skip
    """Train with the run's algorithm (``phase`` "rl", or the second stage "rl2"), from ``start`` when given
    (the model the stage before ended with), with ``budget_s`` as its ``max_seconds`` when given; returns the
    final checkpoint."""
    from agentrl._plugins import load_object
    from agentrl.learners import checkpoints, data_parallel
    from agentrl.rewards.monitors import trajectory_monitors

    config = resolved.learner2 if phase == "rl2" else resolved.learner
    if start is not None:  # the model the stage before ended with (a time budget can end it early)
        config = config.model_copy(update={"model": str(start)})
    if budget_s is not None and budget_s != config.max_seconds:
        config = config.model_copy(update={"max_seconds": budget_s})
    final = checkpoints.step_dir(config.output_dir, config.max_steps)
    if out.is_finished(phase):
        return _last_checkpoint(out, phase, final)
    train = load_object(resolved.train, f"the {resolved.run.algo!r} learner")
    config, step = _resume_point(out, phase, config)
    out.start_phase(phase, total=config.max_steps, step=step)
    from agentrl.evaluation.metrics import PassRule
    from agentrl.evaluation.multiturn import multi_turn_metrics

    passed, every = PassRule(resolved.run.eval.pass_on, resolved.run.eval.pass_threshold), resolved.run.trajectories_every
    played: dict[int, dict[str, float]] = {}

    def on_rollout(step: int, groups: Sequence[TrajectoryGroup]) -> None:
        trajectories = [t for g in groups for t in g]
        played[step] = {
            "pass_rate": sum(map(passed, trajectories)) / max(len(trajectories), 1),
            **{f"monitor/{k}": v for k, v in trajectory_monitors(trajectories).items()},
            **{f"mt/{k}": v for k, v in multi_turn_metrics(trajectories, passed).items()},
        }
        judged = [t.meta["judge"] for t in trajectories if isinstance(t.meta.get("judge"), Mapping)]
        if judged:
            played[step]["judge_failed"] = sum(bool(j.get("failed")) for j in judged) / len(judged)
        if every and (step == 1 or step % every == 0):
            out.add_trajectories(phase, step, trajectories)

    budget = getattr(config, "max_seconds", None)
    with Progress(phase, config.max_steps, initial=step, stream=stream, budget_s=budget) as bar:

        def on_step(log: Any) -> None:
            metrics = {**flatten_metrics(log.as_dict()), **played.pop(log.step, {})}
            if "sampled_tokens" in metrics and log.seconds:
                metrics["tokens_per_s"] = metrics["sampled_tokens"] / log.seconds
            out.log(phase, log.step, metrics)
            bar.update(log.step, metrics)

        hooks = _rl_hooks(resolved, phase)
        data_parallel.announce(resolved.train, config)  # under torchrun: the other ranks join this learner
        try:
            result = train(config, on_step=on_step, on_rollout=on_rollout, **hooks)
        finally:
            if "rescore" in hooks:  # the judge's backend (a model, or an HTTP client)
                asyncio.run(hooks["rescore"].judge.aclose())
        last = result.history[-1].step if result.history else step
        if budget is not None and last < config.max_steps:
            if budget_s is not None and budget_s != resolved.learner.max_seconds:
                why = f"{budget:.0f} s left by run.budget_minutes = {resolved.run.budget_minutes:g}"
            else:
                why = f"learner.max_seconds = {budget:g} s"
            bar.stopped_early(last, f"its time budget ({why}; raise it to train on)")
    out.finish_phase(phase)
    return result.checkpoint or final


def _trained_steps(checkpoint: Path) -> int:
    """The step a ``step-NNNNNN`` checkpoint was saved at (0 for a model that is no such checkpoint)."""
    name = Path(checkpoint).name
    return int(name.removeprefix("step-")) if name.startswith("step-") and name[5:].isdigit() else 0


def _eval_phase(phase: str, checkpoint: Path | None, resolved: Resolved, out: RunDir, max_new_tokens: int,
                stream: IO[str] | None) -> EvalResult | None:  # fmt: skip
    """Evaluate ``checkpoint`` on the held-out tasks into ``eval/<stage>/`` (skipped with ``eval.tasks`` 0)."""
    if resolved.run.eval.tasks == 0 or checkpoint is None:
        return None
    where = out.path / "eval" / phase.removeprefix("eval-")
    if out.is_finished(phase):  # a resumed run: what it measured then
        import json

        return EvalResult.from_results(json.loads((where / "results.json").read_text(encoding="utf-8")), where)
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"{phase}: the checkpoint {checkpoint} is missing; rerun the phase that writes it")
    out.start_phase(phase, total=1)
    with Progress(phase, 1, stream=stream, interval_s=0) as bar:  # opened first: its time is the evaluation's
        result = evaluate_checkpoint(checkpoint, resolved, where, max_new_tokens)
        bar.update(1, result.metrics())
    from agentrl.models.card import write_model_card

    write_model_card(checkpoint, {f"held-out {k}": v for k, v in result.metrics().items()})
    out.log(phase, _trained_steps(checkpoint), result.metrics())  # at the step of the policy it measured
    out.finish_phase(phase)
    return result
