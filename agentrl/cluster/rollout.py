"""The driver's side of a cluster run: shaped like a :class:`~agentrl.rollout.runner.Runner`, so the online shell
(:func:`agentrl.learners.loop.run_online`) drives it with the same ``run(P, G, call=step)``, weight sync and
``aclose()``.

Admission (when an episode may start):

- synchronous (``max_staleness`` None): ``run(call=s)`` starts call ``s``'s episodes and returns them;
- ``pace`` (the default asynchronous mode, bound ``k``): call ``c``'s groups are trained by the update that
  reads weight version ``v0 + c - c0`` (``c0``, ``v0``: the first call and the version then), so they start as
  soon as the learner's version is at least ``v0 + c - c0 - k``, never earlier: every sample is trained at most
  ``k`` versions after its oldest turn was sampled, and nothing is thrown away. ``run(call=s)`` returns call
  ``s``'s groups while calls up to ``s + k`` play on;
- ``drop``: up to ``P * (k + 1)`` groups play at any time, started as soon as a slot frees; ``run`` returns the
  first ``P`` groups to finish whose oldest turn is at most ``k`` versions old and discards staler ones
  (``dropped_groups``). Slow episodes come back late and are the ones dropped.

Faults: an episode whose env worker dies, or whose requests find no engine, or whose sandbox is lost, is
replayed (same seeds, on another worker) up to ``episode_retries`` times, then counted as ``lost`` and left out
of its group: it never enters the group's statistics as a reward of 0. Each episode settles exactly once (a
second result for a settled episode is ignored and counted as ``duplicates``). Ray restarts a dead actor;
a restarted engine gets the latest weights before its next request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.cluster import metrics
from agentrl.cluster.engine import Engine, Router
from agentrl.cluster.faults import Infra
from agentrl.cluster.worker import EnvWorker, EpisodeSpec, Played, WorkerSpec
from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.rollout.runner import RolloutLimits, Task

__all__ = ["ClusterPolicy", "ClusterRollout", "connect"]


class ClusterPolicy:
    """The driver's view of the engines (``runner.policy`` to the shell): the weight version, and
    ``update_weights`` sending the learner's weights to every engine through the object store."""

    name = "cluster"

    def __init__(self, rollout: ClusterRollout, max_context: int):
        self._rollout, self.max_context = rollout, max_context
        self.version = 0

    async def generate(self, prompt: Any, sampling: Any, *, tools: Any = None) -> Any:
        raise ConfigError("a cluster's driver does not sample: its env workers do, through the engines")

    async def update_weights(self, named_tensors: Any) -> None:
        """Load ``(name, tensor)`` pairs into every engine as the next version, then admit what it allows."""
        await self._rollout.push_weights(named_tensors, self.version + 1)

    async def score_engines(self, sequences: Any) -> list[list[list[float]] | None]:
        """Every engine's per-token logprobs of ``sequences`` (see :meth:`Router.score_engines`)."""
        rows = [[int(t) for t in row] for row in sequences]
        return list(await self._rollout.router.score_engines.remote(rows))

    async def aclose(self) -> None:
        return None


@dataclass
class _Group:
    call: int
    task_index: int
    task: Task
    slots: list[Trajectory | Infra | None]

    @property
    def done(self) -> bool:
        return all(s is not None for s in self.slots)

    def trajectories(self) -> tuple[Trajectory, ...]:
        return tuple(s for s in self.slots if isinstance(s, Trajectory))


