"""The hf backend on the tiny model, loaded through from_pretrained: exact greedy, exact logprobs, batching."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import DynamicCache

from agentrl.errors import ConfigError
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout._shared_prefill import prefix_groups
from agentrl.rollout.hf import HFPolicy, _preallocated_cache, _RowSampler, sampling_logprobs
from agentrl.rollout.policy import Policy, SamplingParams, make_policy


def perturbed(model, seed, scale=0.05):
    """The tiny model's random init gives near-constant greedy text; noise makes continuations varied."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    return perturbed(load_model("tiny"), seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    renderer = ChatRenderer(tokenizer)
    texts = ["Add 2 and 3.", "Write a function that reverses a list of numbers, then test it twice.", "Hi"]
    return [renderer.prompt_ids([{"role": "user", "content": t}]) for t in texts]


@pytest.fixture
def policy(model, tokenizer):
    policy = HFPolicy(model, tokenizer, max_batch=16)
    yield policy
    asyncio.run(policy.aclose())


def generate_all(policy, prompts, params):
    async def main():
        return await asyncio.gather(*(policy.generate(p, s) for p, s in zip(prompts, params, strict=True)))

    return asyncio.run(main())


def recomputed_logprobs(model, prompt, generation, sampling):
    """Logprobs of the sampled ids from one full forward pass over prompt + sample, processed the same way."""
    ids = torch.tensor([[*prompt, *generation.token_ids]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
    lp = sampling_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return lp.gather(-1, torch.tensor(generation.token_ids).unsqueeze(-1)).squeeze(-1)


def test_make_policy_loads_the_tiny_model_by_name(tokenizer, prompts):
    policy = make_policy("hf", model="tiny", max_batch=4)
    assert isinstance(policy, Policy) and policy.name == "hf"
    assert policy.max_context == 2048 and tokenizer.eos_token_id in policy.eos_token_ids
    [generation] = generate_all(policy, prompts[:1], [SamplingParams(max_tokens=5, temperature=0)])
    assert len(generation.token_ids) <= 5 and generation.policy_version == 0
    asyncio.run(policy.aclose())
    asyncio.run(policy.aclose())  # idempotent


def test_greedy_equals_transformers_generate_for_concurrent_left_padded_prompts(policy, model, prompts):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    generations = generate_all(policy, prompts, [greedy] * len(prompts))
    continuations = set()
    for prompt, generation in zip(prompts, generations, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert list(generation.token_ids) == reference
        assert generation.finish_reason == ("stop" if reference[-1] == policy.eos_token_ids[0] else "length")
        continuations.add(tuple(reference))
    assert len(continuations) == len(prompts)  # the prompts really lead to different text


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=16, temperature=0),
        SamplingParams(max_tokens=16, temperature=1.0, seed=1),
        SamplingParams(max_tokens=16, temperature=1.5, seed=2),
        SamplingParams(max_tokens=16, temperature=0.7, top_k=20, seed=3),
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.8, seed=4),
        SamplingParams(max_tokens=16, temperature=1.2, top_k=50, top_p=0.9, seed=5),
    ],
    ids=["greedy", "t1", "t1.5", "topk", "topp", "topk+topp"],
)
def test_logprobs_match_a_full_forward_pass(policy, model, prompts, sampling):
    generations = generate_all(policy, prompts, [sampling] * len(prompts))
    for prompt, generation in zip(prompts, generations, strict=True):
        expected = recomputed_logprobs(model, prompt, generation, sampling)
        assert torch.isfinite(expected).all()
        assert torch.allclose(torch.tensor(generation.logprobs), expected, atol=1e-4)


