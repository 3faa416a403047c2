"""Generation engines (a policy backend inside a Ray actor) and the router that spreads requests over them.

An :class:`Engine` serves ``generate`` requests concurrently (its backend batches them) and switches weights
between requests: :meth:`Engine.load` waits for the requests in flight, holds new ones back, loads, and tags
every later generation with the new version. A restarted engine has no version (-1) until the router loads
the latest weights into it, which it does before sending it a request.

The :class:`Router` sends an episode's first request to the engine with the fewest outstanding requests and
its later ones to the same engine (its prefix cache holds the conversation). A request whose engine dies or
times out is replayed on another (``request_retries`` times), and the episode is re-pinned there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from agentrl.cluster.faults import EngineUnavailable
from agentrl.cluster.metrics import BusyClock
from agentrl.rollout.policy import Generation, SamplingParams

__all__ = ["Engine", "Router", "prepare_process"]


def prepare_process(setup: Sequence[str], threads: int) -> None:
    """What every actor process does first: torch's thread count, then the user's ``setup`` modules (where
    their envs register themselves)."""
    import torch

    torch.set_num_threads(threads)
    for module in setup:
        importlib.import_module(module)


class _Gate:
    """Requests share the engine; a weight switch waits until none is in flight and holds new ones back."""

    def __init__(self) -> None:
        self._active = 0
        self._switching = False
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._switching)
            self._active += 1
        try:
            yield
        finally:
            async with cond:
                self._active -= 1
                cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._switching)
            self._switching = True
            await cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            async with cond:
                self._switching = False
                cond.notify_all()


class Engine:
    """A policy backend (``hf`` or ``vllm``) as an actor.

    Args:
        backend: the registered backend name.
        options: its keyword arguments (``model`` included).
        setup / threads: see :func:`prepare_process`.
    """

    def __init__(self, backend: str, options: Mapping[str, Any], setup: Sequence[str] = (), threads: int = 1):
        from agentrl.rollout.policy import make_policy

        prepare_process(setup, threads)
        self.policy = make_policy(backend, **dict(options))
        self.version = -1  # no weights from the learner yet
        self._gate = _Gate()
        self._clock = BusyClock()
        self._requests = 0

    def max_context(self) -> int:
        return int(self.policy.max_context)

    async def generate(self, prompt: list[int], sampling: SamplingParams) -> Generation:
        """Sample one continuation with the weights of :attr:`version` (never switched inside it)."""
        async with self._gate.shared():
            self._clock.start()
            try:
                generation = await self.policy.generate(prompt, sampling)
            finally:
                self._clock.stop()
            self._requests += 1
            return dataclasses.replace(generation, policy_version=self.version)

    async def score(self, sequences: list[list[int]]) -> list[list[float]] | None:
        """The backend's per-token logprobs of ``sequences`` under the weights of :attr:`version`; None for a
        backend that cannot score."""
        scorer = getattr(self.policy, "score", None)
        if scorer is None:
            return None
        async with self._gate.shared():
            return list(await scorer(sequences))

    async def load(self, weights: Mapping[str, Any], version: int) -> int:
        """Switch to ``weights`` (name -> tensor) between requests; later generations carry ``version``."""
        async with self._gate.exclusive():
            await self.policy.update_weights(list(weights.items()))
            self.version = version
        return version

    def stats(self) -> dict[str, float]:
        return {
            "busy_s": self._clock.busy_s,
            "requests": float(self._requests),
            "active": float(self._clock.active),
        }


class Router:
    """Routes generation requests to engines and keeps their weights current (see the module docstring).

    Args:
        engines: the engine actor handles.
        request_retries: engines a request is tried on after its first fails.
        timeout_s: seconds one request may take before it counts as an engine timeout.
    """

    def __init__(self, engines: Sequence[Any], request_retries: int = 3, timeout_s: float = 120.0):
        self.engines = list(engines)
        self.request_retries, self.timeout_s = request_retries, timeout_s
        self.outstanding = [0] * len(self.engines)
        self.versions = [-1] * len(self.engines)  # what each engine holds (-1: unknown, e.g. restarted)
        self.weights: Any = None  # the latest weights' ObjectRef
        self.version = -1
        self.pinned: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self._locks: list[asyncio.Lock] | None = None

    async def set_weights(self, weights: list[Any], version: int) -> int:
        """Make ``weights[0]`` (an ObjectRef, wrapped so it is not fetched here) version ``version`` and load it
        into every live engine; a dead engine gets it when it is next used."""
        self.weights, self.version = weights[0], version
        await asyncio.gather(*(self._current(i) for i in range(len(self.engines))), return_exceptions=True)
        return version

    async def generate(self, key: str, prompt: list[int], sampling: SamplingParams) -> Generation:
        """Sample for episode ``key`` on its engine; replayed on another when that one dies or times out.

        Raises:
            EngineUnavailable: every try failed.
        """
        import ray

        failed: list[int] = []
        for _ in range(self.request_retries + 1):
            i = self._pick(key, failed)
            self.outstanding[i] += 1
            try:
                await self._current(i)
                return await asyncio.wait_for(
                    self.engines[i].generate.remote(prompt, sampling), self.timeout_s
                )
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
                lost = isinstance(exc, ray.exceptions.RayActorError)
                self.counts["engine_lost" if lost else "engine_timeout"] += 1
                self.versions[i] = -1
                self.pinned.pop(key, None)
                failed.append(i)
            finally:
                self.outstanding[i] -= 1
        raise EngineUnavailable(f"no engine answered episode {key!r}: tried {len(failed)} times ({failed})")

    async def score_engines(self, sequences: list[list[int]]) -> list[list[list[float]] | None]:
        """Every engine's scoring of ``sequences`` with the latest weights (the identity check after a sync);
        None for an engine whose backend cannot score, and for one that is dead or restarting (it gets the
        latest weights before it serves again, and the next check scores it)."""
        import ray

        async def one(i: int) -> list[list[float]] | None:
            try:
                await self._current(i)
                return await asyncio.wait_for(self.engines[i].score.remote(sequences), self.timeout_s)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                self.versions[i] = -1
                return None

        return list(await asyncio.gather(*(one(i) for i in range(len(self.engines)))))

    def release(self, key: str) -> None:
        """The episode ended: forget its engine."""
        self.pinned.pop(key, None)

    def stats(self) -> dict[str, Any]:
        return {"outstanding": sum(self.outstanding), "pinned": len(self.pinned), **self.counts}

    def _pick(self, key: str, failed: Sequence[int]) -> int:
        pinned = self.pinned.get(key)
        if pinned is not None and pinned not in failed:
            return pinned
        candidates = [i for i in range(len(self.engines)) if i not in failed] or list(
            range(len(self.engines))
        )
        choice = min(candidates, key=lambda i: (self.outstanding[i], i))
        self.pinned[key] = choice
        return choice

    async def _current(self, i: int) -> None:
        """Load the latest weights into engine ``i`` unless it holds them (one load at a time per engine)."""
        if self._locks is None:
            self._locks = [asyncio.Lock() for _ in self.engines]
        async with self._locks[i]:
            if self.weights is not None and self.versions[i] != self.version:
                self.versions[i] = -1
                self.versions[i] = await self.engines[i].load.remote(self.weights, self.version)
