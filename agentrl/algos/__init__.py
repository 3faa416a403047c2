"""The learners' math: advantage estimators (:mod:`agentrl.algos.advantages`) and losses
(:mod:`agentrl.algos.losses`), small pure functions over tensors named by dimension.

Importing this package does not import torch; each function imports it when called.
"""

from agentrl.algos.advantages import (
    batch_normalize,
    discounted_returns,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_to_tokens,
    turn_advantages,
    turn_index_from_mask,
    turn_returns,
    turn_rewards_from_trajectories,
    turn_values_to_tokens,
)
from agentrl.algos.losses import (
    AGGREGATIONS,
    AdaptiveKLController,
    Aggregation,
    PolicyLoss,
    aggregate,
    entropy_from_logits,
    kl_estimate,
    kl_penalized_rewards,
    policy_loss,
    ppo_clip_loss,
    sft_nll_loss,
    token_logprobs,
    truncated_is_weights,
    value_loss,
)

__all__ = [
    "AGGREGATIONS",
    "AdaptiveKLController",
    "Aggregation",
    "PolicyLoss",
    "aggregate",
    "batch_normalize",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "policy_loss",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_to_tokens",
    "sft_nll_loss",
    "token_logprobs",
    "truncated_is_weights",
    "turn_advantages",
    "turn_index_from_mask",
    "turn_returns",
    "turn_rewards_from_trajectories",
    "turn_values_to_tokens",
    "value_loss",
]