def test_batched_requests_give_what_single_requests_give(policy, prompts):
    params = [SamplingParams(max_tokens=20, temperature=0)] * 3 + [
        SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in (7, 8, 9)
    ]
    many = prompts + prompts
    together = generate_all(policy, many, params)
    alone = [generate_all(policy, [p], [s])[0] for p, s in zip(many, params, strict=True)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    flat = [lp for g in together for lp in g.logprobs]
    assert flat == pytest.approx([lp for g in alone for lp in g.logprobs], abs=1e-5)


def test_seeds_make_sampling_reproducible_and_different_seeds_differ(policy, prompts):
    def sample(seed):
        return generate_all(policy, prompts[:1], [SamplingParams(max_tokens=20, temperature=1.0, seed=seed)])[0]

    assert sample(11).token_ids == sample(11).token_ids
    assert len({sample(s).token_ids for s in (11, 12, 13, 14)}) > 1


def test_samples_follow_the_filtered_distribution(model, tokenizer, prompts):
    """2,000 one-token samples land in ten equal-probability bins of the expected distribution ~evenly."""
    prompt, n = prompts[0], 2000
    policy = HFPolicy(model, tokenizer, max_batch=n)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    for sampling in (SamplingParams(max_tokens=1, temperature=1.5), SamplingParams(max_tokens=1, top_k=5, top_p=0.9)):
        params = [dataclass_replace(sampling, seed=s) for s in range(n)]
        tokens = torch.tensor([g.token_ids[0] for g in generate_all(policy, [prompt] * n, params)])
        expected = sampling_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p).exp().double()
        order = expected.argsort(descending=True)
        mass_before = expected[order].cumsum(0) - expected[order]
        bins = torch.empty_like(order)
        bins[order] = (mass_before * 10).floor().long().clamp(max=9)
        expected_bins = torch.zeros(10, dtype=torch.float64).index_add_(0, bins, expected)
        observed_bins = torch.bincount(bins[tokens], minlength=10).double() / n
        assert (observed_bins - expected_bins).abs().max() < 0.035, (observed_bins, expected_bins)
        assert bool((expected[tokens] > 0).all())  # nothing filtered out is ever drawn


def dataclass_replace(sampling, **changes):
    import dataclasses

    return dataclasses.replace(sampling, **changes)


def test_stop_tokens_and_the_length_cap(policy, prompts):
    greedy = SamplingParams(max_tokens=12, temperature=0)
    [free] = generate_all(policy, prompts[:1], [greedy])
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    third = free.token_ids[2]
    [stopped] = generate_all(policy, prompts[:1], [dataclass_replace(greedy, stop_token_ids=(third,))])
    cut = free.token_ids.index(third) + 1
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:cut]


def test_update_weights_changes_the_output_and_bumps_the_version(model, tokenizer, prompts):
    policy = HFPolicy(perturbed(load_model("tiny"), seed=0), tokenizer)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    before = generate_all(policy, prompts, [greedy] * 3)
    new_weights = perturbed(load_model("tiny"), seed=99, scale=0.2).state_dict()
    asyncio.run(policy.update_weights(new_weights.items()))
    after = generate_all(policy, prompts, [greedy] * 3)
    assert policy.version == 1 and all(g.policy_version == 1 for g in after)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    reference = HFPolicy(perturbed(load_model("tiny"), seed=99, scale=0.2), tokenizer)
    assert [g.token_ids for g in generate_all(reference, prompts, [greedy] * 3)] == [g.token_ids for g in after]
    bad = {"model.norm.weight": torch.zeros_like(new_weights["model.norm.weight"]), "no_such_weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match="no_such_weight"):
        asyncio.run(policy.update_weights(bad))
    assert policy.version == 1 and generate_all(policy, prompts, [greedy] * 3) == after  # nothing was loaded


def test_bad_prompts_are_refused_with_the_fix(policy, tokenizer):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ConfigError, match="ChatRenderer"):
        generate_all(policy, [[{"role": "user", "content": "hi"}]], [greedy])
    with pytest.raises(ConfigError, match=r"must be in \[0, 1024\)"):
        generate_all(policy, [[1, 2, 5000]], [greedy])
    with pytest.raises(ConfigError, match="no room"):
        generate_all(policy, [[5] * policy.max_context], [greedy])


