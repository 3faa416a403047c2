"""Learners: training loops that read top to bottom: ``sft``, ``grpo``, ``ppo`` and ``dpo`` (DPO, IPO, KTO, ORPO, SimPO).

Importing this package imports nothing heavy; import a learner module (``agentrl.learners.sft``) to train.
"""

__all__: list[str] = []
