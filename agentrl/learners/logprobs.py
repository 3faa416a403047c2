"""The learner's view of a batch of ledgers: per-token logprobs (and entropies) of the policy's own tokens.

The one function every RL and preference loop calls to score a collated batch
(:func:`agentrl.data.buffer.collate`) under the model being trained; public for loops written outside the
library, e.g. ``examples/grpo_math.py``.
"""

from __future__ import annotations

from agentrl.learners._model import policy_logprobs

__all__ = ["policy_logprobs"]