def test_the_event_loop_stays_responsive_while_a_batch_runs(policy, prompts):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        started = time.perf_counter()
        generations = await asyncio.gather(
            *(policy.generate(p, SamplingParams(max_tokens=150, seed=i)) for i, p in enumerate(prompts))
        )
        elapsed = time.perf_counter() - started
        tick_task.cancel()
        return generations, ticks, elapsed

    generations, ticks, elapsed = asyncio.run(main())
    assert all(len(g.token_ids) > 0 for g in generations)
    # The torch work runs on a worker thread: the loop kept ticking (a blocked loop would tick ~once).
    assert ticks >= min(20, elapsed * 1000 / 4)


def test_a_cancelled_request_does_not_hurt_the_others(policy, prompts):
    async def main():
        doomed = asyncio.create_task(policy.generate(prompts[0], SamplingParams(max_tokens=200, seed=0)))
        await asyncio.sleep(0.05)  # its batch is running now
        doomed.cancel()
        queued = asyncio.create_task(policy.generate(prompts[1], SamplingParams(max_tokens=200, seed=0)))
        await asyncio.sleep(0)
        queued.cancel()  # cancelled while waiting for a batch
        others = await asyncio.gather(*(policy.generate(p, SamplingParams(max_tokens=8, seed=1)) for p in prompts))
        return doomed.cancelled() and queued.cancelled(), others

    cancelled, others = asyncio.run(main())
    assert cancelled and all(len(g.token_ids) > 0 for g in others)


def dynamic_cache_decode(model, prompt, sampling, stop_ids):
    """One row alone, unpadded, through transformers' DynamicCache, with the backend's sampler: (tokens, logprobs)."""
    sampler = _RowSampler([sampling], [sampling.max_tokens], torch.Generator(), "cpu")
    cache, tokens, logprobs = DynamicCache(), [], []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[:, -1]
        for step in range(sampling.max_tokens):
            token, logprob = sampler.sample(logits, torch.tensor([0]), step)
            tokens.append(int(token))
            logprobs.append(float(logprob))
            if tokens[-1] in stop_ids:
                break
            logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens, logprobs


def test_the_preallocated_cache_decodes_a_mixed_batch_exactly_like_a_dynamic_cache(model, tokenizer, prompts):
    """Shared and distinct prompts of different lengths, greedy and sampled rows, rows ending at every step.

    top-p keeps a set that a logit's last bit can change, so a batch may draw another token there than one row
    alone: top-p rows are checked by their logprobs under a full forward pass of what they drew."""
    policy = HFPolicy(model, tokenizer, max_batch=16)
    kinds = [
        dict(temperature=0),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.3, top_p=0.85),
        dict(temperature=1.1, top_k=40, top_p=0.9),
    ]
    rows = [(prompts[i % 3], SamplingParams(max_tokens=3 + 2 * i, seed=i, **kinds[i % 5])) for i in range(12)]
    stop_ids = set(policy.eos_token_ids)
    for i in (4, 9):  # two rows stop on a token of their own continuation
        prompt, sampling = rows[i]
        free, _ = dynamic_cache_decode(model, prompt, sampling, stop_ids)
        rows[i] = (prompt, dataclass_replace(sampling, stop_token_ids=(free[2],)))
    generations = generate_all(policy, [p for p, _ in rows], [s for _, s in rows])
    for (prompt, sampling), generation in zip(rows, generations, strict=True):
        if sampling.top_p < 1:  # the kept set may differ in a last bit: the same logprobs for the same tokens
            expected = recomputed_logprobs(model, prompt, generation, sampling)
            assert torch.allclose(torch.tensor(generation.logprobs), expected, atol=1e-4)
            continue
        tokens, logprobs = dynamic_cache_decode(model, prompt, sampling, stop_ids | set(sampling.stop_token_ids))
        assert list(generation.token_ids) == tokens
        assert list(generation.logprobs) == pytest.approx(logprobs, abs=1e-5)
    lengths = [len(g.token_ids) for g in generations]
    assert len(set(lengths)) >= 8 and [g.finish_reason for g in generations].count("stop") >= 2
    assert len({g.token_ids for g in generations}) == 12
    asyncio.run(policy.aclose())


