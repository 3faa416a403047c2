"""``agentrl eval`` on Ray: the harness's episodes played by env-worker actors (``EvalConfig.cluster``).

The same actors as a training run's ``cluster`` section (:mod:`agentrl.cluster`): env workers hold the envs
and their sandboxes in their own processes; generation engines (``hf`` or ``vllm``) serve the checkpoint,
behind a router that keeps an episode on one engine. With ``--base-url`` there are no engines: every env
worker calls the endpoint itself.

What holds as in one process:

- every (task, sample) episode is played by a :class:`~agentrl.evaluation.harness` slot with the seeds of
  the pair alone, so it is the same episode whichever worker plays it, and replaying it changes nothing;
- each finished episode is appended to ``episodes.jsonl`` by the driver as it settles, exactly once (a
  second result for a settled pair is ignored and counted as ``duplicates``), so a killed run resumes and
  ``--retry-errors`` replays what ended in an error;
- an episode lost to the infrastructure (its worker died, no engine answered, its sandbox was lost) is
  replayed on another worker up to ``episode_retries`` times; one still lost is not recorded: the report
  counts it among the missing episodes (never a failed attempt with reward 0 in pass@k), and rerunning the
  same command plays it.

Each env worker plays up to ``episodes_per_worker`` episodes at once (``--concurrency`` is the single
process's figure; with ``--base-url`` it caps each worker's requests in flight). ``admission`` has no
meaning here (there is no learner). The env probe runs in the driver before any actor starts, so the driver
must be able to make the env (the modules in ``setup`` registered there too). With ``--base-url`` the
variable named by ``--api-key-env`` is passed to the workers' processes through Ray's runtime env.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from agentrl.cluster.engine import Engine, Router, prepare_process
from agentrl.cluster.faults import Infra, classify
from agentrl.cluster.rollout import connect
from agentrl.cluster.worker import Played, RemotePolicy, episode_context
from agentrl.evaluation.config import EvalConfig
from agentrl.evaluation.harness import Echo, _Progress, _Slot, build_policy
from agentrl.evaluation.store import EpisodeStore

__all__ = ["CheckpointPolicy", "EvalWorker", "play_on_cluster"]

Key = tuple[int, int]
"""(task index, sample index)."""


class EvalWorker:
    """An env-worker actor playing eval episodes as the single-process harness plays them: one harness slot
    (a runner and its env) per episode in flight, reused across episodes.

    Args:
        config: the evaluation (its ``cluster`` says the ``setup`` modules and torch threads).
        tokenizer: the tokenizer the runner renders with (engines only; with ``--base-url`` the worker
            builds the harness's endpoint policy and its tokenizer itself).
        router: the router actor; None with ``--base-url``.
        max_context: ``[ref]``, the ObjectRef of the engines' context window (engines only), read before the
            first episode: wrapped so this actor starts while the engines still load the model.
    """

    def __init__(self, config: EvalConfig, tokenizer: Any, router: Any | None, max_context: list[Any]):
        prepare_process(config.cluster.setup, config.cluster.threads)
        self.config, self.router = config, router
        if router is None:
            self.policy, self.tokenizer = build_policy(config)
        else:
            self.policy, self.tokenizer = CheckpointPolicy(router, 0), tokenizer
        self._max_context = max_context
        self._idle: list[_Slot] = []

    async def play(self, key: Key) -> Played:
        """Play episode ``key``; :attr:`~agentrl.cluster.worker.Played.infra` names an infrastructure failure
        (then the driver replays it)."""
        if self._max_context:
            self.policy.max_context = int(await self._max_context[0])
            self._max_context = []
        name = f"eval/{key[0]}/{key[1]}"
        slot = self._idle.pop() if self._idle else _Slot(self.config, self.policy, self.tokenizer)
        try:
            with episode_context(name):
                trajectory = await slot.play(key)
        except BaseException:  # not an episode failure (those are trajectories): the slot's env is dropped
            await slot.runner.aclose()
            raise
        finally:
            if self.router is not None:
                self.router.release.remote(name)
        self._idle.append(slot)
        lost = getattr(self.policy, "lost", {}).pop(name, None)
        return Played(name, trajectory, lost or classify(trajectory))

    async def aclose(self) -> None:
        """Close every slot's envs, then the policy (an endpoint client). Idempotent."""
        idle, self._idle = self._idle, []
        for slot in idle:
            await slot.runner.aclose()
        await self.policy.aclose()


class CheckpointPolicy(RemotePolicy):
    """The engines' policy as an eval worker sees it. Engines that never got weights from a learner tag
    their generations version -1; an eval samples the checkpoint as loaded, which one process records as 0."""

    async def generate(self, prompt: Any, sampling: Any, *, tools: Any = None) -> Any:
        generation = await super().generate(prompt, sampling, tools=tools)
        return dataclasses.replace(generation, policy_version=max(generation.policy_version, 0))


# ---------------------------------------------------------------------------------------------- the driver
async def play_on_cluster(
    config: EvalConfig, pending: Sequence[Key], store: EpisodeStore, echo: Echo, show_progress: bool
) -> dict[str, int]:
    """Play ``pending`` on the cluster of ``config.cluster``, appending each settled episode to ``store``;
    returns the counters (``settled``, ``replayed``, ``lost``, ``duplicates`` and each fault by kind).

    Raises:
        MissingDependencyError: Ray is not installed.
        RolloutError: every pending episode was lost to the infrastructure and ``store`` holds none.
    """
    cluster = config.cluster
    owns = connect(cluster)
    actors = _Actors(config)
    progress = _Progress(len(pending), echo, show_progress)
    try:
        await actors.start()
        counts = await _Episodes(actors.workers, cluster, store, progress).play(pending)
    finally:
        progress.close()
        await actors.stop(owns)
    _report(counts, len(pending), store, echo)
    return dict(sorted(counts.items()))


class _Actors:
    """The evaluation's actors: engines and their router (none with ``--base-url``), then the env workers.
    Actor names start ``agentrl-eval-<tag>-`` (``ray.kill`` one to see a fault handled)."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.tag = f"agentrl-eval-{uuid.uuid4().hex[:8]}"
        self.engines: list[Any] = []
        self.router: Any = None
        self.workers: list[Any] = []
        self.max_context: list[Any] = []

    async def start(self) -> None:
        import ray

        config, cluster = self.config, self.config.cluster
        tokenizer = None
        if config.backend != "openai":
            from agentrl.models.loading import load_tokenizer

            tokenizer = load_tokenizer(config.resolved_tokenizer)
            self.engines = [
                ray.remote(Engine).options(name=f"{self.tag}-engine-{i}", num_cpus=cluster.engine_cpus,
                                           num_gpus=cluster.engine_gpus, max_restarts=-1)
                .remote(config.backend, _engine_options(config, tokenizer), cluster.setup, cluster.threads)
                for i in range(cluster.engines)
            ]  # fmt: skip
            self.router = (
                ray.remote(Router)
                .options(num_cpus=0, max_restarts=-1, name=f"{self.tag}-router")
                .remote(self.engines, cluster.request_retries, cluster.engine_timeout_s)
            )
            self.max_context = [self.engines[0].max_context.remote()]  # held here while a worker may need it
        self.workers = [
            ray.remote(EvalWorker).options(name=f"{self.tag}-env-worker-{i}", num_cpus=cluster.worker_cpus,
                                           max_restarts=-1, max_concurrency=cluster.episodes_per_worker,
                                           runtime_env=_api_key_env(config))
            .remote(config, tokenizer, self.router, self.max_context)
            for i in range(cluster.env_workers)
        ]  # fmt: skip

    async def stop(self, owns_ray: bool) -> None:
        """Close the workers' envs (bounded in time), kill every actor, and shut down a Ray this run started."""
        import ray

        workers, self.workers = self.workers, []
        if workers:
            closing = [asyncio.ensure_future(_quiet(w.aclose.remote())) for w in workers]
            await asyncio.wait(closing, timeout=10)
        for actor in [*workers, *self.engines, self.router]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.engines, self.router = [], None
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def _api_key_env(config: EvalConfig) -> dict[str, Any] | None:
    """With ``--base-url``, the workers call the endpoint: ``--api-key-env``'s variable goes to their
    processes (Ray's runtime env) when this one has it."""
    key = os.environ.get(config.api_key_env) if config.backend == "openai" else None
    return {"env_vars": {config.api_key_env: key}} if key is not None else None


def _engine_options(config: EvalConfig, tokenizer: Any) -> dict[str, Any]:
    """The engines' backend arguments: the harness's own for ``hf`` / ``vllm`` (``--device``, else the
    cluster's ``engine_device``, places an ``hf`` engine's model)."""
    extra: dict[str, Any] = {"max_context": config.max_context} if config.max_context else {}
    if config.backend == "vllm":
        return {"model": config.model, "tokenizer": config.tokenizer, "dtype": config.dtype, "seed": config.seed,
                **extra}  # fmt: skip
    device = config.device or config.cluster.engine_device
    return {"model": config.model, "tokenizer": tokenizer, "device": device, "dtype": config.dtype,
            "seed": config.seed, **extra}  # fmt: skip


class _Episodes:
    """Hands pending episodes to the env workers (at most ``episodes_per_worker`` each at once), replays
    those lost to the infrastructure on another worker, and records each one exactly once."""

    def __init__(self, workers: Sequence[Any], cluster: Any, store: EpisodeStore, progress: _Progress):
        self.workers, self.cluster, self.store, self.progress = workers, cluster, store, progress
        self.inflight = [0] * len(workers)
        self.counts: Counter[str] = Counter()

    async def play(self, pending: Sequence[Key]) -> Counter[str]:
        """Play ``pending`` to the end; returns the counters (``settled``, ``worker_lost``, ``replayed``,
        ``lost``, ...). A bug in a worker's own code (not an episode failure) is raised here."""
        queue: deque[tuple[Key, int, int | None]] = deque((key, 0, None) for key in pending)
        running: dict[asyncio.Task[Any], tuple[Key, int, int]] = {}
        settled: set[Key] = set()
        try:
            while queue or running:
                while queue and (worker := self._free(queue[0][2])) is not None:
                    key, attempt, _ = queue.popleft()
                    self.inflight[worker] += 1
                    task = asyncio.create_task(_outcome(self.workers[worker].play.remote(key)))
                    running[task] = (key, attempt, worker)
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    key, attempt, worker = running.pop(finished)
                    self.inflight[worker] -= 1
                    if self._settle(key, attempt, finished.result(), settled):
                        queue.append((key, attempt + 1, worker))
        finally:
            for task in running:
                task.cancel()
        return self.counts

    def _free(self, avoid: int | None) -> int | None:
        """The least busy worker with room (another than ``avoid`` where one has room), or None."""
        room = [i for i in range(len(self.workers)) if self.inflight[i] < self.cluster.episodes_per_worker]
        choices = [i for i in room if i != avoid] or room
        return min(choices, key=lambda i: (self.inflight[i], i)) if choices else None

    def _settle(self, key: Key, attempt: int, outcome: Any, settled: set[Key]) -> bool:
        """Record ``outcome`` (a Played, or the Infra of a lost worker); True: replay the episode."""
        infra = outcome if isinstance(outcome, Infra) else outcome.infra
        if infra is not None:
            self.counts[infra.value] += 1
            if attempt < self.cluster.episode_retries:
                self.counts["replayed"] += 1
                return True
            self.counts["lost"] += 1
            return False
        if key in settled:
            self.counts["duplicates"] += 1
            return False
        settled.add(key)
        trajectory = outcome.trajectory
        if attempt:
            trajectory = dataclasses.replace(trajectory, meta={**trajectory.meta, "replays": attempt})
        self.store.append(trajectory)
        self.counts["settled"] += 1
        self.progress.update()
        return False


async def _outcome(ref: Any) -> Any:
    """A worker's :class:`~agentrl.cluster.worker.Played`, or ``Infra.WORKER_LOST`` when the actor died."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayActorError:
        return Infra.WORKER_LOST


async def _quiet(ref: Any) -> None:
    try:
        await ref
    except Exception:  # closing a dead worker's envs: nothing left to close
        pass


def _report(counts: Counter[str], pending: int, store: EpisodeStore, echo: Echo) -> None:
    """Say what the infrastructure cost; raise when it cost every episode and nothing is left to score."""
    from agentrl.errors import RolloutError

    faults = {name: n for name, n in sorted(counts.items()) if name not in ("settled", "lost") and n}
    if faults:
        echo("cluster: " + ", ".join(f"{name} {n}" for name, n in faults.items()))
    lost = counts.get("lost", 0)
    if not lost:
        return
    why = f"{lost} of {pending} episodes were lost to the cluster after every replay"
    if not store.episodes:
        raise RolloutError(
            f"{why}; nothing is left to score. Check the cluster (`ray status`, the env workers' logs) and "
            "rerun the same command"
        )
    echo(
        f"{why}: they are not scored (the report lists them as missing); rerun the same command to play them"
    )
