"""What the online learners (GRPO, PPO, online DPO) share: the rollout settings, the rollout backend with its
weight sync, the group filters, and the step log.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from agentrl.algos import Aggregation
from agentrl.cluster.config import ClusterConfig
from agentrl.data.buffer import TrajectoryBuffer, TrajectoryGroup, drop_zero_variance
from agentrl.data.trajectory import Trajectory
from agentrl.learners.config import TrainConfig
from agentrl.learners.policy_model import export_weights
from agentrl.rollout.policy import SamplingParams
from agentrl.rollout.runner import RolloutLimits, Runner
from agentrl.types import DEFAULT_DEADLINE_S, StopReason

__all__ = [
    "ASYNC_TIS_CAP",
    "RLConfig",
    "RLStepLog",
    "RolloutConfig",
    "filter_groups",
    "make_runner",
    "step_log",
    "stops_here",
    "sync_weights",
]



ASYNC_TIS_CAP = 2.0
"""The truncated-IS cap the asynchronous mode uses when ``tis_cap`` is not set."""


class RolloutConfig(TrainConfig):
    """What a learner that samples its own data plays: the env, the sampling and the rollout backend."""

    env: str = Field(
        ..., description="registered env id to play, e.g. 'code-sandbox-v0' (see `agentrl envs`)"
    )
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for agentrl.make")
    prompts_per_step: int = Field(8, ge=1, description="tasks played per step, e.g. 8")
    group_size: int = Field(8, ge=1, description="samples per task (G), e.g. 8")
    max_new_tokens: int = Field(64, ge=1, description="the most tokens sampled per turn, e.g. 64")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature; logprobs are taken at the same one (on-policy)"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1.0 = off)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    max_turns: int | None = Field(None, ge=1, description="assistant turns per episode; None: the env's")
    max_sampled_tokens: int | None = Field(None, ge=1, description="sampled tokens per episode; None: no cap")
    max_context: int | None = Field(None, ge=2, description="tokens per episode; None: the model's window")
    episode_deadline_s: float | None = Field(
        DEFAULT_DEADLINE_S, gt=0,
        description="wall-clock seconds per episode (a hung env ends its episode, not the run), or None",
    )  # fmt: skip
    rollout: Literal["hf", "vllm"] = Field(
        "hf",
        description="sampler: 'hf' (the learner's own module, no copy) or 'vllm' (weights synced each step)",
    )
    rollout_options: dict[str, Any] = Field(
        default_factory=dict, description="extra options for the rollout backend, e.g. {'max_batch': 128}"
    )
    concurrency: int = Field(256, ge=1, description="episodes in flight at once")
    history: Literal["append", "keep_reasoning", "turn_split"] = Field(
        "append", description="how earlier turns reach the next prompt: 'append' (one ledger; the template must be "
        "prefix-stable), 'keep_reasoning' (one ledger, earlier reasoning kept; Qwen3-style templates) or "
        "'turn_split' (each turn its own sample under the native template, e.g. for thinking models)",
    )
    tool_format: str | None = Field(
        None, description="tool-call markup, e.g. 'hermes', 'llama3_json', 'mistral', 'qwen3_coder', 'harmony'; "
        "None: detected from the tokenizer",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="stop (and checkpoint) after the step that ends this many seconds into this "
        "session's loop, e.g. 540; the schedule still spans max_steps. None: run all max_steps",
    )

    cluster: ClusterConfig | None = Field(
        None, description="play the rollouts on Ray (env workers, generation engines); None: in this process"
    )
    max_staleness: int | None = Field(
        None, ge=0,
        description="asynchronous mode (needs a cluster): sampling goes on during updates and a trained sample "
        "is at most this many weight versions old, e.g. 1; truncated IS (tis_cap, 2.0 unless set) is on. "
        "None: synchronous",
    )  # fmt: skip

    sync_check: bool = Field(
        True,
        description="after each weight sync, score a fixed probe on the rollout engines and the learner and stop "
        "if they differ (see agentrl.learners.sync_check); backends sharing the learner's model are not checked",
    )
    sync_check_tolerance: float | None = Field(
        None, gt=0,
        description="the largest mean |logprob gap| per probe token, e.g. 2e-4; None: 2e-4 in fp32, 5e-2 in bf16",
    )  # fmt: skip

    @model_validator(mode="after")
    def _async_on_a_cluster(self) -> RolloutConfig:
        if self.max_staleness is not None and self.cluster is None:
            raise ValueError(
                f"max_staleness={self.max_staleness} is the asynchronous mode, which runs on a cluster: set "
                "cluster (e.g. --set cluster.env_workers=2), or drop max_staleness"
            )
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


class RLConfig(RolloutConfig):
    """Filtering and update settings shared by the online policy-gradient learners (GRPO, PPO)."""

    lr: float = Field(2e-4, gt=0, le=1, description="peak AdamW learning rate, e.g. 2e-4 tiny, 1e-6 for 7B")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas, each in [0, 1)")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up optimizer steps, e.g. 5")
    dynamic_sampling: bool = Field(
        False, description="drop groups whose rewards all agree (DAPO); they carry no group-relative signal"
    )
    overlong: Literal["keep", "filter", "soft"] = Field(
        "keep",
        description="samples cut by a length limit: 'keep', 'filter' (no loss) or 'soft' (DAPO penalty)",
    )
    overlong_cache: int = Field(
        16, ge=0, description="'soft': tokens before the limit where the penalty ramps"
    )
    mu: int = Field(1, ge=1, description="passes over each rollout batch (PPO epochs, GRPO's mu), e.g. 1")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass (the batch split evenly), e.g. 1")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="trajectories per forward (gradient accumulation), or None for the whole minibatch",
    )
    packing: bool = Field(True, description="pack several trajectories per row (no padding) in the update")
    share_prompt: bool = Field(
        True,
        description="compute each distinct prompt once per forward (a row per prompt: samples attend to it)",
    )
    eps_low: float = Field(0.2, ge=0, description="PPO clip below 1, e.g. 0.2")
    eps_high: float | None = Field(
        None, ge=0, description="clip above 1 (clip-higher, e.g. 0.28); None: eps_low"
    )
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip bound c > 1 for negative advantages, or None"
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="truncated importance sampling cap for sampler/learner mismatch, e.g. 2.0; None: off",
    )
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus weight, e.g. 0.0 or 1e-3")
    aggregation: Aggregation = Field(
        "token-mean",
        description="loss reduction: 'token-mean' (DAPO), 'seq-mean-token-mean' (GRPO), "
        "'seq-mean-token-sum-norm' (Dr. GRPO)",
    )

    @model_validator(mode="before")
    @classmethod
    def _async_corrects(cls, data: Any) -> Any:
        """Async samples come from older weights: truncated IS against the sampler's logprobs is always on."""
        if isinstance(data, dict) and data.get("max_staleness") is not None and data.get("tis_cap") is None:
            return {**data, "tis_cap": ASYNC_TIS_CAP}
        return data

    @model_validator(mode="after")
    def _rl_consistent(self) -> RLConfig:
        if self.minibatches > self.prompts_per_step * self.group_size:
            raise ValueError(
                f"minibatches ({self.minibatches}) exceeds the {self.prompts_per_step * self.group_size} samples "
                "per step; lower minibatches or raise prompts_per_step / group_size"
            )
        return self

    @property
    def updates_per_step(self) -> int:
        return self.mu * self.minibatches

    @property
    def max_episode_tokens(self) -> int:
        """Sampled tokens one episode can have: the Dr. GRPO loss constant."""
        return self.max_sampled_tokens or self.max_new_tokens * (self.max_turns or 1)


