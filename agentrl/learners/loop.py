"""The shell every online learner (GRPO, PPO, online DPO) runs in: it owns the rollout backend and its
lifetime, the data position, the weight sync, the hooks, the step log, checkpoints and resuming, and when to
stop. A learner hands it an :class:`Online` (its model, optimizer and an ``update(step, groups)`` function)
and keeps its math in its own file.

One step::

    rollout      runner.run(prompts_per_step tasks x group_size, call=step)   (the data position)
    rescore      rescore(groups): change rewards before anything reads them (a judge, a reward model)
    on_rollout   on_rollout(step + 1, groups): trajectory logs, pass rates
    update       online.update(step, groups) -> Update(trained, dropped, stats)   (the learner's own)
    weight sync  to the rollout backend (nothing to copy when it samples with the learner's module)
    log          RLStepLog; monitor(log, model, tokenizer) adds its metrics; on_step(log)
    checkpoint   every save_every steps and at the last step (max_steps, or max_seconds spent)

A run whose every episode failed for :data:`FAILED_STEPS` steps in a row stops with a
:class:`~agentrl.errors.RolloutError` naming the error (a broken env or backend is not the policy's doing,
and training on nothing only burns time); one that trains on nothing, or moves no weight, for
:data:`SILENT_STEPS` steps in a row gets a warning saying why.

With ``config.cluster`` set, the rollouts play on Ray (:class:`agentrl.cluster.rollout.ClusterRollout`, the
runner's surface: ``run``, ``policy.update_weights``, ``aclose``), the update runs off the event loop so episodes
keep settling and starting meanwhile, and each step log gains the cluster's figures (``log.cluster``).

A resumed run restores the optimizer, scheduler, RNG states and the learner's ``state`` from the checkpoint
and plays from the step it reached, so it sees the tasks and seeds the straight run would have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.errors import RolloutError
from agentrl.learners import checkpoints, data_parallel, optim, rl, sync_check
from agentrl.learners.result import TrainResult
from agentrl.types import StopReason

__all__ = [
    "FAILED_STEPS",
    "SILENT_STEPS",
    "Hooks",
    "Monitor",
    "OnRollout",
    "OnStep",
    "Online",
    "Rescore",
    "Update",
    "run_online",
]

FAILED_STEPS = 3
"""Steps in a row whose every episode ended in an error before the shell stops the run."""
SILENT_STEPS = 5
"""Steps in a row that train on no sample, or leave every weight where it was, before the shell warns."""

OnRollout = Callable[[int, Sequence[TrajectoryGroup]], None]
"""Called with ``(step, groups)`` right after a step's rollout (and ``rescore``), before the update: for
trajectory logs and pass rates (the step is the one being taken, counted from 1)."""
OnStep = Callable[[rl.RLStepLog], None]
"""Called with each step's log, after the weight sync and the monitor."""
Monitor = Callable[[rl.RLStepLog, Any, Any], Awaitable[Mapping[str, float]]]
"""Awaited after each step with ``(log, model, tokenizer)``; what it returns becomes the log's ``monitors``
(e.g. :class:`~agentrl.learners.gold.GoldMonitor`'s held-out gold score)."""
Rescore = Callable[[Sequence[TrajectoryGroup]], Sequence[TrajectoryGroup]]
"""Returns a step's groups with changed rewards (e.g. a judge's score added), before anything reads them."""


@dataclass(frozen=True)
class Hooks:
    """What a caller plugs into every online learner (see the types above); each may be None."""

    on_step: OnStep | None = None
    on_rollout: OnRollout | None = None
    rescore: Rescore | None = None
    monitor: Monitor | None = None


@dataclass(frozen=True)
class Update:
    """What one update did: the trajectories it trained on, how many samples each filter dropped, and its
    mean statistics (the step log's ``update``)."""

    trained: Sequence[Trajectory]
    dropped: Mapping[str, int]
    stats: Mapping[str, float]


@dataclass(frozen=True)
class Online:
    """A learner as the shell sees it.

    Attributes:
        model: the policy being trained; the ``hf`` rollout samples with this very module.
        tokenizer: its tokenizer.
        optimizer / scheduler: stepped by ``update``, saved and restored by the shell (an
            :class:`~agentrl.learners.optim.Joint` of several when the learner has several).
        update: ``update(step, groups)`` trains on a step's groups (``step`` counts from 0: seed the
            update's shuffles with it) and says what it did.
        saved: modules checkpointed beside the policy, by directory name (PPO's ``critic``).
        state: values the update reads and changes across steps (PPO's ``kl_coef``): saved in each
            checkpoint's metadata, restored in place on resume, returned in the result's ``extras``.
    """

    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    update: Callable[[int, Sequence[TrajectoryGroup]], Update]
    saved: Mapping[str, Any] = field(default_factory=dict)
    state: MutableMapping[str, Any] = field(default_factory=dict)


def run_online(config: rl.RolloutConfig, learner: str, build: Callable[[], Online], hooks: Hooks) -> TrainResult:
    """Seed, ``build()`` the learner, and run ``config.max_steps`` online steps (see the module docstring).

    Args:
        config: the learner's config (its rollout, stopping and checkpoint fields are read here).
        learner: its name in checkpoint metadata, e.g. ``"grpo"``.
        build: loads the models and makes the optimizers; called after seeding, before any resume.
        hooks: the caller's.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: rank 0 runs the shell, the others serve its
    updates, and the policy is sharded over all of them (:mod:`agentrl.learners.data_parallel`).

    Raises:
        ConfigError: a setting the model, env or backend cannot honour (before any step runs).
    """
    if data_parallel.world().size > 1:
        return data_parallel.run_online(config, learner, build, lambda b: asyncio.run(_run(config, learner, b, hooks)))
    return asyncio.run(_run(config, learner, build, hooks))


