"""Learners: training loops that read top to bottom.

- ``sft``: supervised fine-tuning on demonstrations (the tool-format phase); ``rejection``: rejection-sampling
  SFT on the best sampled episodes;
- ``grpo`` (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, turn-level), ``ppo`` (actor-critic, GAE) and
  ``online_dpo``: online learners, each an ``update(step, groups)`` inside the one shell of ``loop``;
- ``dpo`` (DPO, IPO, robust, hinge, KTO, ORPO, SimPO) offline; ``spin`` and ``constitutional`` on top of it;
- ``reward_model``: Bradley–Terry outcome reward models and per-step process reward models (trained ones
  become rewards through :mod:`agentrl.rewards.learned`).

The pieces they share are public modules: ``config`` (the settings every learner has), ``optim`` (seeding,
AdamW, schedule, autocast, clipping), ``checkpoints``, ``policy_model`` (loading, LoRA, the reference),
``logprobs`` (the one logprob path), ``batching`` (the online learners' minibatches), ``rl`` (rollout
settings, filters, the step log) and ``result`` (the one ``TrainResult``).

Importing this package imports nothing heavy; import a learner module (``agentrl.learners.sft``) to train.
"""

__all__: list[str] = []
