"""Play ``n`` tasks ``k`` times with one policy, resumably, and score the episodes.

Every episode is a (task, sample) pair with its own seeds, derived from the run seed and the pair alone:
task ``i`` resets with seed ``derive_seed(seed, 0, i)`` (and options ``{task_option: i}`` when set), and
sample ``s`` of it samples as call 0 of a :class:`~agentrl.rollout.runner.Runner` seeded
``derive_seed(seed, 1, i, s)``. So an episode does not depend on which others ran before it, in which
order or in which process: a resumed run plays the missing pairs exactly as an uninterrupted run would
have, and a rerun with a larger ``n`` or ``k`` extends the same tasks.

``concurrency`` workers each own a runner (with one env, reused across episodes) and take pairs from a
shared queue; the policy batches their requests. Each finished episode is appended to
``episodes.jsonl`` at once (see :mod:`agentrl.evaluation.store`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.core import Env, Wrapper
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.evaluation import selection
from agentrl.evaluation.config import EvalConfig
from agentrl.evaluation.metrics import PassRule, episode_stats, group_tasks, summarize, task_cluster
from agentrl.evaluation.multiturn import first_attempt, multi_turn_section
from agentrl.evaluation.store import (
    EpisodeStore,
    check_identity,
    episode_key,
    read_run_file,
    write_run_file,
)
from agentrl.rollout.runner import Task, derive_seed
from agentrl.types import StopReason

__all__ = ["EvalOutcome", "build_results", "eval_task", "evaluate", "report_only", "sample_seed", "task_seed"]

RESULTS_SCHEMA = 1
Echo = Callable[[str], None]


def task_seed(seed: int, task_index: int) -> int:
    """The reset seed of task ``task_index`` (shared by all its samples)."""
    return derive_seed(seed, 0, task_index)


def sample_seed(seed: int, task_index: int, sample_index: int) -> int:
    """The seed of the runner that plays sample ``sample_index`` of task ``task_index``."""
    return derive_seed(seed, 1, task_index, sample_index)


def eval_task(config: EvalConfig, task_index: int) -> Task:
    """Task ``task_index`` of the evaluation, as the runner takes it."""
    if config.task_option:
        return Task(
            task_seed(config.seed, task_index),
            {config.task_option: task_index},
            f"{config.task_option}={task_index}",
        )
    return Task(task_seed(config.seed, task_index), None, f"task-{task_index}")


@dataclass(frozen=True)
class EvalOutcome:
    """What :func:`evaluate` did: the results (also in ``results.json``) and where they are."""

    results: dict[str, Any]
    out: Path
    played: int
    resumed: int
    failed_all: bool


class _RecordResetInfo(Wrapper):
    """Keeps the latest reset's info (e.g. the env's own task id), so the episode record can name it."""

    def __init__(self, env: Env):
        super().__init__(env)
        self.max_turns = getattr(env, "max_turns", None)
        self.reset_info: dict[str, Any] = {}

    def tool_schemas(self) -> Any:
        return self.env.tool_schemas()

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.reset_info = {}
        result = await self.env.areset(seed=seed, options=options)
        self.reset_info = dict(result[1] or {})
        return result


# ---------------------------------------------------------------------------------------------- setup
def make_env(config: EvalConfig) -> Env:
    """The env with ``env_kwargs``; an argument it does not take is a ConfigError naming ``--env-arg``."""
    import agentrl

    try:
        return agentrl.make(config.env, **dict(config.env_kwargs))  # type: ignore[no-any-return]
    except TypeError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in config.env_kwargs.items()) or "none"
        raise ConfigError(
            f"{config.env} cannot be made with --env-arg {given}: {exc}. Drop or rename the --env-arg; the "
            "env's arguments are in its class docstring"
        ) from exc


async def probe_env(config: EvalConfig) -> None:
    """Reset the last task once and run the env's own probe (:meth:`~agentrl.core.Env.aprobe`, e.g. its
    sandbox) before any model is loaded, so a bad env setting fails in seconds.

    Raises:
        ConfigError: the env cannot be made, cannot reset task ``n - 1`` (e.g. fewer tasks than ``n``), or
            its probe failed (e.g. a sandbox that cannot run).
    """
    env = make_env(config)
    task = eval_task(config, config.n - 1)
    try:
        await _probe(env, config, task)
    finally:
        try:
            await env.aclose()
        except Exception:
            pass  # a probe env that fails to close does not stop the run


async def _probe(env: Env, config: EvalConfig, task: Task) -> None:
    try:
        await env.areset(seed=task.seed, options=dict(task.options) if task.options else None)
    except Exception as exc:
        hint = (
            f"The env may have fewer than --n {config.n} tasks: lower --n, or check --task-option and --env-arg."
            if config.task_option
            else "Check --env-arg, or pick tasks by index with --task-option."
        )
        raise ConfigError(
            f"{config.env} cannot reset task {config.n - 1} (reset options {task.options}): "
            f"{type(exc).__name__}: {exc}. {hint}"
        ) from exc
    try:
        await env.aprobe()
    except Exception as exc:
        raise ConfigError(f"{config.env} cannot run episodes: {type(exc).__name__}: {exc}") from exc


async def probe_endpoint(config: EvalConfig) -> None:
    """With ``--base-url``, ask the server which models it serves before anything is played or written.

    Raises:
        ConfigError: the server does not serve ``--model`` (the message names what it serves), or refuses
            the key.
        OpenAIError: no reply from ``--base-url``.
    """
    if config.backend != "openai" or not config.check_model:
        return
    from agentrl.rollout.openai import OpenAIPolicy

    policy = OpenAIPolicy(config.model, config.base_url or "", api_key_env=config.api_key_env, retries=1)
    try:
        await policy.aprobe()
    finally:
        await policy.aclose()


def build_policy(config: EvalConfig) -> tuple[Any, Any]:
    """The policy backend and the tokenizer the runner renders with."""
    from agentrl.models.loading import load_tokenizer
    from agentrl.rollout.policy import make_policy

    tokenizer = load_tokenizer(config.resolved_tokenizer)
    extra: dict[str, Any] = {"max_context": config.max_context} if config.max_context else {}
    if config.backend == "openai":
        policy = make_policy(
            "openai",
            model=config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env,
            max_concurrency=config.concurrency,
            **extra,
        )
    elif config.backend == "vllm":
        policy = make_policy(
            "vllm",
            model=config.model,
            tokenizer=config.tokenizer,
            dtype=config.dtype,
            seed=config.seed,
            **extra,
        )
    else:
        policy = make_policy(
            "hf",
            model=config.model,
            tokenizer=tokenizer,
            device=resolved_device(config),
            dtype=config.dtype,
            seed=config.seed,
            **extra,
        )
    return policy, tokenizer


def _quietly(build: Callable[[EvalConfig], Any], config: EvalConfig) -> Any:
    """``build(config)`` without transformers' own progress bars ("Loading weights") beside the harness's."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return build(config)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolved_device(config: EvalConfig) -> str:
    """``--device``, else ``cuda`` where a GPU is visible, else ``cpu`` (local backends only)."""
    if config.device:
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- playing
def _pending(config: EvalConfig, done: Mapping[tuple[int, int], Trajectory]) -> list[tuple[int, int]]:
    plan = [(i, s) for i in range(config.n) for s in range(config.k)]
    if config.retry_errors:
        return [key for key in plan if key not in done or done[key].stop_reason == StopReason.ERROR]
    return [key for key in plan if key not in done]