# ---- rollout ------------------------------------------------------------------------------------
def make_runner(config: RolloutConfig, model: Any, tokenizer: Any) -> Runner:
    """The runner for ``config.env`` with its rollout backend: ``hf`` samples with ``model`` itself (same
    module: a weight sync moves nothing), ``vllm`` loads ``config.model`` and gets weights each sync."""
    from agentrl.rollout.policy import make_policy

    options = dict(config.rollout_options)
    if config.rollout == "hf":
        options.setdefault("max_batch", config.prompts_per_step * config.group_size)
        policy = make_policy("hf", model=model, tokenizer=tokenizer, device=config.device, seed=config.seed,
                             **options)  # fmt: skip
    else:
        options.setdefault("model", config.model)  # e.g. a merged or converted copy for the engine to load
        policy = make_policy("vllm", seed=config.seed, **options)
    limits = RolloutLimits(
        max_turns=config.max_turns, max_sampled_tokens=config.max_sampled_tokens,
        max_context=config.max_context, deadline_s=config.episode_deadline_s,
    )  # fmt: skip
    return Runner(
        config.env, policy, tokenizer, sampling=config.sampling, limits=limits, concurrency=config.concurrency,
        seed=config.seed, template=config.template, env_kwargs=config.env_kwargs, history=config.history,
        tool_format=config.tool_format,
    )  # fmt: skip


def stops_here(config: RolloutConfig, step: int, loop_started: float) -> bool:
    """Whether the loop ends after ``step``: ``max_steps`` reached, or ``max_seconds`` spent since
    ``loop_started`` (a ``time.perf_counter()`` reading)."""
    over_time = config.max_seconds is not None and time.perf_counter() - loop_started >= config.max_seconds
    return step >= config.max_steps or over_time