def test_the_preallocated_cache_grows_past_its_capacity(model, prompts):
    prompt = prompts[1]
    cache = _preallocated_cache(model, capacity=len(prompt) + 2)
    assert cache is not None  # a full-attention Qwen2 model gets the preallocated cache
    ids = torch.tensor([prompt[:-4]])
    with torch.inference_mode():
        ours = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:]
        reference_cache = DynamicCache()
        theirs = model(input_ids=ids, past_key_values=reference_cache, use_cache=True).logits[:, -1:]
        for token in [*prompt[-4:], 5, 6, 7, 8]:  # the buffers fill up at the third of these and double
            step = torch.tensor([[token]])
            ours = torch.cat([ours, model(input_ids=step, past_key_values=cache, use_cache=True).logits], dim=1)
            theirs = torch.cat(
                [theirs, model(input_ids=step, past_key_values=reference_cache, use_cache=True).logits], dim=1
            )
    assert cache.get_seq_length() == reference_cache.get_seq_length() == len(prompt) + 4
    assert cache.layers[0].key_buffer.shape[-2] == 2 * (len(prompt) + 2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# --- prefill of shared prefixes ---------------------------------------------------------------------


def test_prefix_groups_cover_every_prompt_once_and_share_what_groups_have_in_common():
    system = list(range(10, 60))  # 50 tokens every prompt opens with
    tasks = [system + [100 + t] * 200 for t in range(3)]
    second_turns = [task + [200 + t * 10 + g] * 20 + [7] for t, task in enumerate(tasks) for g in range(4)]
    groups = prefix_groups(second_turns)
    assert sorted(i for _, members in groups for i in members) == list(range(12))
    for shared, members in groups:
        prompts = [second_turns[i] for i in members]
        assert all(p[:shared] == prompts[0][:shared] for p in prompts)
        assert shared < min(len(p) for p in prompts)  # every row keeps its last token for its logits
    assert sorted(shared for shared, _ in groups) == [250, 250, 250]  # one group per task, its prompt shared
    short = prefix_groups([t[:60] + [9] * 20 + [g] for t in tasks for g in range(4)])  # tasks that differ a little
    assert [shared for shared, _ in short] == [50]  # one call sharing the system part beats three
    assert prefix_groups([[1, 2, 3]]) == [(0, [0])] and prefix_groups([]) == []
    unrelated = prefix_groups([[1, 2], [3, 4], [5, 6]])
    assert [shared for shared, _ in unrelated] == [0] and sorted(unrelated[0][1]) == [0, 1, 2]


def test_shared_prefix_prefill_decodes_what_per_row_prefill_decodes(model, tokenizer):
    system = {"role": "system", "content": "You write Python functions. " * 12}
    tools = [{"type": "function", "function": {"name": "submit", "description": "Submit a program.",
                                               "parameters": {"type": "object", "properties": {"code": {}}}}}]
    renderer = ChatRenderer(tokenizer, tools)
    rows = []
    for task in ("Reverse a list.", "Sum the even numbers of a list, then add 3."):
        for answer in ("def solve(xs): return xs", "def solve(xs):\n    return xs[::-1]", "no", "x" * 9):
            messages = [system, {"role": "user", "content": task}, {"role": "assistant", "content": answer},
                        {"role": "user", "content": "Not yet correct: try again."}]
            rows.append(renderer.prompt_ids(messages))
    rows += [rows[0], rows[5]]  # repeated prompts too
    params = [SamplingParams(max_tokens=12, temperature=0) if i % 2 else
              SamplingParams(max_tokens=12, temperature=1.0, seed=i) for i in range(len(rows))]
    assert min(len(p) for p in rows) > 100 and len({tuple(p) for p in rows}) == 8
    shared, plain = HFPolicy(model, tokenizer, max_batch=16), HFPolicy(model, tokenizer, share_prefix=False)
    try:
        ours, reference = generate_all(shared, rows, params), generate_all(plain, rows, params)
    finally:
        asyncio.run(shared.aclose())
        asyncio.run(plain.aclose())
    assert [g.token_ids for g in ours] == [g.token_ids for g in reference]
    assert [lp for g in ours for lp in g.logprobs] == pytest.approx([lp for g in reference for lp in g.logprobs], abs=1e-4)
    assert len({g.token_ids for g in ours}) > 4  # the rows really continue differently