def _replaying_only_failures(config: EvalConfig, done: Mapping[tuple[int, int], Trajectory], echo: Echo) -> bool:
    """``--retry-errors`` over a directory whose every episode failed: nothing sampled is kept, so new
    settings (a corrected ``--model``) may replace the old ones."""
    if not (config.retry_errors and all(t.stop_reason == StopReason.ERROR for t in done.values())):
        return False
    existing = read_run_file(config.out_dir)
    if existing is not None and existing["identity"] != json.loads(json.dumps(config.identity())):
        echo(f"every saved episode in {config.out_dir} failed: replaying them with the settings given now")
    return True


def _record(
    config: EvalConfig, trajectory: Trajectory, key: tuple[int, int], info: Mapping[str, Any]
) -> Trajectory:
    """The runner's trajectory with ``meta`` naming the evaluation's task and sample."""
    task_index, sample_index = key
    meta = {
        **trajectory.meta,
        "env": config.env,
        "group_id": eval_task(config, task_index).id,
        "task_index": task_index,
        "sample_index": sample_index,
        "run_seed": config.seed,
        "sample_seed": sample_seed(config.seed, task_index, sample_index),
        "call": 0,
    }
    if isinstance(info.get("task_id"), str | int):
        meta["env_task_id"] = info["task_id"]
    return dataclasses.replace(trajectory, meta=meta)


