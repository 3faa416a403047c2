"""Rewards: named, weighted components; outcome (ORM) and process (PRM) protocols; reward-hacking monitors.

Importing this package is cheap. The math verifier lives in :mod:`agentrl.rewards.math` (it starts worker
processes and imports math-verify only when first used); trained reward models in :mod:`agentrl.rewards.learned`.
"""

from agentrl.rewards.base import (
    OutcomeReward,
    ProcessReward,
    RewardFn,
    RewardResult,
    RewardSpec,
    WeightedReward,
    compose,
    parse_weights,
)

__all__ = [
    "OutcomeReward",
    "ProcessReward",
    "RewardFn",
    "RewardResult",
    "RewardSpec",
    "WeightedReward",
    "compose",
    "parse_weights",
]
