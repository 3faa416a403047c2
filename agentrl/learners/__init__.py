"""Learners: training loops that read top to bottom (SFT now; GRPO and PPO reuse :mod:`._train`).

Importing this package imports nothing heavy; import a learner module (``agentrl.learners.sft``) to train.
"""

__all__: list[str] = []
