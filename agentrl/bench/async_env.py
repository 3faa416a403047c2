"""``bench-latency-v0``: a multi-turn env whose tool answers take a long-tailed time, for ``agentrl bench async``
and the cluster tests. Importing this module registers it (name it in ``cluster.setup`` so env workers do too).

Each turn, the "tool" answers after a lognormal delay (median ``p50_s``, 99th percentile ``p99_s``, drawn from
the episode's seed, so a replayed episode waits as long); the reward is the share of the reply's characters
that are digits, split over ``turns`` turns (the tiny model earns a little of it at once and learns more).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import agentrl
from agentrl.core import Env, ResetResult, StepResult
from agentrl.types import Message

__all__ = ["ENV_ID", "LatencyEnv", "lognormal_sigma"]

ENV_ID = "bench-latency-v0"
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


def lognormal_sigma(p50_s: float, p99_s: float) -> float:
    """The lognormal's sigma whose median is ``p50_s`` and 99th percentile ``p99_s``."""
    return math.log(p99_s / p50_s) / _Z99


class LatencyEnv(Env):
    """Reply with digits for ``turns`` turns; every answer arrives after a lognormal tool latency."""

    description = "Reply with digits over several turns; tool answers take lognormal time (bench)"

    def __init__(self, turns: int = 3, p50_s: float = 0.05, p99_s: float = 2.0):
        self.turns = turns
        self.max_turns: int = turns
        self.p50_s, self.sigma = p50_s, lognormal_sigma(p50_s, p99_s)
        self._turn = 0

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        self._turn = 0
        return ResetResult([{"role": "user", "content": "Write digits."}], {})

    async def astep(self, action: str) -> StepResult:
        await asyncio.sleep(self.p50_s * math.exp(self.sigma * float(self.np_random.standard_normal())))
        text = action.strip()
        share = sum(c.isdigit() for c in text) / len(text) if text else 0.0
        self._turn += 1
        done = self._turn >= self.turns
        answer: list[Message] = [] if done else [{"role": "user", "content": "More digits."}]
        return StepResult(answer, share / self.turns, done, False, {"reward_components": {"digits": share}})


agentrl.register(ENV_ID, LatencyEnv, override=True, description=LatencyEnv.description)
