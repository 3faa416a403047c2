"""The over-optimisation monitor of an RL run: a held-out "gold" score measured every few steps beside the
training reward, and a flag when they part ways.

The gold score comes from other tasks than the training ones (e.g. the env's ``eval`` split) played greedily
by the current policy, and from another scorer than the training reward: the env's verifier component when
the run trains on a judge or a reward model, a judge when it trains on a verifier, or any function of the
episodes. The proxy is the training reward's mean over the steps since the last measurement. When gold falls
from its best while the proxy holds its gain (:func:`~agentrl.rewards.monitors.overoptimisation`), the
policy is exploiting its reward.

Usage::

    monitor = GoldMonitor("code-sandbox", env_kwargs={"split": "eval"}, gold="component:correct", every=10)
    train_grpo(config, rescore=JudgeGroupReward(judge), monitor=monitor)
    monitor.divergence().diverged, monitor.points
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.rewards.monitors import Divergence, overoptimisation

__all__ = ["GoldMonitor", "GoldPoint", "gold_scorer"]

GoldFn = Callable[[Sequence[Trajectory]], float]
"""The gold score of a set of held-out episodes (higher is better)."""


@dataclass(frozen=True)
class GoldPoint:
    """One measurement: the step, the training reward's mean since the last one, and the gold score."""

    step: int
    proxy: float
    gold: float


def _component(name: str) -> GoldFn:
    def score(trajectories: Sequence[Trajectory]) -> float:
        values = [sum(float(t.reward_components.get(name, 0.0)) for t in e.turns) for e in trajectories]
        return sum(values) / len(values) if values else math.nan

    return score


def gold_scorer(gold: str | GoldFn) -> GoldFn:
    """``"reward"`` (the held-out env's total reward), ``"component:<name>"`` (one of its components, e.g.
    ``component:correct``) or a function of the episodes.

    Raises:
        ConfigError: another string.
    """
    if callable(gold):
        return gold
    if gold == "reward":
        return lambda ts: sum(t.total_reward for t in ts) / len(ts) if ts else math.nan
    if isinstance(gold, str) and gold.startswith("component:") and gold != "component:":
        return _component(gold.removeprefix("component:"))
    raise ConfigError(
        f"gold must be 'reward', 'component:<name>' or a function of the episodes, got {gold!r}"
    )


class GoldMonitor:
    """After step 1 (a baseline near the starting policy) and every ``every`` RL steps, plays ``tasks``
    held-out tasks and scores them with ``gold``.

    Pass it as ``monitor=`` to :func:`~agentrl.learners.grpo.train_grpo`; each measuring step's log gets
    ``monitors``: ``gold``, ``gold_proxy``, ``gold_drop``, ``proxy_gain`` and ``overoptimised`` (1.0 once the
    two diverged). The same ``tasks`` are played at every measurement.

    Args:
        env / env_kwargs: the held-out env (e.g. the training env with its eval split).
        gold: see :func:`gold_scorer`. every: steps between measurements. tasks: held-out tasks played.
        task_option: the env's reset option naming a task by index (task i is then always the same task);
            None plays the tasks of fixed reset seeds.
        max_new_tokens / max_turns / template: how episodes are played.
        temperature: 0 plays greedily; above 0 samples with the same seeds at every measurement (for a
            model whose greedy answers say little yet).
        tolerance / patience: see :func:`~agentrl.rewards.monitors.overoptimisation`.
        echo: called with a line when the divergence is first flagged (e.g. ``print``).
    """

    def __init__(self, env: str, *, env_kwargs: Mapping[str, Any] | None = None, gold: str | GoldFn = "reward",
                 every: int = 10, tasks: int = 32, task_option: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, max_turns: int | None = None, template: str | None = None, tolerance: float = 0.05,
                 patience: int = 2, seed: int = 4242, echo: Callable[[str], None] | None = None):  # fmt: skip
        if every < 1 or tasks < 1 or max_new_tokens < 1:
            raise ConfigError(
                f"every, tasks and max_new_tokens must be >= 1, got {every}, {tasks}, {max_new_tokens}"
            )
        self.env, self.env_kwargs, self.score = env, dict(env_kwargs or {}), gold_scorer(gold)
        self.gold_name = gold if isinstance(gold, str) else getattr(gold, "__name__", "gold")
        self.every, self.tasks, self.task_option = every, tasks, task_option
        self.max_new_tokens, self.max_turns, self.template = max_new_tokens, max_turns, template
        self.temperature = temperature
        self.tolerance, self.patience, self.seed, self.echo = tolerance, patience, seed, echo
        self.points: list[GoldPoint] = []
        self._proxy: list[float] = []
        self._warned = False

    def divergence(self) -> Divergence | None:
        """The over-optimisation check over the points so far (None before the first)."""
        if not self.points:
            return None
        return overoptimisation([p.proxy for p in self.points], [p.gold for p in self.points], self.tolerance,
                                self.patience)  # fmt: skip

    async def __call__(self, log: Any, model: Any, tokenizer: Any) -> dict[str, float]:
        """Record the step's training reward; on a measuring step, measure gold and check for divergence."""
        self._proxy.append(float(log.reward_mean))
        if log.step % self.every and log.step != 1:  # step 1 too: a baseline near the starting policy
            return {}
        gold = await self.measure(model, tokenizer)
        self.points.append(GoldPoint(int(log.step), sum(self._proxy) / len(self._proxy), gold))
        self._proxy = []
        check = self.divergence()
        assert check is not None
        if check.diverged and not self._warned and self.echo is not None:
            self._warned = True
            start = self.points[check.diverged_at or 0].step
            self.echo(f"over-optimisation: held-out {self.gold_name} fell {check.gold_drop:.3f} from its best "
                      f"(step {self.points[check.best].step}) while the training reward rose "
                      f"{check.proxy_gain:+.3f}, since step {start}")  # fmt: skip
        return {"gold": gold, "gold_proxy": self.points[-1].proxy, "gold_drop": check.gold_drop,
                "proxy_gain": check.proxy_gain, "overoptimised": float(check.diverged)}  # fmt: skip

    async def measure(self, model: Any, tokenizer: Any) -> float:
        """The gold score of the held-out tasks played by ``model`` (left in eval mode)."""
        from agentrl.rollout.hf import HFPolicy
        from agentrl.rollout.policy import SamplingParams
        from agentrl.rollout.runner import RolloutLimits, Runner, Task, derive_seed

        model.eval()
        policy = HFPolicy(model, tokenizer, device=next(model.parameters()).device, max_batch=self.tasks)
        runner = Runner(self.env, policy, tokenizer, sampling=SamplingParams(self.max_new_tokens, self.temperature),
                        limits=RolloutLimits(max_turns=self.max_turns), seed=self.seed, template=self.template,
                        env_kwargs=self.env_kwargs, concurrency=self.tasks)  # fmt: skip
        tasks = [
            Task(
                derive_seed(self.seed, 0, i), {self.task_option: i} if self.task_option else None, f"gold-{i}"
            )
            for i in range(self.tasks)
        ]
        try:
            groups = await runner.run(tasks, 1)
        finally:
            await runner.aclose()
            await policy.aclose()
        return float(self.score([t for g in groups for t in g]))
