"""The env worker: the runner's episode loop inside a Ray actor, sampling through the router.

One :class:`EnvWorker` holds one :class:`~agentrl.rollout.runner.Runner` (its envs and their sandboxes live in
the actor's process) and plays the episodes the driver hands it, many at once. Its policy is a
:class:`RemotePolicy`: each generation request goes to the router with the episode's key, so a multi-turn
episode stays on one engine.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrl.cluster import faults
from agentrl.cluster.engine import prepare_process
from agentrl.cluster.metrics import BusyClock
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.rollout.policy import Generation, SamplingParams
from agentrl.rollout.runner import RolloutLimits, Task
from agentrl.types import Message, ToolSchema

__all__ = ["EnvWorker", "EpisodeSpec", "Played", "RemotePolicy", "WorkerSpec", "episode_context"]

_EPISODE: contextvars.ContextVar[str] = contextvars.ContextVar("agentrl_cluster_episode")
"""The key of the episode whose task is running (each actor call is its own task with its own context)."""


@contextlib.contextmanager
def episode_context(key: str) -> Iterator[None]:
    """Generation requests made inside (in this task) are episode ``key``'s: :class:`RemotePolicy` sends them
    with it, so the router keeps them on one engine, and files an engine loss under it."""
    token = _EPISODE.set(key)
    try:
        yield
    finally:
        _EPISODE.reset(token)


@dataclass(frozen=True)
class WorkerSpec:
    """What an env worker builds its runner from (pickled to the actor)."""

    env: Any  # a registered env id, or a picklable zero-argument factory
    env_kwargs: Mapping[str, Any]
    tokenizer: Any
    sampling: SamplingParams
    limits: RolloutLimits
    concurrency: int
    seed: int
    template: str | None
    max_context: int
    setup: Sequence[str] = ()
    threads: int = 1


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode of a group: the runner's data position (``call``, task and sample index) and its task."""

    call: int
    task_index: int
    sample_index: int
    task: Task = field(default_factory=Task)

    @property
    def key(self) -> str:
        return f"{self.call}/{self.task_index}/{self.sample_index}"


@dataclass(frozen=True)
class Played:
    """An episode's outcome: its trajectory, or the infrastructure failure that ended it (then it is replayed)."""

    key: str
    trajectory: Trajectory
    infra: faults.Infra | None = None


class RemotePolicy:
    """A :class:`~agentrl.rollout.policy.Policy` whose requests go to the router, keyed by the episode."""

    name = "cluster"

    def __init__(self, router: Any, max_context: int):
        self.router, self.max_context = router, max_context
        self.version = 0
        self.lost: dict[str, faults.Infra] = {}  # episodes whose request found no engine

    async def generate(
        self, prompt: Sequence[int] | Sequence[Message], sampling: SamplingParams, *,
        tools: Sequence[ToolSchema] | None = None,
    ) -> Generation:  # fmt: skip
        import ray

        if prompt and not isinstance(prompt[0], int):
            raise ConfigError("cluster engines take token-id prompts; API models run in a single process")
        key = _EPISODE.get()
        try:
            generation: Generation = await self.router.generate.remote(key, list(prompt), sampling)
        except (faults.EngineUnavailable, ray.exceptions.RayActorError) as exc:
            self.lost[key] = faults.Infra.ENGINE_LOST
            raise faults.EngineUnavailable(str(exc).splitlines()[-1]) from None
        self.version = max(self.version, generation.policy_version)
        return generation

    async def update_weights(self, named_tensors: Any) -> None:
        raise ConfigError("an env worker's policy gets its weights through the engines, not update_weights")

    async def aclose(self) -> None:
        return None


class EnvWorker:
    """An actor playing episodes (see the module docstring).

    Args:
        spec: what to build the runner from.
        router: the router actor's handle.
    """

    def __init__(self, spec: WorkerSpec, router: Any):
        from agentrl.rollout.runner import Runner

        prepare_process(spec.setup, spec.threads)
        self.policy = RemotePolicy(router, spec.max_context)
        self.runner = Runner(
            spec.env, self.policy, spec.tokenizer, sampling=spec.sampling, limits=spec.limits,
            concurrency=spec.concurrency, seed=spec.seed, template=spec.template, env_kwargs=spec.env_kwargs,
        )  # fmt: skip
        self._clock = BusyClock()
        self._played = 0

    async def play(self, episode: EpisodeSpec) -> Played:
        """Play one episode; an infrastructure failure comes back typed in :attr:`Played.infra`."""
        token = _EPISODE.set(episode.key)
        self._clock.start()
        try:
            trajectory = await self.runner.play(
                episode.task,
                call=episode.call,
                task_index=episode.task_index,
                sample_index=episode.sample_index,
            )
        finally:
            self._clock.stop()
            _EPISODE.reset(token)
            self.policy.router.release.remote(episode.key)
        self._played += 1
        infra = self.policy.lost.pop(episode.key, None) or faults.classify(trajectory)
        return Played(episode.key, trajectory, infra)

    def stats(self) -> dict[str, float]:
        return {
            "busy_s": self._clock.busy_s,
            "played": float(self._played),
            "active": float(self._clock.active),
        }

    async def aclose(self) -> None:
        await self.runner.aclose()
