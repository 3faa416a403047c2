"""LLM judges: strict verdict parsing, a real local judge (the tiny model taught the verdict formats) through
the hf backend and through an OpenAI-compatible server on loopback, position swapping, the cache, failures
as marked verdicts, and the judge as a reward, a group scorer and a preference labeller in real runs."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from _judge_model import OPTIONS, TASKS, response, train_judge
from conftest import torch_threads

from agentrl.data.buffer import TrajectoryGroup
from agentrl.judge import (
    Judge,
    JudgeCache,
    JudgeGroupReward,
    JudgeReward,
    JudgeScorer,
    candidate_pairs,
    label_pairs,
)
from agentrl.judge.verdicts import parse_preference, parse_score
from agentrl.learners.dpo import DPOConfig, train_dpo
from agentrl.learners.grpo import GRPOConfig, train_grpo
from agentrl.learners.online_dpo import OnlineDPOConfig, train_online_dpo
from agentrl.learners.rejection import sample_groups
from agentrl.learners.rl import RolloutConfig
from agentrl.models.tiny import tiny_model_path
from agentrl.rewards.base import RewardSpec, WeightedReward
from agentrl.rollout.policy import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    with torch_threads(2):
        return train_judge(tmp_path_factory.mktemp("judge"))


def make_judge(judge_dir, **options):
    return Judge.from_pretrained(judge_dir, **{**OPTIONS, "sampling": GREEDY, **options})


def held_out(n: int, seed: int = 123) -> tuple[list[tuple[str, str]], list[str]]:
    rng = random.Random(seed)
    qualities = [rng.choice(["good", "bad"]) for _ in range(n)]
    return [(rng.choice(TASKS), response(rng, q)) for q in qualities], qualities


# ---- parsing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value", "error"),
    [
        ("Score: 7", 6 / 9, None),
        ("The answer is right.\n**Score:** 10\n", 1.0, None),
        ("Score: 4\nso, again:\nscore: 4", 3 / 9, None),
        ("Score: 4\nScore: 8", None, "conflicting"),
        ("Score: 11", None, "off the scale"),
        ("Score: 0", None, "off the scale"),
        ("I'd say the Score: 7 fits", None, "no 'Score: N' line"),
        ("Score: seven", None, "no 'Score: N' line"),
        ("", None, "no 'Score: N' line"),
    ],
)
def test_score_parsing_is_strict(text, value, error):
    parsed = parse_score(text, (1, 10))
    assert parsed.value == (pytest.approx(value) if value is not None else None)
    assert (parsed.error is None) if error is None else (error in parsed.error)


@pytest.mark.parametrize(
    ("text", "value"),
    [("Verdict: A", 1.0), ("thinking...\nverdict: b", 0.0), ("Verdict: tie", 0.5), ("**Verdict:** [B]", 0.0),
     ("Verdict: A\nVerdict: B", None), ("A is better", None), ("Verdict: C", None)],
)  # fmt: skip
def test_preference_parsing_is_strict(text, value):
    assert parse_preference(text).value == value


# ---- a real local judge -------------------------------------------------------------------------------
def test_a_local_judge_scores_by_the_rubric_and_keeps_its_raw_text(judge_dir):
    """Each verdict is the model's own greedy answer to the rubric's question (decoded here through transformers,
    apart from the judge's backend), kept raw and parsed on the scale. How many the fixture judge gets right is
    printed, not asserted: 200 SFT steps round differently on other CPUs' kernels and can end in another rule."""
    from agentrl.judge import verdicts as judge_verdicts
    from agentrl.models.loading import load_model, load_tokenizer

    judge = make_judge(judge_dir)
    items, qualities = held_out(16)
    verdicts = judge.score(items)
    assert all(v.ok and v.error is None and v.attempts == 1 for v in verdicts)
    model, tokenizer = load_model(judge_dir), load_tokenizer(judge_dir)
    for (prompt, answer), verdict in zip(items, verdicts, strict=True):
        asked = judge_verdicts.pointwise_messages(prompt, answer, rubric=judge.rubric, scale=judge.scale,
                                                  template=OPTIONS["pointwise_template"], system=None)  # fmt: skip
        ids = tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        assert verdict.raw is not None and verdict.raw.strip() == expected
        assert verdict.score == pytest.approx(parse_score(expected, judge.scale).value)
    assert all(v.raw.startswith("Score:") for v in verdicts if v.raw)  # the verdict format was learned
    right = sum((v.score > 0.5) == (q == "good") for v, q in zip(verdicts, qualities, strict=True))  # type: ignore[operator]
    print(f"the fixture judge scored {right}/16 held-out responses by its rule")


def test_pairwise_verdicts_are_asked_in_both_orders_and_position_bias_cancels(judge_dir):
    judge = make_judge(judge_dir)
    rng = random.Random(7)
    good, bad, good2 = response(rng, "good"), response(rng, "bad"), response(rng, "good")
    first_better, second_better, alike = judge.compare(
        [(TASKS[0], good, bad), (TASKS[0], bad, good), (TASKS[0], good, good2)]
    )
    assert (first_better.preference, first_better.consistent) == (1.0, True)
    assert (second_better.preference, second_better.consistent) == (0.0, True)
    # The judge answers "A" for two alike responses in either order: the swap turns its bias into a tie.
    assert (alike.forward.score, alike.backward.score) == (1.0, 1.0)
    assert (alike.preference, alike.consistent) == (0.5, False)
    assert judge.calls == 6


def test_answers_are_cached_by_content_in_memory_and_on_disk(judge_dir, tmp_path):
    path = tmp_path / "judge-cache.jsonl"
    judge = make_judge(judge_dir, cache=path)
    items, _ = held_out(6)
    first = judge.score(items)
    assert judge.calls == 6 and judge.cache.misses == 6
    again = judge.score([*items, items[0]])
    assert judge.calls == 6 and all(v.cached for v in again)
    assert [v.score for v in again[:6]] == [v.score for v in first] and again[6].score == first[0].score
    assert len(path.read_text().splitlines()) == 6
    # A new judge over the same file answers from it; another judge name, or another question, does not.
    reread = make_judge(judge_dir, cache=JudgeCache(path))
    assert all(v.cached for v in reread.score(items)) and reread.calls == 0
    other = make_judge(judge_dir, cache=path, name="another-judge")
    assert not any(v.cached for v in other.score(items[:2])) and other.calls == 2
    rescaled = make_judge(judge_dir, cache=path, scale=(1, 5))  # the question names the scale
    assert rescaled.score(items[:1])[0].attempts == 1


def test_failures_mark_the_sample_and_are_retried_never_raised(judge_dir):
    items, _ = held_out(4)
    # Out of time: every call fails, is retried, and comes back marked.
    slow = make_judge(judge_dir, timeout_s=1e-6, retries=2)
    verdicts = slow.score(items)
    assert all(not v.ok and "timed out" in v.error and v.raw is None and v.attempts == 3 for v in verdicts)
    assert slow.calls == 12 and slow.failures == 4 and len(slow.cache) == 0
    # Cut before the verdict: a parse failure with the raw text kept; greedy answers are not asked again.
    cut = make_judge(judge_dir, sampling=SamplingParams(max_tokens=2, temperature=0.0))
    verdicts = cut.score(items)
    assert all(not v.ok and "no 'Score: N' line" in v.error and v.raw and v.attempts == 1 for v in verdicts)
    # Sampled answers are: another draw may hold a verdict.
    sampled = make_judge(judge_dir, sampling=SamplingParams(max_tokens=2, temperature=1.0), retries=1)
    assert all(v.attempts == 2 for v in sampled.score(items))
    # A backend that is gone: each verdict says why.
    gone = make_judge(judge_dir)
    asyncio.run(gone.policy.aclose())
    assert all("closed" in v.error for v in gone.score(items))
    # As a reward, a failure scores failure_value and names the error.
    reward = WeightedReward([RewardSpec("judge", JudgeReward(slow, failure_value=0.0))])
    result = reward(TASKS[0], items[0][1])
    assert result.score == 0.0 and "timed out" in result.info["judge"]["error"]


def test_the_judge_is_a_reward_in_a_weighted_reward(judge_dir):
    judge = make_judge(judge_dir)
    reward = WeightedReward([RewardSpec("judge", JudgeReward(judge), weight=2.0),
                             RewardSpec("short", lambda task, answer: -len(answer) / 100)])  # fmt: skip
    rng = random.Random(3)
    alone = JudgeReward(judge)
    # Against the judge's own verdicts, not the ones the fixture's training reaches here: a CPU with other
    # vector instructions trains another judge from the same seed.
    for text in (response(rng, "good"), response(rng, "bad")):
        weighted, single = reward(TASKS[1], text), alone(TASKS[1], text)
        assert weighted.components["judge"] == pytest.approx(2 * single.score)
        assert weighted.components["short"] == pytest.approx(-len(text) / 100)
        assert weighted.score == pytest.approx(sum(weighted.components.values()))
        assert weighted.info["judge"]["raw"] == single.info["raw"] and single.info["raw"].startswith("Score: ")


# ---- in real runs ---------------------------------------------------------------------------------------
TOY = {"env": "toy-digits-v0", "model": str(tiny_model_path()), "prompts_per_step": 4, "group_size": 4,
       "max_new_tokens": 6}  # fmt: skip


def test_grpo_adds_the_judges_score_to_every_episode_in_one_batch(judge_dir):
    judge = make_judge(judge_dir)
    rescore = JudgeGroupReward(judge, weight=0.5)
    seen: list[TrajectoryGroup] = []
    result = train_grpo(GRPOConfig(**TOY, max_steps=2, lr=1e-3, warmup_steps=0), on_rollout=lambda step, groups: seen.extend(groups),
                        rescore=rescore)  # fmt: skip
    assert len(result.history) == 2 and rescore.episodes == 32 and judge.calls == 32
    for trajectory in (t for g in seen for t in g):
        score = trajectory.meta["judge"]["score"]
        assert trajectory.turns[-1].reward_components.get("judge", 0.0) == pytest.approx(0.5 * score)
    assert all("judge" in log.reward_components for log in result.history)


def test_online_dpo_ranks_by_the_judge(judge_dir):
    judge = make_judge(judge_dir)
    calls: list[int] = []
    scorer = JudgeScorer(judge, "pairwise")

    def counted(group):
        calls.append(len(group))
        return scorer(group)

    result = train_online_dpo(OnlineDPOConfig(**TOY, max_steps=2, lr=1e-3), scorer=counted)
    assert calls == [4] * 8 and judge.calls == 8 * 6 * 2  # C(4, 2) pairs, both orders
    assert len(result.history) == 2


def test_ai_preference_labels_order_pairs_sampled_fresh_and_they_train(judge_dir):
    groups = sample_groups(RolloutConfig(**TOY, seed=3), 6)
    pairs = candidate_pairs(groups)
    assert pairs and all(p.chosen is not p.rejected for p in pairs)
    judge = make_judge(judge_dir)
    labelled = label_pairs(judge, pairs)
    assert labelled.kept + labelled.swapped + labelled.ties + labelled.failed == len(pairs)
    assert judge.calls == 2 * len(pairs) and len(labelled.pairs) == labelled.kept + labelled.swapped
    for pair, verdict in zip(pairs, labelled.verdicts, strict=True):
        kept = [
            p
            for p in labelled.pairs
            if {id(p.chosen), id(p.rejected)} == {id(pair.chosen), id(pair.rejected)}
        ]
        if verdict.preference is not None and verdict.preference < 0.5:
            assert kept[0].chosen is pair.rejected
        elif verdict.preference == 0.5 or verdict.preference is None:
            assert not kept
    if labelled.pairs:
        out = train_dpo(
            DPOConfig(model=str(tiny_model_path()), max_steps=2, batch_size=2), list(labelled.pairs)
        )
        assert all(torch.isfinite(torch.tensor(log.loss)) for log in out.history)


@pytest.mark.vllm
@pytest.mark.slow
def test_the_judge_over_an_openai_compatible_server_agrees_with_the_local_one(judge_dir):
    from _vllm_server import SERVED_NAME, require_vllm, vllm_server

    require_vllm()
    items, _ = held_out(8, seed=11)
    rng = random.Random(11)
    pairs = [
        (TASKS[2], response(rng, "good"), response(rng, "bad")),
        (TASKS[2], response(rng, "bad"), response(rng, "good")),
    ]
    local = make_judge(judge_dir)
    with vllm_server(str(judge_dir)) as server:
        remote = Judge.from_endpoint(server.base_url, SERVED_NAME, **OPTIONS, sampling=GREEDY)
        remote_scores, remote_pairs = remote.score(items), remote.compare(pairs)
        asyncio.run(remote.aclose())
    assert [v.raw for v in remote_scores] == [v.raw for v in local.score(items)]
    assert [p.preference for p in remote_pairs] == [p.preference for p in local.compare(pairs)] == [1.0, 0.0]


# ---- best-of-N in the harness ---------------------------------------------------------------------------
def test_agentrl_eval_picks_best_of_n_by_a_judge_described_in_a_yaml_file(judge_dir, tmp_path):
    """math-v0 through a scripted chat server whose replies say "good" when right and "bad" when wrong: the
    judge (which rewards "good") is an oracle, so best-of-N by it equals pass@N, above pass@1."""
    import yaml
    from agentrl_envs.math import generate_tasks
    from test_evaluation import eval_cli, results_of
    from test_evaluation_runs import chat_server

    gold = {t.question: t.answer for t in generate_tasks(1200, seed=0)[:4]}

    def reply(body):
        answer = gold[body["messages"][-1]["content"]]
        right = random.Random(body["seed"]).random() < 0.4
        return {"content": f"good \\boxed{{{answer}}}" if right else f"bad \\boxed{{{answer}1}}"}

    spec = tmp_path / "judge.yaml"
    spec.write_text(yaml.safe_dump({"model": str(judge_dir), **OPTIONS, "max_tokens": 8}))
    out = tmp_path / "eval"
    with chat_server(reply) as (url, _):
        code, stdout, stderr = eval_cli(
            "--env", "math", "--task-option", "task", "--backend", "openai", "--base-url", url, "--model", "scripted",
            "--n", "4", "--k", "4", "--ks", "1,4", "--pass-on", "correct", "--best-of-n-by", f"judge:{spec}",
            "--out", str(out), "--quiet",
        )  # fmt: skip
    assert code == 0, stderr
    metrics = results_of(out)["metrics"]
    cached = [json.loads(line) for line in (out / "judge-cache.jsonl").read_text().splitlines()]
    # One entry per distinct question (replies repeat within a task, and a repeat is not asked again).
    assert len({c["key"] for c in cached}) == len(cached) <= 16
    assert metrics["best_of_n"]["4"]["value"] <= metrics["pass_at_k"]["4"]["value"] + 1e-9
    if {c["text"] for c in cached} == {"Score: 9", "Score: 2"}:  # the judge the fixture trains on most CPUs:
        assert metrics["best_of_n"]["4"]["value"] == pytest.approx(metrics["pass_at_k"]["4"]["value"])  # an oracle
        assert metrics["pass_at_k"]["1"]["value"] < metrics["best_of_n"]["4"]["value"]
    assert "best-of-N (by judge:" in stdout