async def _run(config: rl.RolloutConfig, learner: str, build: Callable[[], Online], hooks: Hooks) -> TrainResult:
    optim.seed_everything(config.seed)
    online = build()
    model, tokenizer = online.model, online.tokenizer
    step = 0
    if config.resume_from is not None:
        resumed = checkpoints.load_training_state(config.resume_from, online.optimizer, online.scheduler)
        step = resumed.step
        online.state.update({k: resumed.meta[k] for k in online.state if k in resumed.meta})

    if config.cluster is None:
        runner: Any = rl.make_runner(config, model, tokenizer)
    else:  # on Ray: agentrl.cluster
        runner = await _cluster(config, model, tokenizer)
    history: list[rl.RLStepLog] = []
    failed = silent = 0  # steps in a row: every episode an error / nothing learned
    checkpoint: Path | None = None
    try:
        probe = sync_check.probe_sequences(tokenizer) if config.sync_check else []
        if config.cluster is not None:  # its engines got the weights as version 0: check they hold them
            await rl.check_weights(runner, model, config, probe)
        elif config.rollout != "hf":
            await rl.sync_weights(runner, model, config, probe)
        loop_started = time.perf_counter()
        while step < config.max_steps:
            started = time.perf_counter()
            model.eval()
            groups = await runner.run(config.prompts_per_step, config.group_size, call=step)
            rollout_s = time.perf_counter() - started
            if hooks.rescore is not None:
                groups = list(hooks.rescore(groups))
            if hooks.on_rollout is not None:
                hooks.on_rollout(step + 1, groups)

            lr = online.optimizer.param_groups[0]["lr"]
            # On a cluster the update runs off the event loop, so episodes settle and the next ones start meanwhile.
            update = online.update(step, groups) if config.cluster is None else await asyncio.to_thread(
                online.update, step, groups)  # fmt: skip
            step += 1
            synced = await rl.sync_weights(runner, model, config, probe)

            log = rl.step_log(step, groups, update.trained, update.dropped, lr, {**update.stats, **synced}, rollout_s,
                              started, runner)  # fmt: skip
            if config.cluster is not None:
                log = dataclasses.replace(log, cluster=await runner.step_metrics(update.trained, rollout_s))
            if hooks.monitor is not None:
                log = dataclasses.replace(log, monitors=dict(await hooks.monitor(log, model, tokenizer)))
            history.append(log)
            if hooks.on_step is not None:
                hooks.on_step(log)
            failed = failed + 1 if _all_failed(groups) else 0
            if failed >= FAILED_STEPS:
                raise RolloutError(_failure_message(groups, step))
            idle = _learned_nothing(update)
            silent = silent + 1 if idle else 0
            if idle and silent % SILENT_STEPS == 0:
                warnings.warn(f"{learner}: steps {step - silent + 1}-{step} {idle}", RuntimeWarning, stacklevel=2)
            at_save = config.save_every is not None and step % config.save_every == 0
            last = rl.stops_here(config, step, loop_started)
            if config.output_dir is not None and (at_save or last):
                meta = {"config": config.model_dump(mode="json"), "learner": learner, **online.state}
                checkpoint = checkpoints.save_step(config, model, tokenizer, online.optimizer, online.scheduler,
                                                   step, meta, extras=dict(online.saved))  # fmt: skip
            if last:
                break
    finally:
        await runner.aclose()
        await runner.policy.aclose()
    model.train()
    return TrainResult(model, tokenizer, tuple(history), checkpoint, {**online.saved, **online.state})


async def _cluster(config: rl.RolloutConfig, model: Any, tokenizer: Any) -> Any:
    """The rollouts on Ray (:mod:`agentrl.cluster`), shaped like a runner; imported only for a cluster run."""
    from agentrl.cluster.rollout import ClusterRollout

    return await ClusterRollout.start(config, model, tokenizer)


def _all_failed(groups: Sequence[TrajectoryGroup]) -> bool:
    return all(t.stop_reason is StopReason.ERROR for g in groups for t in g) and any(len(g) for g in groups)


def _failure_message(groups: Sequence[TrajectoryGroup], step: int) -> str:
    errors = Counter(t.error or "(no message)" for g in groups for t in g)
    error, count = errors.most_common(1)[0]
    return (f"every episode of the last {FAILED_STEPS} steps ended in an error, so nothing was trained; at step "
            f"{step}, {count} of {errors.total()} ended with: {error}. The env or the rollout backend is broken, "
            "not the policy: fix that error (agentrl check <env> runs the env's checks) and start again")  # fmt: skip


def _learned_nothing(update: Update) -> str | None:
    """Why an update left the policy as it was (None when it trained)."""
    if not update.trained:
        dropped = ", ".join(f"{n} {why}" for why, n in update.dropped.items() if n) or "none played"
        return f"trained on no sample (dropped: {dropped})"
    if update.stats.get("grad_norm") == 0.0:
        return "moved no weight (gradient norm 0: every group's samples scored alike, so no advantage)"
    return None
