"""SPIN: two self-play iterations on the tiny model learn the ground truth over the model's own answers, each
iteration's rejected answers come from the previous iterate, and matched or failed answers give no pair."""

from __future__ import annotations

import json
import random

import pytest
import torch

from agentrl.errors import ConfigError
from agentrl.learners.preference_data import read_preference_jsonl
from agentrl.learners.sft import Demonstration, read_messages_jsonl
from agentrl.learners.spin import (
    SPINConfig,
    SPINExample,
    generate_answers,
    self_play_pairs,
    spin_examples,
    train_spin,
)
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout.complete import Completion, complete
from agentrl.rollout.hf import HFPolicy
from agentrl.rollout.policy import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def sum_questions(n: int, seed: int) -> list[list[dict[str, str]]]:
    """``a+b`` questions answered ``<answer>a+b</answer>``, as SFT message lists."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        out.append([{"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": f"<answer>{a + b}</answer>"}])  # fmt: skip
    return out


def greedy(model_path, prompts, max_tokens: int = 16) -> list[str]:
    """Greedy answers of the model saved at ``model_path``, through the hf backend."""
    tokenizer = load_tokenizer(model_path)
    policy = HFPolicy(str(model_path), tokenizer)
    answers = complete(
        policy, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), ChatRenderer(tokenizer)
    )
    assert all(a.ok for a in answers)
    return [a.text for a in answers]


def test_two_iterations_learn_the_data_over_the_iterates_own_answers(tmp_path):
    data = sum_questions(6, seed=0)
    config = SPINConfig(iterations=2, max_steps=4, warmup_steps=0, lr=2e-3, batch_size=6, max_new_tokens=16,
                        temperature=0.0, output_dir=tmp_path)  # fmt: skip
    seen = []
    result = train_spin(config, data, on_iteration=lambda log, pairs: seen.append((log, pairs)))
    first, second = result.history
    for log in result.history:
        print(log)
    assert [log.iteration for log in result.history] == [1, 2]
    assert [(log.pairs, log.matched, log.failed) for log in result.history] == [(6, 0, 0), (6, 0, 0)]

    # Each iteration's DPO ranks its own pairs right and widens the ground truth's lead over the generations.
    for log in result.history:
        assert log.accuracy >= 5 / 6
        assert log.margin_after > log.margin_before + 5.0
        assert log.loss < 0.6931  # below log 2, where every step would sit if nothing were learned
    # Iteration 2 starts from iteration 1's iterate: the same ground truth scores the same under it.
    assert second.truth_logp_before == pytest.approx(first.truth_logp_after, abs=1e-3)
    # Over the run the ground truth got likelier, and the next iterate's own answers trail it by more.
    assert second.truth_logp_after > first.truth_logp_before + 2.0
    assert second.margin_before > first.margin_before

    # Iteration 2 rejects iteration 1's greedy answers (regenerated here from its checkpoint), not the start's.
    prompts = [d[:1] for d in data]
    rejected = [[p.rejected[0]["content"] for p in pairs] for _, pairs in seen]
    assert rejected[0] == greedy("tiny", prompts)
    assert rejected[1] == greedy(first.checkpoint, prompts)
    assert all(a != b for a, b in zip(rejected[0], rejected[1], strict=True))
    assert all(p.chosen[0] == d[1] and list(p.prompt) == d[:1] for p, d in zip(seen[0][1], data, strict=True))

    # The iterates and the pairs are on disk, the pairs in the preference reader's format.
    assert first.checkpoint == tmp_path / "iteration-1" / "step-000004"
    assert result.checkpoint == second.checkpoint == tmp_path / "iteration-2" / "step-000004"
    assert read_preference_jsonl(tmp_path / "iteration-2" / "pairs.jsonl") == seen[1][1]
    saved = load_model(result.checkpoint)
    live = dict(result.model.named_parameters())
    assert all(torch.equal(p, live[name]) for name, p in saved.named_parameters())
    start = load_model("tiny")
    assert any(not torch.equal(p, live[name]) for name, p in start.named_parameters())


def test_answers_equal_to_the_ground_truth_or_failed_give_no_pair():
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny")
    data = sum_questions(3, seed=1)
    config = SPINConfig(max_new_tokens=16, temperature=0.0)
    answers = generate_answers(model, tokenizer, spin_examples(data), config, seed=0)
    # The first example's ground truth is exactly what the model answers; the third's generation failed.
    data[0] = [data[0][0], {"role": "assistant", "content": answers[0].text}]
    answers[2] = Completion(None, None, "timed out after 0.1 s")
    pairs, matched, failed = self_play_pairs(tokenizer, spin_examples(data), answers)
    assert (len(pairs), matched, failed) == (1, 1, 1)
    assert pairs[0].rejected[0]["content"] == answers[1].text and pairs[0].chosen[0] == data[1][1]


def test_a_model_that_already_answers_like_the_data_ends_the_run_untrained():
    prompts = [d[:1] for d in sum_questions(2, seed=2)]
    data = [
        [*p, {"role": "assistant", "content": text}]
        for p, text in zip(prompts, greedy("tiny", prompts), strict=True)
    ]
    config = SPINConfig(iterations=3, max_steps=2, warmup_steps=0, max_new_tokens=16, temperature=0.0)
    result = train_spin(config, data)
    (log,) = result.history
    assert (log.pairs, log.matched, log.failed, log.checkpoint, result.checkpoint) == (0, 2, 0, None, None)
    start = dict(load_model("tiny").named_parameters())
    assert all(torch.equal(p, start[name]) for name, p in result.model.named_parameters())


def test_sampled_answers_follow_the_seed():
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny")
    examples = spin_examples(sum_questions(4, seed=3))
    config = SPINConfig(max_new_tokens=12, temperature=1.0)
    texts = [
        [a.text for a in generate_answers(model, tokenizer, examples, config, seed=s)] for s in (1, 1, 2)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_data_forms_split_at_the_last_assistant_message(tmp_path):
    tool = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
    system = {"role": "system", "content": "Be brief."}
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    multi = [system, user, {"role": "assistant", "content": "one"}, {"role": "user", "content": "two?"}, answer,
             {"role": "user", "content": "dropped"}]  # fmt: skip
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [user, answer], "tools": [tool]}) + "\n", encoding="utf-8")
    out = spin_examples([multi, Demonstration((user, answer), (tool,)), *read_messages_jsonl(path)])
    assert out[0] == SPINExample(tuple(multi[:4]), answer)
    assert out[1] == out[2] == SPINExample((user,), answer, (tool,))
    with pytest.raises(ConfigError, match="example 0 has no assistant message"):
        spin_examples([[user]])
    with pytest.raises(ConfigError, match="example 1 starts with the assistant's answer"):
        spin_examples([[user, answer], [answer]])
    with pytest.raises(
        ConfigError, match="resume_from does not apply to SPIN; to continue a run, set model="
    ):
        SPINConfig(resume_from=tmp_path)
    with pytest.raises(ConfigError, match=r"SPINConfig\.iterations: got 0"):
        SPINConfig(iterations=0)
