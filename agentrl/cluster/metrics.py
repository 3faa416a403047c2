"""Per-step figures of a cluster run (the step log's ``cluster`` mapping, ``cluster/<name>`` in metrics.jsonl).

- ``staleness/<k>``: trained samples whose oldest turn is ``k`` weight versions behind the learner;
  ``staleness_max``, ``staleness_mean``;
- ``engine_busy`` / ``worker_busy``: the share of the step's wall time an engine (an env worker) had at least
  one request (episode) in flight, averaged over the actors;
- ``queue/episodes``: episodes submitted and not yet back; ``queue/requests``: generation requests at the
  engines; ``queue/groups_ready``: finished groups waiting for the learner;
- ``episodes_per_s``, ``learner_idle``: the share of the step the learner waited for data;
- ``sampled/<x>`` and ``trained/<x>`` for ``x`` in ``length`` (sampled tokens), ``turns``, ``reward``: means
  over every episode that came back during the step and over those the update trained on; their gap is the
  bias the asynchronous mode brings (slow, long episodes come back late);
- the fault counters since the start: ``worker_lost``, ``engine_lost`` and ``engine_timeout`` (generation
  requests, retried on another engine), ``engine_unavailable`` (episodes whose requests found no engine),
  ``sandbox_lost``, ``replayed``, ``lost`` (given up after the replays), ``dropped_groups`` (the dropping mode).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from agentrl.data.trajectory import Trajectory

__all__ = ["BusyClock", "busy_share", "distribution", "staleness", "staleness_histogram"]


class BusyClock:
    """Wall time with at least one job in flight (an actor's busy time), read as a running total."""

    def __init__(self) -> None:
        self.active = 0
        self._since = 0.0
        self._busy = 0.0

    def start(self) -> None:
        if self.active == 0:
            self._since = time.monotonic()
        self.active += 1

    def stop(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._busy += time.monotonic() - self._since

    @property
    def busy_s(self) -> float:
        """Busy seconds so far, the current busy stretch included."""
        return self._busy + (time.monotonic() - self._since if self.active else 0.0)


def staleness(trajectory: Trajectory, version: int) -> int:
    """How many weight versions the oldest turn of ``trajectory`` is behind ``version`` (the learner's)."""
    return version - min(trajectory.turn_versions, default=trajectory.policy_version)


def staleness_histogram(trajectories: Iterable[Trajectory], version: int) -> dict[str, float]:
    """``staleness/<k>`` counts, ``staleness_max`` and ``staleness_mean`` of ``trajectories`` at ``version``."""
    values = [staleness(t, version) for t in trajectories]
    out: dict[str, float] = {f"staleness/{k}": float(n) for k, n in sorted(Counter(values).items())}
    out["staleness_max"] = float(max(values, default=0))
    out["staleness_mean"] = sum(values) / len(values) if values else 0.0
    return out


def distribution(prefix: str, trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Mean sampled length, turns and reward of ``trajectories`` as ``<prefix>/length`` etc. (empty: none)."""
    if not trajectories:
        return {}
    n = len(trajectories)
    return {
        f"{prefix}/length": sum(t.num_sampled for t in trajectories) / n,
        f"{prefix}/turns": sum(len(t.turns) for t in trajectories) / n,
        f"{prefix}/reward": sum(t.total_reward for t in trajectories) / n,
    }


def busy_share(busy_s: Mapping[int, float], before: Mapping[int, float], seconds: float) -> float:
    """Mean share of ``seconds`` the actors were busy, from their busy totals now and at the last reading."""
    if not busy_s or seconds <= 0:
        return 0.0
    shares = [min(1.0, max(0.0, busy_s[i] - before.get(i, 0.0)) / seconds) for i in busy_s]
    return sum(shares) / len(shares)