class _Slot:
    """One worker's runner, and the envs it made (the latest one played the latest episode)."""

    def __init__(self, config: EvalConfig, policy: Any, tokenizer: Any):
        from agentrl.registry import spec
        from agentrl.rollout.policy import SamplingParams
        from agentrl.rollout.runner import RolloutLimits, Runner

        self.envs: list[_RecordResetInfo] = []
        self.runner = Runner(
            self._make_env,
            policy,
            tokenizer,
            sampling=SamplingParams(
                max_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
            ),
            limits=RolloutLimits(
                max_turns=config.max_turns or spec(config.env).max_turns,
                max_sampled_tokens=config.max_episode_tokens,
                deadline_s=config.episode_timeout_s,
            ),
            concurrency=1,
            seed=config.seed,
            template=config.template,
            prompt_format=config.resolved_prompt_format,
            history=config.history,
            tool_format=config.tool_format,
        )
        self.config = config

    def _make_env(self) -> Any:  # a Wrapper, which the runner drives like an Env
        self.envs.append(_RecordResetInfo(make_env(self.config)))
        return self.envs[-1]

    async def play(self, key: tuple[int, int]) -> Trajectory:
        """Episode ``key``: call 0 of a runner seeded by the pair alone, so no other episode changes it."""
        seed = sample_seed(self.config.seed, *key)
        [group] = await self.runner.run([eval_task(self.config, key[0])], group_size=1, call=0, seed=seed)
        info = self.envs[-1].reset_info if self.envs else {}
        return _record(self.config, group.trajectories[0], key, info)


async def play(
    config: EvalConfig,
    pending: Sequence[tuple[int, int]],
    store: EpisodeStore,
    echo: Echo,
    show_progress: bool,
) -> dict[str, int] | None:
    """Play the pending pairs with ``concurrency`` workers, appending each episode to the store; on a
    cluster, return its counters (settled, replayed, lost, each fault by kind), else None.

    Episode failures are trajectories; anything else (a template the runner refuses, a full disk) stops
    every worker before it is raised, so no episode is recorded against a closed policy.
    """
    if config.cluster is not None:  # on Ray env workers; an episode lost to the cluster is left unrecorded
        from agentrl.evaluation.cluster import play_on_cluster

        return await play_on_cluster(config, pending, store, echo, show_progress)
    policy, tokenizer = _quietly(build_policy, config)
    try:
        slots = [_Slot(config, policy, tokenizer) for _ in range(min(config.concurrency, len(pending)))]
        queue = deque(pending)
        progress = _Progress(len(pending), echo, show_progress)

        async def worker(slot: _Slot) -> None:
            try:
                while queue:
                    key = queue.popleft()
                    store.append(await slot.play(key))
                    progress.update()
            finally:
                await slot.runner.aclose()

        tasks = [asyncio.ensure_future(worker(slot)) for slot in slots]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            progress.close()
    finally:
        await policy.aclose()
    return None


