"""LLM judges (RLAIF): pointwise scores and pairwise preferences from any policy backend, as rewards, group
scorers and preference labels. See :mod:`agentrl.judge.judge` and :mod:`agentrl.judge.rewards`."""

from __future__ import annotations

from agentrl.judge.config import JudgeConfig, load_judge_config
from agentrl.judge.judge import Judge, JudgeCache, PairVerdict, Verdict
from agentrl.judge.rewards import (
    JudgeGroupReward,
    JudgeReward,
    JudgeScorer,
    LabelledPairs,
    candidate_pairs,
    conversation_item,
    episode_item,
    label_pairs,
)

__all__ = [
    "Judge",
    "JudgeCache",
    "JudgeConfig",
    "JudgeGroupReward",
    "JudgeReward",
    "JudgeScorer",
    "LabelledPairs",
    "PairVerdict",
    "Verdict",
    "candidate_pairs",
    "conversation_item",
    "episode_item",
    "label_pairs",
    "load_judge_config",
]
