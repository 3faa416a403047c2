"""The cluster settings of a run: where Ray runs, how many env workers and generation engines, what each needs.

A learner config's ``cluster`` field holds one :class:`ClusterConfig` (None: the single-process path, which
imports no Ray). ``learner.max_staleness`` (on :class:`~agentrl.learners.rl.RolloutConfig`) turns on the
asynchronous mode; :attr:`ClusterConfig.admission` says how its bound is kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agentrl.learners.config import StrictConfig

__all__ = ["ClusterConfig"]


class ClusterConfig(StrictConfig):
    """Ray placement of a run's rollouts: env workers (envs, sandboxes, the episode loop) and generation engines.

    ``address`` None starts a local Ray instance with ``num_cpus`` (stopped at the end of the run); an address
    (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``) joins an existing cluster and leaves it running.
    """

    env_workers: int = Field(
        2, ge=1, description="env-worker actors, each playing many episodes at once, e.g. 2"
    )
    engines: int = Field(
        1, ge=1, description="generation-engine actors (one per GPU on a GPU cluster), e.g. 1"
    )
    address: str | None = Field(
        None, description="Ray address to join ('auto', 'ray://head:10001'); None starts a local instance"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance; None: Ray's count")
    object_store_mb: int | None = Field(
        None,
        ge=64,
        description="object store of a local instance in MiB (weights travel through it); None: Ray's",
    )
    worker_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved per env worker (0: placed anywhere), e.g. 1"
    )
    engine_cpus: float = Field(0.0, ge=0, description="CPUs reserved per engine (0: placed anywhere), e.g. 1")
    engine_gpus: float = Field(0.0, ge=0, description="GPUs per engine, e.g. 1 on a GPU cluster")
    engine_device: str = Field(
        "cpu", description="torch device inside an engine, e.g. 'cuda' with engine_gpus 1"
    )
    episodes_per_worker: int = Field(64, ge=1, description="episodes one env worker plays at once, e.g. 64")
    admission: Literal["pace", "drop"] = Field(
        "pace",
        description="async bound: 'pace' starts an episode only when it will be trained within max_staleness; "
        "'drop' starts freely and drops groups that come back staler",
    )
    episode_retries: int = Field(
        2, ge=0, description="replays of an episode lost to the infrastructure before it is counted as lost"
    )
    request_retries: int = Field(
        3, ge=0, description="engines a generation request is retried on after a loss"
    )
    engine_timeout_s: float = Field(120.0, gt=0, description="seconds one generation request may take")
    threads: int = Field(1, ge=1, description="torch threads per actor process, e.g. 1 on a shared CPU")
    setup: list[str] = Field(
        default_factory=list,
        description="modules every actor imports first (where your envs register themselves), e.g. ['my_pkg.envs']",
    )