class _Progress:
    """A progress bar on a terminal; a line per tenth of the episodes otherwise (logs, pipes)."""

    def __init__(self, total: int, echo: Echo, show: bool):
        self.total, self.done, self.echo = total, 0, echo
        self.started = time.monotonic()
        self.bar: Any = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="episode", file=sys.stderr, dynamic_ncols=True)
        self.step = max(1, math.ceil(total / 10)) if show else 0

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.step and (self.done % self.step == 0 or self.done == self.total):
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            self.echo(f"  {self.done}/{self.total} episodes ({rate:.1f}/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- results
def build_results(
    config: EvalConfig,
    trajectories: Sequence[Trajectory],
    timing: Mapping[str, Any] | None = None,
    scores: Mapping[tuple[int, int], float | None] | None = None,
) -> dict[str, Any]:
    """Every metric of the episodes, the per-task samples and the config, JSON-ready (NaN as null).

    Args:
        scores: each episode's best-of-N score by (task, sample); None with ``config.best_of_n_by`` set:
            scored here (without reading or writing ``scores.json``).

    Raises:
        ConfigError: the pass rule (or ``--best-of-n-by component:...``) names a reward component no
            episode has.
    """
    from agentrl import __version__

    stats = [episode_stats(t, config.pass_rule) for t in trajectories]
    _check_pass_component(config, stats)
    metrics = summarize(
        stats, config.ks, resamples=config.resamples, confidence=config.confidence, seed=config.seed
    )
    if config.best_of_n_by and scores is None:
        scorer = selection.make_scorer(config.best_of_n_by, config)
        scores = selection.score_all(scorer, trajectories)
    scores = scores if config.best_of_n_by else None
    answers = selection.episode_answers(config, trajectories) if config.maj_k else None
    grouped = group_tasks(stats)
    metrics.update(selection.selection_metrics(config, grouped, scores, answers))
    cluster = {task.task_index: task_cluster(task) for task in grouped}
    multi_turn = multi_turn_section(
        trajectories, config.pass_rule, [cluster[s.task_index] for s in stats], resamples=config.resamples,
        confidence=config.confidence, seed=config.seed,
    )  # fmt: skip
    if multi_turn is not None:
        metrics["multi_turn"] = multi_turn
    firsts = {(s.task_index, s.sample_index): first_attempt(t) for s, t in zip(stats, trajectories, strict=True)}
    env_task_ids = {int(t.meta["task_index"]): t.meta.get("env_task_id") for t in trajectories}
    tasks = []
    for task in grouped:
        entry = {**task.to_dict(config.ks), **selection.task_selection(task, config.ks, scores, answers)}
        for sample in entry["samples"]:
            key = (task.task_index, sample["sample"])
            if scores is not None:
                sample["score"] = scores.get(key)
            if answers is not None:
                sample["answer"] = answers.get(key)
            if multi_turn is not None:
                sample["first_attempt_passed"] = firsts.get(key)
        if env_task_ids.get(task.task_index) is not None:
            entry["env_task_id"] = env_task_ids[task.task_index]
        tasks.append(entry)
    return _json_ready(
        {
            "schema": RESULTS_SCHEMA,
            "agentrl_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "pass_rule": config.pass_rule.describe(),
            "planned": {"tasks": config.n, "samples_per_task": config.k, "episodes": config.n * config.k},
            "metrics": metrics,
            "tasks": tasks,
            "timing": dict(timing or {}),
        }
    )


def _check_pass_component(config: EvalConfig, stats: Sequence[Any]) -> None:
    rule = config.pass_rule
    seen = sorted({name for s in stats for name in s.components})
    if rule.on == "reward" or rule.on in seen or not seen:
        return
    raise ConfigError(
        f"--pass-on {rule.on!r}: no episode has a reward component by that name; {config.env} reports "
        f"{', '.join(seen)}. Score the saved episodes again with `agentrl eval --report-only --out "
        f"{config.out} --pass-on <one of those>` (or --pass-on reward)"
    )


def _json_ready(value: Any) -> Any:
    """NaN and infinities as null, so results.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _finish(
    config: EvalConfig, trajectories: list[Trajectory], timing: dict[str, Any], echo: Echo
) -> dict[str, Any]:
    from agentrl.evaluation.report import write_report

    scores = selection.episode_scores(config, trajectories, echo) if config.best_of_n_by else None
    results = build_results(config, trajectories, timing, scores)
    out = config.out_dir
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    write_report(out, results, trajectories)
    return results


# ---------------------------------------------------------------------------------------------- entry points
def evaluate(config: EvalConfig, *, echo: Echo = print, show_progress: bool = True) -> EvalOutcome:
    """Play what is missing of the ``n x k`` plan in ``config.out``, then write results and the report.

    Raises:
        ConfigError: a bad setting, an env that cannot start, or an output directory holding episodes of
            other settings. Failed episodes never raise: they are results (``stop_reason`` ``error``).
        KeyboardInterrupt: the run was stopped; every episode finished so far is saved, and the same command
            resumes.
    """
    from agentrl.registry import spec

    started = time.monotonic()
    env_id = spec(config.env).id  # an unknown id fails here, with a did-you-mean
    if env_id != config.env:  # a bare name means its latest version: record which one played
        config = dataclasses.replace(config, env=env_id)
    if config.best_of_n_by:  # a scorer that cannot work fails now, not after every episode is played
        selection.check_source(config.best_of_n_by)
    asyncio.run(probe_env(config))
    asyncio.run(probe_endpoint(config))
    out = config.out_dir
    with EpisodeStore(out, echo) as store:
        # Settings bind a directory once it holds episodes, except where every one failed and is replayed.
        binding = bool(store.episodes) and not _replaying_only_failures(config, store.episodes, echo)
        if binding:
            check_identity(out, config.identity())
        write_run_file(out, config.identity(), config.to_dict(), keep_identity=binding)
        pending = _pending(config, store.episodes)
        resumed = config.n * config.k - len(pending)
        if resumed:
            echo(f"resuming {out}: {resumed} of {config.n * config.k} episodes already played")
        cluster = asyncio.run(play(config, pending, store, echo, show_progress)) if pending else None
        plan = [(i, s) for i in range(config.n) for s in range(config.k)]
        trajectories = [store.episodes[key] for key in plan if key in store.episodes]  # all but lost ones
    played_keys = set(pending)
    played_now = [t for t in trajectories if episode_key(t) in played_keys]
    timing: dict[str, Any] = {"wall_s": time.monotonic() - started, "played": len(played_now), "resumed": resumed}
    if cluster is not None:  # what the infrastructure cost this call, e.g. {"settled": 16, "worker_lost": 1}
        timing["cluster"] = cluster
    results = _finish(config, trajectories, timing, echo)
    failed_all = bool(played_now) and all(t.stop_reason == StopReason.ERROR for t in played_now)
    return EvalOutcome(results, out, len(played_now), resumed, failed_all)


def report_only(
    out: Path,
    echo: Echo = print,
    *,
    pass_on: str | None = None,
    pass_threshold: float | None = None,
    ks: Sequence[int] | None = None,
    resamples: int | None = None,
    confidence: float | None = None,
    best_of_n_by: str | None = None,
    maj_k: bool | None = None,
    answer_format: str | None = None,
) -> EvalOutcome:
    """Score the episodes saved in ``out`` again (e.g. with another pass rule) and rewrite the report.

    Args:
        out: an output directory of :func:`evaluate`.
        pass_on, pass_threshold, ks, resamples, confidence, best_of_n_by, maj_k, answer_format: scoring
            settings to change; None keeps the saved run's. Best-of-N scores already in ``scores.json``
            for the same source are reused.

    Raises:
        ConfigError: ``out`` holds no evaluation or no episodes, or a new setting is invalid.
    """
    saved = read_run_file(out)
    if saved is None or "config" not in saved:
        raise ConfigError(f"{out} holds no agentrl eval run (no run.json); pass the --out of an earlier eval")
    config = EvalConfig.from_dict({**saved["config"], "out": str(out)})
    rule = PassRule(
        config.pass_rule.on if pass_on is None else pass_on,
        config.pass_rule.threshold if pass_threshold is None else pass_threshold,
    )
    config = dataclasses.replace(
        config,
        pass_rule=rule,
        ks=tuple(ks) if ks else config.ks,
        resamples=config.resamples if resamples is None else resamples,
        confidence=config.confidence if confidence is None else confidence,
        best_of_n_by=config.best_of_n_by if best_of_n_by is None else best_of_n_by,
        maj_k=config.maj_k if maj_k is None else maj_k,
        answer_format=config.answer_format if answer_format is None else answer_format,
    )
    started = time.monotonic()
    with EpisodeStore(out, echo) as store:
        plan = [(i, s) for i in range(config.n) for s in range(config.k)]
        trajectories = [store.episodes[key] for key in plan if key in store.episodes]
    missing = len(plan) - len(trajectories)
    if missing:
        echo(f"{missing} of {len(plan)} planned episodes are not in {out}; rerun the eval to play them")
    if not trajectories:
        raise ConfigError(f"{out} holds no episodes yet; run the eval first")
    results = _finish(
        config,
        trajectories,
        {"wall_s": time.monotonic() - started, "played": 0, "resumed": len(trajectories), "missing": missing},
        echo,
    )
    return EvalOutcome(results, out, 0, len(trajectories), False)