class ClusterRollout:
    """Rollouts on Ray for one run; make it with :meth:`start` (see the module docstring).

    Attributes:
        workers / engines / router: the actor handles (``ray.kill`` one to see a fault handled).
        counts: fault and admission counters since the start.
    """

    def __init__(self, config: Any, workers: list[Any], engines: list[Any], router: Any, owns_ray: bool):
        cluster = config.cluster
        self.config, self.cluster = config, cluster
        self.workers, self.engines, self.router, self._owns_ray = workers, engines, router, owns_ray
        self.policy = ClusterPolicy(self, 0)
        self.k: int | None = config.max_staleness
        self.drop = self.k is not None and cluster.admission == "drop"
        self.counts: Counter[str] = Counter()
        self.calls = 0
        self._groups: dict[tuple[int, int], _Group] = {}
        self._ready: list[tuple[int, int]] = []  # finished groups in the order they finished
        self._inflight = [0] * len(workers)
        self._shape: tuple[int, int] | None = None  # (tasks per call, group size) once run() was called
        self._first: tuple[int, int] = (0, 0)  # (first call, version then)
        self._next = 0  # the next call (pace) or group number (drop) to start
        self._train_version = 0
        self._changed = asyncio.Event()
        self._fatal: BaseException | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._sampled: list[Trajectory] = []
        # (time, engine busy_s, worker busy_s) at the last step's end
        self._last: tuple[float, dict[int, float], dict[int, float]] = (time.monotonic(), {}, {})

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: Any, model: Any, tokenizer: Any) -> ClusterRollout:
        """Start (or join) Ray, the engines, the router and the env workers; load ``model``'s weights into the
        engines as version 0.

        Raises:
            MissingDependencyError: Ray is not installed.
        """
        from agentrl.learners.policy_model import export_weights

        ray = _import_ray()
        cluster = config.cluster
        owns = connect(cluster)
        tag = uuid.uuid4().hex[:8]
        engine_options = {"model": config.model, "seed": config.seed, **dict(config.rollout_options)}
        if config.rollout == "hf":
            engine_options = {"device": cluster.engine_device, "max_batch": config.prompts_per_step * config.group_size,
                              **engine_options}  # fmt: skip
        engine_actor = ray.remote(Engine)
        engines = [
            engine_actor.options(
                name=f"agentrl-{tag}-engine-{i}",
                num_cpus=cluster.engine_cpus,
                num_gpus=cluster.engine_gpus,
                max_restarts=-1,
            ).remote(config.rollout, engine_options, cluster.setup, cluster.threads)
            for i in range(cluster.engines)
        ]
        router = (
            ray.remote(Router)
            .options(num_cpus=0, max_restarts=-1, name=f"agentrl-{tag}-router")
            .remote(engines, cluster.request_retries, cluster.engine_timeout_s)
        )
        max_context = int(await engines[0].max_context.remote())
        spec = WorkerSpec(
            env=config.env, env_kwargs=dict(config.env_kwargs), tokenizer=tokenizer, sampling=config.sampling,
            limits=_limits(config), concurrency=cluster.episodes_per_worker, seed=config.seed,
            template=config.template, max_context=max_context, setup=tuple(cluster.setup), threads=cluster.threads,
        )  # fmt: skip
        worker_actor = ray.remote(EnvWorker)
        workers = [
            worker_actor.options(
                name=f"agentrl-{tag}-env-worker-{i}",
                num_cpus=cluster.worker_cpus,
                max_restarts=-1,
                max_concurrency=cluster.episodes_per_worker,
            ).remote(spec, router)
            for i in range(cluster.env_workers)
        ]
        rollout = cls(config, workers, engines, router, owns)
        rollout.policy.max_context = max_context
        await rollout.push_weights(export_weights(model), 0)
        return rollout

    # ---- the Runner surface ----------------------------------------------------------------------
    async def run(
        self, tasks: int | Iterable[Task | int], group_size: int = 1, *, call: int | None = None,
        seed: int | None = None,
    ) -> list[TrajectoryGroup]:  # fmt: skip
        """Call ``call``'s groups (synchronous and ``pace``), or the next ``P`` fresh groups (``drop``).

        Raises:
            ConfigError: a per-call ``seed`` (the workers hold the run's), task lists in the asynchronous mode,
                or a group size other than the first call's.
            ray.exceptions.RayError: a failure of the driver's own calls to Ray (not an actor's loss).
        """
        if seed is not None:
            raise ConfigError(
                "a cluster plays with the run's seed; a per-call seed needs the single-process runner"
            )
        call = self.calls if call is None else call
        self.calls = call + 1
        task_list = [Task() for _ in range(tasks)] if isinstance(tasks, int) else [
            t if isinstance(t, Task) else Task(seed=t) for t in tasks
        ]  # fmt: skip
        if self._shape is None:
            self._shape, self._first, self._next = (
                (len(task_list), group_size),
                (call, self.policy.version),
                call,
            )
            self._last = (time.monotonic(), {}, {})  # the first step's figures leave out the actors' start-up
            if self.drop:
                self._next = call * len(task_list)
        elif self._shape != (len(task_list), group_size) or (
            self.k is not None and not isinstance(tasks, int)
        ):
            raise ConfigError("the asynchronous mode plays the same number of tasks and samples every call")
        self._train_version = self.policy.version
        if self.drop:
            return await self._fresh_groups()
        if self.k is None:
            self._start_call(call, task_list)
        self._admit()
        keys = [(call, i) for i in range(len(task_list))]
        await self._until(lambda: all(k in self._groups and self._groups[k].done for k in keys))
        groups = [self._groups.pop(k) for k in keys]
        self._ready = [k for k in self._ready if k not in keys]
        return [TrajectoryGroup(_group_id(g), g.trajectories()) for g in groups]

    async def push_weights(self, named_tensors: Any, version: int) -> None:
        """Put the weights in the object store once and load them into every engine as ``version``."""
        ray = _import_ray()
        weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in named_tensors}
        await self.router.set_weights.remote([ray.put(weights)], version)
        self.policy.version = version
        self._admit()

    async def aclose(self) -> None:
        """Stop the actors (env workers close their envs first) and a Ray instance this run started.
        Idempotent."""
        ray = _import_ray()
        for task in list(self._tasks):
            task.cancel()
        workers, self.workers = self.workers, []
        if workers:
            await asyncio.wait(
                [asyncio.ensure_future(_quiet(w.aclose.remote())) for w in workers], timeout=10
            )
        for actor in [*workers, *self.engines, self.router]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.engines, self.router = [], None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    # ---- admission -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start what the asynchronous bound allows now (see the module docstring)."""
        if self._shape is None or self.k is None:
            return
        tasks, _ = self._shape
        if self.drop:
            while len(self._groups) < tasks * (self.k + 1):  # playing or ready, not yet taken
                call, index = divmod(self._next, tasks)
                self._start_group(call, index, Task(id=f"call-{call}-task-{index}"))
                self._next += 1
            return
        first_call, first_version = self._first
        while self.policy.version >= first_version + (self._next - first_call) - self.k:
            self._start_call(self._next, [Task() for _ in range(tasks)])
            self._next += 1

    def _start_call(self, call: int, tasks: Sequence[Task]) -> None:
        for index, task in enumerate(tasks):
            self._start_group(call, index, task)

    def _start_group(self, call: int, index: int, task: Task) -> None:
        assert self._shape is not None
        size = self._shape[1]
        self._groups[(call, index)] = _Group(call, index, task, [None] * size)
        for sample in range(size):
            self._submit(EpisodeSpec(call, index, sample, task), attempt=0)

    async def _fresh_groups(self) -> list[TrajectoryGroup]:
        """``drop``: the first groups to finish within the bound; staler ones are discarded."""
        assert self._shape is not None and self.k is not None
        taken: list[_Group] = []
        while len(taken) < self._shape[0]:
            self._admit()
            await self._until(lambda: bool(self._ready))
            group = self._groups.pop(self._ready.pop(0))
            kept = group.trajectories()
            if kept and max(metrics.staleness(t, self.policy.version) for t in kept) > self.k:
                self.counts["dropped_groups"] += 1
                continue
            taken.append(group)
        self._admit()
        return [TrajectoryGroup(_group_id(g), g.trajectories()) for g in taken]

    # ---- episodes --------------------------------------------------------------------------------
    def _submit(self, episode: EpisodeSpec, attempt: int, avoid: int | None = None) -> None:
        choices = [i for i in range(len(self.workers)) if i != avoid] or list(range(len(self.workers)))
        worker = min(choices, key=lambda i: (self._inflight[i], i))
        self._inflight[worker] += 1
        ref = self.workers[worker].play.remote(episode)
        task = asyncio.ensure_future(self._watch(episode, attempt, worker, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, episode: EpisodeSpec, attempt: int, worker: int, ref: Any) -> None:
        ray = _import_ray()
        played: Played | None = None
        try:
            played = await ref
            infra = played.infra
        except ray.exceptions.RayActorError:
            infra = Infra.WORKER_LOST
        except Exception as exc:  # a bug in the worker's own code: the run stops with it
            self._fatal = exc
            self._changed.set()
            return
        finally:
            self._inflight[worker] -= 1
        if infra is not None:
            self.counts[infra.value] += 1
            if attempt < self.cluster.episode_retries:
                self.counts["replayed"] += 1
                self._submit(episode, attempt + 1, avoid=worker)
                return
            self.counts["lost"] += 1
            self._settle(episode, infra)
            return
        assert played is not None
        trajectory = played.trajectory
        if attempt:
            trajectory = dataclasses.replace(trajectory, meta={**trajectory.meta, "replays": attempt})
        self._settle(episode, trajectory)

    def _settle(self, episode: EpisodeSpec, outcome: Trajectory | Infra) -> None:
        """Record an episode's one outcome; its group is ready once every sample settled."""
        group = self._groups.get((episode.call, episode.task_index))
        if group is None or group.slots[episode.sample_index] is not None:
            self.counts["duplicates"] += 1
            return
        group.slots[episode.sample_index] = outcome
        self.counts["settled"] += 1
        if isinstance(outcome, Trajectory):
            self._sampled.append(outcome)
        if group.done:
            self._ready.append((episode.call, episode.task_index))
            self._changed.set()
            if self.drop:
                self._admit()

    async def _until(self, predicate: Any) -> None:
        while not predicate():
            if self._fatal is not None:
                raise self._fatal
            self._changed.clear()
            await self._changed.wait()

    # ---- observability ---------------------------------------------------------------------------
    async def step_metrics(self, trained: Sequence[Trajectory], rollout_seconds: float) -> dict[str, float]:
        """The step's figures (see :mod:`agentrl.cluster.metrics`); resets the per-step windows."""
        now = time.monotonic()
        since, engines_before, workers_before = self._last
        seconds = max(now - since, 1e-9)
        engines = await _stats([e.stats.remote() for e in self.engines])
        workers = await _stats([w.stats.remote() for w in self.workers])
        router = (await _stats([self.router.stats.remote()])).get(0, {})
        engine_busy = {i: s["busy_s"] for i, s in engines.items()}
        worker_busy = {i: s["busy_s"] for i, s in workers.items()}
        sampled, self._sampled = self._sampled, []
        out = {
            **metrics.staleness_histogram(trained, self._train_version),
            **metrics.distribution("sampled", sampled), **metrics.distribution("trained", list(trained)),
            "engine_busy": metrics.busy_share(engine_busy, engines_before, seconds),
            "worker_busy": metrics.busy_share(worker_busy, workers_before, seconds),
            "queue/episodes": float(sum(self._inflight)), "queue/requests": float(router.get("outstanding", 0)),
            "queue/groups_ready": float(len(self._ready)), "episodes_per_s": len(sampled) / seconds,
            "learner_idle": min(1.0, rollout_seconds / seconds),
            # an episode whose requests found no engine is not the router's per-request ``engine_lost``
            **{_EPISODE_COUNTER.get(name, name): float(n) for name, n in self.counts.items()},
            **{name: float(router.get(name, 0)) for name in ("engine_lost", "engine_timeout")},
        }  # fmt: skip
        self._last = (now, engine_busy, worker_busy)
        return out


_EPISODE_COUNTER = {Infra.ENGINE_LOST.value: "engine_unavailable"}
"""Episode counters logged under another name than their :class:`Infra` value, where a router counter has it."""


def _group_id(group: _Group) -> str:
    return group.task.id if group.task.id is not None else f"task-{group.task_index}"


def _limits(config: Any) -> RolloutLimits:
    return RolloutLimits(
        max_turns=config.max_turns, max_sampled_tokens=config.max_sampled_tokens,
        max_context=config.max_context, deadline_s=config.episode_deadline_s,
    )  # fmt: skip


async def _stats(refs: Sequence[Any]) -> dict[int, dict[str, float]]:
    """Each live actor's stats by index (a dead or restarting one is left out)."""
    results = await asyncio.gather(*refs, return_exceptions=True)
    return {i: r for i, r in enumerate(results) if isinstance(r, dict)}


async def _quiet(ref: Any) -> None:
    try:
        await ref
    except Exception:  # closing a dead worker's envs: nothing left to close
        pass


def connect(cluster: Any) -> bool:
    """Join Ray as ``cluster`` (a :class:`~agentrl.cluster.config.ClusterConfig`) says, unless this process
    already has: start a local instance (``address`` None) or join ``address``. True when this call connected
    (the caller then shuts Ray down at its end); False when Ray was already initialized (left running).

    Raises:
        MissingDependencyError: Ray is not installed.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    local = cluster.address is None
    store = cluster.object_store_mb * 2**20 if cluster.object_store_mb and local else None
    ray.init(address=cluster.address, num_cpus=cluster.num_cpus if local else None,
             object_store_memory=store, include_dashboard=False)  # fmt: skip
    return True


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        from agentrl.errors import MissingDependencyError

        raise MissingDependencyError(
            "a cluster run needs Ray: install it with `pip install 'agentrl[ray]'`, or drop the cluster section"
        ) from None
    return ray
