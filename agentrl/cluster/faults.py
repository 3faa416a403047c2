"""Failures of the infrastructure, as opposed to the policy's: typed, counted, replayed, never a reward of 0."""

from __future__ import annotations

import enum

from agentrl.data.trajectory import Trajectory
from agentrl.errors import AgentRLError
from agentrl.types import StopReason

__all__ = ["EngineUnavailable", "Infra", "classify"]


class Infra(str, enum.Enum):
    """Why an episode was lost to the infrastructure (it is replayed, and counted under this name)."""

    WORKER_LOST = "worker_lost"
    """The env-worker actor playing it died."""
    ENGINE_LOST = "engine_lost"
    """Every engine its request was tried on died or timed out."""
    SANDBOX_LOST = "sandbox_lost"
    """The env's sandbox failed or was lost under it (``SandboxError``)."""


class EngineUnavailable(AgentRLError, RuntimeError):
    """A generation request failed on every engine it was tried on (each died or timed out)."""


_INFRA_ERRORS = {"SandboxError": Infra.SANDBOX_LOST, "EngineUnavailable": Infra.ENGINE_LOST}
"""Exception names in a trajectory's ``error`` (``"Type: message"``) that are the infrastructure's doing."""


def classify(trajectory: Trajectory) -> Infra | None:
    """The infrastructure failure that ended ``trajectory``, or None when it ended by the policy's or the env's
    doing (an ordinary trajectory, kept as data)."""
    if trajectory.stop_reason is not StopReason.ERROR or not trajectory.error:
        return None
    head = trajectory.error.split(":", 1)[0]  # the type, possibly wrapped: "RayTaskError(EngineUnavailable)"
    return next((kind for name, kind in _INFRA_ERRORS.items() if name in head), None)
