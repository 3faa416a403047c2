"""Learners: training loops that read top to bottom.

- ``sft``: supervised fine-tuning on demonstrations (the tool-format phase); ``rejection``: rejection-sampling
  SFT on the best sampled episodes;
- ``grpo`` (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, turn-level) and ``ppo`` (actor-critic, GAE): online RL;
- ``dpo`` (DPO, IPO, robust, hinge, KTO, ORPO, SimPO) offline, ``online_dpo`` online and iterative;
- ``reward_model``: Bradley–Terry outcome reward models and per-step process reward models (trained ones
  become rewards through :mod:`agentrl.rewards.learned`).

Importing this package imports nothing heavy; import a learner module (``agentrl.learners.sft``) to train.
"""

__all__: list[str] = []