async def sync_weights(
    runner: Runner, model: Any, config: RolloutConfig | None = None, probe: Sequence[Sequence[int]] = ()
) -> dict[str, float]:
    """Hand the learner's weights to the sampler and bump its version (nothing to copy when it shares them),
    then, given a ``probe`` (:func:`~agentrl.learners.sync_check.probe_sequences`) and unless
    ``config.sync_check`` is off, check that the sampler scores it like the learner
    (:mod:`agentrl.learners.sync_check`).

    Returns:
        The check's figures (``sync_gap``, ``sync_gap_max``, ``sync_check_s``), or {} where none ran.

    Raises:
        WeightSyncError: the sampler does not hold the learner's weights after the sync.
    """
    shared = getattr(runner.policy, "model", None) is model
    await runner.policy.update_weights(() if shared else export_weights(model))
    return {} if shared or config is None else await check_weights(runner, model, config, probe)


async def check_weights(
    runner: Runner, model: Any, config: RolloutConfig, probe: Sequence[Sequence[int]]
) -> dict[str, float]:
    """The identity check alone (see :func:`sync_weights`); {} when ``config.sync_check`` is off, the probe is
    empty, or the sampler cannot score.

    Raises:
        WeightSyncError: the sampler does not hold the learner's weights.
    """
    policy = runner.policy
    if not probe or not config.sync_check or getattr(policy, "model", None) is model:
        return {}
    from agentrl.learners import sync_check

    tolerance = config.sync_check_tolerance or sync_check.default_tolerance(
        config.precision, config.rollout_options.get("dtype"))  # fmt: skip
    outcome = await sync_check.check_sync(policy, model, probe, tolerance, policy.version)
    return {} if outcome is None else outcome.as_stats()


# ---- filters ------------------------------------------------------------------------------------
def filter_groups(
    groups: Sequence[TrajectoryGroup], config: RLConfig
) -> tuple[list[TrajectoryGroup], dict[str, int]]:
    """Apply the learner's filters in order; returns the kept groups and how many samples each dropped.

    - episodes that failed (``ERROR``) or cannot be trained on are not the policy's doing: dropped;
    - ``overlong="filter"``: samples cut by a length limit are dropped, ``"soft"``: DAPO's length penalty
      is added to their final reward;
    - ``dynamic_sampling``: groups whose rewards all agree are dropped.
    """
    buffer = TrajectoryBuffer(groups)
    before = len(buffer)
    buffer.keep(lambda t: t.trainable and t.stop_reason is not StopReason.ERROR)
    dropped = {"failed": before - len(buffer), "overlong": 0, "zero_variance": 0}
    if config.overlong == "filter":
        dropped["overlong"] = buffer.filter_overlong()
    elif config.overlong == "soft":
        buffer.apply_overlong_penalty(config.max_episode_tokens, config.overlong_cache)
    kept = buffer.groups
    if config.dynamic_sampling:
        n = sum(len(g) for g in kept)
        kept = drop_zero_variance(kept)
        dropped["zero_variance"] = n - sum(len(g) for g in kept)
    return kept, dropped


# ---- steps and logs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLStepLog:
    """One online step (GRPO, PPO, an online DPO round): rewards of what was played, what the update trained
    on, what its filters dropped, and its statistics."""

    step: int
    reward_mean: float
    reward_std: float
    reward_components: Mapping[str, float]
    samples: int
    trained_samples: int
    dropped: Mapping[str, int]
    stop_reasons: Mapping[str, int]
    response_tokens_mean: float
    sampled_tokens: int
    lr: float
    update: Mapping[str, float]
    rollout_seconds: float
    update_seconds: float
    seconds: float
    policy_version: int
    monitors: Mapping[str, float] = field(default_factory=dict)
    cluster: Mapping[str, float] = field(default_factory=dict)  # see agentrl.cluster.metrics

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_log(step: int, groups: Sequence[TrajectoryGroup], trained: Sequence[Trajectory], dropped: Mapping[str, int],
             lr: float, update: Mapping[str, float], rollout_s: float, started: float, runner: Any) -> RLStepLog:  # fmt: skip
    """Summarise one step for logs and progress bars (shared by the RL learners)."""
    played = [t for g in groups for t in g]
    rewards = np.array([t.total_reward for t in played])
    components: defaultdict[str, float] = defaultdict(float)
    for t in played:
        for turn in t.turns:
            for name, value in turn.reward_components.items():
                components[name] += value / len(played)
    now = time.perf_counter()
    return RLStepLog(
        step=step, reward_mean=float(rewards.mean()) if len(rewards) else 0.0,
        reward_std=float(rewards.std()) if len(rewards) else 0.0, reward_components=dict(components),
        samples=len(played), trained_samples=len(trained), dropped=dict(dropped),
        stop_reasons=dict(Counter(t.stop_reason.value for t in played)),
        response_tokens_mean=float(np.mean([t.num_sampled for t in played])) if played else 0.0,
        sampled_tokens=sum(t.num_sampled for t in played), lr=lr, update=dict(update),
        rollout_seconds=rollout_s, update_seconds=now - started - rollout_s, seconds=now - started,
        policy_version=runner.policy.version,
    )  # fmt: skip
