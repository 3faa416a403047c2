"""Test-time selection in ``agentrl eval``: best-of-N and maj@k by hand and against every subset, then end to
end on math-v0 through a real OpenAI-compatible server on loopback: maj@k on boxed answers, best-of-N by a
reward component and by a reward model trained here, ``--report-only`` reusing the kept scores.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import torch_threads
from test_evaluation import eval_cli, results_of
from test_evaluation_runs import chat_server

from agentrl.data.trajectory import read_jsonl
from agentrl.errors import ConfigError
from agentrl.evaluation import EvalConfig, evaluate
from agentrl.evaluation.metrics import PassRule, pass_at_k
from agentrl.evaluation.selection import (
    SCORES_FILE,
    Candidate,
    best_of_n,
    final_answer,
    majority_at_k,
    normalize_answer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def c(passed: bool, score: float | None = None, answer: str | None = None) -> Candidate:
    return Candidate(passed, score, answer)


# ---------------------------------------------------------------------------------------------- by hand
@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, 0.5),  # pass@1: each sample is the pick of a 1-subset once
        (2, 0.5),  # 6 pairs: the three with 0.9 fail; {0.5, 0.1}, {0.5, None}, {0.1, None} pass
        (3, 0.25),  # 4 triples: only {0.5, 0.1, None} lacks the failing 0.9
        (4, 0.0),
    ],
)
def test_best_of_n_without_ties_by_hand(n, expected):
    samples = [c(False, 0.9), c(True, 0.5), c(True, 0.1), c(False, None)]  # None: the scorer failed
    assert best_of_n(samples, n) == pytest.approx(expected, abs=1e-12)
    assert best_of_n(list(reversed(samples)), n) == pytest.approx(expected, abs=1e-12)  # order is irrelevant


def test_best_of_n_breaks_ties_at_random_and_ranks_unscored_last():
    tied = [c(True, 1.0), c(False, 1.0), c(True, 0.0)]
    # Pairs: {1T, 1F} a coin flip (0.5), {1T, 0T} passes, {1F, 0T} fails: (0.5 + 1 + 0) / 3.
    assert best_of_n(tied, 1) == pytest.approx(2 / 3)
    assert best_of_n(tied, 2) == pytest.approx(0.5)
    assert best_of_n(tied, 3) == pytest.approx(0.5)
    # A failed score (None, NaN) ranks below a score of -1e9; among unscored samples the pick is random.
    unscored = [c(True, None), c(False, math.nan), c(False, -1e9)]
    # Pairs: {None, NaN} a coin flip (0.5); with -1e9, that failing sample is picked: 0.5 / 3.
    assert best_of_n(unscored, 2) == pytest.approx(1 / 6)
    assert best_of_n(unscored[:2], 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="draw more samples"):
        best_of_n(tied, 4)


def test_an_oracle_scorer_gives_pass_at_k():
    rng = random.Random(3)
    for n in (5, 17, 40):
        passed = [rng.random() < 0.3 for _ in range(n)]
        oracle = [c(p, float(p)) for p in passed]
        for k in (1, 3, n // 2, n):
            assert best_of_n(oracle, k) == pytest.approx(pass_at_k(n, sum(passed), k), abs=1e-12)


def test_majority_vote_by_hand():
    two_to_one = [c(True, answer="A"), c(True, answer="A"), c(False, answer="B")]
    # k=2: {A, A} passes; {A, B} twice is a tie, a coin flip: (1 + 0.5 + 0.5) / 3.
    assert [majority_at_k(two_to_one, k) for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])
    silent = [c(True, answer="A"), c(False, answer="B"), c(False, answer="B"), c(True, answer=None)]
    # A sample without an answer does not vote, even if it passed. k=2 (6 pairs): {A, B} x2 ties (0.5),
    # {A, -} passes, the rest fail: 2/6. k=3 (4 triples): {A, B, -} x2 tie, the others fail: 1/4.
    assert [majority_at_k(silent, k) for k in (1, 2, 3, 4)] == pytest.approx([1 / 4, 1 / 3, 1 / 4, 0.0])
    # Samples that agree on an answer but not on passing: the answer passes with their share (1/2).
    split = [c(True, answer="A"), c(False, answer="A"), c(False, answer="B")]
    assert [majority_at_k(split, k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 1 / 3, 0.5])
    assert majority_at_k([c(True), c(True)], 1) == 0.0  # no votes at all: fails
    with pytest.raises(ValueError, match="draw more samples"):
        majority_at_k(split, 4)


def test_majority_vote_of_two_answers_is_the_hypergeometric_tail():
    a, b = 17, 13  # 17 samples say the passing answer, 13 a failing one
    n = a + b
    for k in (1, 2, 5, 10, 29, 30):
        wins = sum(math.comb(a, j) * math.comb(b, k - j) for j in range(k + 1) if 2 * j > k)
        ties = math.comb(a, k // 2) * math.comb(b, k // 2) if k % 2 == 0 else 0
        expected = (wins + ties / 2) / math.comb(n, k)
        samples = [c(True, answer="7")] * a + [c(False, answer="8")] * b
        assert majority_at_k(samples, k) == pytest.approx(expected, abs=1e-12), k
    # One answer and non-voters: the answer wins whenever one of its samples is drawn.
    samples = [c(True, answer="7")] * 25 + [c(False)] * 15
    for k in (1, 4, 20):
        assert majority_at_k(samples, k) == pytest.approx(pass_at_k(40, 25, k), abs=1e-12)


def brute_best_of_n(samples: list[Candidate], n: int) -> Fraction:
    total = Fraction(0)
    subsets = list(itertools.combinations(samples, n))
    for subset in subsets:
        rank = [s.score if s.score is not None else -math.inf for s in subset]
        tied = [s for s, r in zip(subset, rank, strict=True) if r == max(rank)]
        total += Fraction(sum(s.passed for s in tied), len(tied))
    return total / len(subsets)


def brute_majority(samples: list[Candidate], k: int) -> Fraction:
    verdicts: dict[str, list[bool]] = {}
    for s in samples:
        if s.answer is not None:
            verdicts.setdefault(s.answer, []).append(s.passed)
    total = Fraction(0)
    subsets = list(itertools.combinations(samples, k))
    for subset in subsets:
        votes: dict[str, int] = {}
        for s in subset:
            if s.answer is not None:
                votes[s.answer] = votes.get(s.answer, 0) + 1
        if votes:
            winners = [a for a, v in votes.items() if v == max(votes.values())]
            total += sum(Fraction(sum(verdicts[a]), len(verdicts[a])) for a in winners) / len(winners)
    return total / len(subsets)


def test_both_equal_the_mean_over_every_subset():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 8)
        answers = [None, "1", "2", "3"][: rng.randint(1, 4)]
        samples = [
            c(rng.random() < 0.5, rng.choice([None, 0.0, 1.0, rng.random()]), rng.choice(answers))
            for _ in range(n)
        ]
        for k in range(1, n + 1):
            assert best_of_n(samples, k) == pytest.approx(float(brute_best_of_n(samples, k)), abs=1e-12)
            assert majority_at_k(samples, k) == pytest.approx(float(brute_majority(samples, k)), abs=1e-12)


def test_answers_are_read_from_the_final_assistant_message_and_normalised():
    assert (
        normalize_answer("  $42$ ") == "42"
        and normalize_answer("$ $") is None
        and normalize_answer(None) is None
    )
    messages = [
        {"role": "user", "content": "What is 1/2 + 1/4? Say \\boxed{1}"},
        {"role": "assistant", "content": "first \\boxed{1}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "so \\boxed{ $3/4$ } #### 9"},
        {"role": "tool", "content": "\\boxed{5}"},
    ]
    assert final_answer(messages, "boxed") == "3/4"
    assert final_answer(messages, "hashes") == "9" and final_answer(messages, "answer_tag") is None
    assert final_answer(messages, "any") == "3/4"  # boxed comes first in "any"
    assert final_answer(messages[:1], "any") is None


def test_bad_selection_settings_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="SOURCE:ARGUMENT with SOURCE one of component, rm"):
        EvalConfig(env="toy-digits", best_of_n_by="correct", out=tmp_path)
    with pytest.raises(ConfigError, match="--answer-format must be one of boxed"):
        EvalConfig(env="toy-digits", maj_k=True, answer_format="latex", out=tmp_path)
    code, _, stderr = eval_cli("--env", "toy-digits", "--answer-format", "boxed", "--out", str(tmp_path))
    assert code == 1 and "add --maj-k" in stderr


# ---------------------------------------------------------------------------------------------- end to end
N_TASKS, K = 6, 4


def math_answers() -> dict[str, str]:
    """math-v0's default tasks by question (task i of the eval is the env's task i)."""
    from agentrl_envs.math import generate_tasks

    return {t.question: t.answer for t in generate_tasks(1200, seed=0)[:N_TASKS]}


def scripted_reply(body: dict[str, Any], gold: dict[str, str]) -> dict[str, Any]:
    """A reply drawn from the request's sampling seed (so every episode is reproducible): the right answer
    ("sure"), one wrong answer written two ways ("maybe"; once inside $...$), or no box at all."""
    answer = gold[body["messages"][-1]["content"]]
    draw = random.Random(body["seed"]).random()
    if draw < 0.35:
        return {"content": f"sure, that is \\boxed{{{answer}}}"}
    if draw < 0.55:
        return {"content": f"maybe \\boxed{{{answer}1}}"}
    if draw < 0.8:
        return {"content": f"maybe \\boxed{{${answer}1$}}"}
    return {"content": f"I think it is {answer}"}


@pytest.fixture(scope="module")
def math_run(tmp_path_factory) -> Path:
    """math-v0, 6 tasks x 4 samples through the OpenAI backend, with maj@k and best-of-N by ``correct``."""
    out = tmp_path_factory.mktemp("math-selection")
    gold = math_answers()
    with chat_server(lambda body: scripted_reply(body, gold)) as (url, seen):
        outcome = evaluate(
            EvalConfig(
                env="math",
                task_option="task",
                backend="openai",
                base_url=url,
                model="scripted",
                n=N_TASKS,
                k=K,
                ks=(1, 2, 4),
                concurrency=4,
                pass_rule=PassRule("correct", 1.0),
                best_of_n_by="component:correct",
                maj_k=True,
                answer_format="boxed",
                out=out,
            ),
            echo=lambda line: None,
            show_progress=False,
        )
    assert len(seen) == N_TASKS * K and outcome.played == N_TASKS * K
    return out


def candidates_of(task: dict[str, Any]) -> list[Candidate]:
    """A task's samples as results.json records them."""
    return [c(s["passed"], s.get("score"), s.get("answer")) for s in task["samples"]]


def test_selection_numbers_follow_from_the_samples(math_run):
    results = results_of(math_run)
    metrics, tasks = results["metrics"], results["tasks"]
    assert metrics["episodes"] == N_TASKS * K and metrics["selection"]["best_of_n_by"] == "component:correct"
    samples = [s for t in tasks for s in t["samples"]]
    assert 0 < sum(s["passed"] for s in samples) < len(samples)
    # Answers: the boxed content, normalised ("$x1$" and "x1" are one vote); no box, no vote.
    episodes = {
        (e.meta["task_index"], e.meta["sample_index"]): e for e in read_jsonl(math_run / "episodes.jsonl")
    }
    wrapped = 0
    for task in tasks:
        for s in task["samples"]:
            reply = episodes[(task["task_index"], s["sample"])].messages[-1]["content"]
            wrapped += "$" in reply
            if "boxed" not in reply:
                assert s["answer"] is None and not s["passed"]
            else:
                assert s["answer"] and "$" not in s["answer"] and s["answer"] in reply
    assert wrapped > 0
    assert metrics["selection"]["answered"] == sum(s["answer"] is not None for s in samples) < len(samples)
    for k in ("1", "2", "4"):
        maj_T = [float(brute_majority(candidates_of(t), int(k))) for t in tasks]
        best_T = [float(brute_best_of_n(candidates_of(t), int(k))) for t in tasks]
        assert [t["maj_at_k"][k] for t in tasks] == pytest.approx(maj_T, abs=1e-12)
        assert metrics["maj_at_k"][k]["value"] == pytest.approx(sum(maj_T) / N_TASKS, abs=1e-12)
        assert metrics["best_of_n"][k]["value"] == pytest.approx(sum(best_T) / N_TASKS, abs=1e-12)
        # Scored by the pass component itself, best-of-N is an oracle: it equals pass@k.
        assert metrics["best_of_n"][k]["value"] == pytest.approx(metrics["pass_at_k"][k]["value"], abs=1e-12)
        for name in ("maj_at_k", "best_of_n"):
            entry = metrics[name][k]
            assert entry["tasks"] == N_TASKS and entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    assert metrics["maj_at_k"]["1"]["value"] == pytest.approx(metrics["pass_at_k"]["1"]["value"])
    html = (math_run / "report.html").read_text()
    assert "<h2>Test-time selection</h2>" in html and "best-of-N (by component:correct)" in html
    assert "maj@N" in html and "· answer " in (math_run / "transcripts" / "task-00000.html").read_text()


def test_report_only_changes_the_scorer_and_keeps_the_votes(math_run):
    code, stdout, stderr = eval_cli(
        "--report-only", "--out", str(math_run), "--best-of-n-by", "component:format"
    )
    assert code == 0, stderr
    assert (
        "test-time selection" in stdout and "best-of-N (by component:format)" in stdout and "maj@N" in stdout
    )
    results = results_of(math_run)
    tasks = results["tasks"]
    # format ties every boxed reply: the pick among them is a fair draw, so this is not the oracle.
    for k in ("1", "2", "4"):
        best_T = [float(brute_best_of_n(candidates_of(t), int(k))) for t in tasks]
        assert results["metrics"]["best_of_n"][k]["value"] == pytest.approx(sum(best_T) / N_TASKS, abs=1e-12)
    assert {s["score"] for t in tasks for s in t["samples"]} == {0.0, 0.1}
    assert not (math_run / SCORES_FILE).exists()  # component scores are read from the episodes each time
    code, _, stderr = eval_cli("--report-only", "--out", str(math_run), "--best-of-n-by", "component:corect")
    assert code == 1 and "no episode has a reward component by that name" in stderr and "correct" in stderr
    code, _, stderr = eval_cli("--report-only", "--out", str(math_run), "--best-of-n-by", f"rm:{math_run}")
    assert code == 1 and "not a trained reward model" in stderr


def test_best_of_n_by_a_trained_reward_model(math_run, tmp_path):
    """A reward model trained for 12 steps to prefer "sure" replies over "maybe" ones picks the right answers,
    its scores are the scorer's own, and a second report reuses them from scores.json."""
    from agentrl.learners.dpo import PreferenceConversation
    from agentrl.learners.reward_model import RewardModelConfig, train_reward_model
    from agentrl.rewards.learned import RewardModelScorer

    rng = random.Random(1)
    pairs = []
    for _ in range(32):
        question = [{"role": "user", "content": f"What is {rng.randint(1, 50)} + {rng.randint(1, 50)}?"}]
        value = rng.randint(1, 99)
        pairs.append(PreferenceConversation(question, [{"role": "assistant", "content": f"sure \\boxed{{{value}}}"}],
                                            [{"role": "assistant", "content": f"maybe \\boxed{{{value}}}"}]))  # fmt: skip
    with torch_threads(1):
        trained = train_reward_model(
            RewardModelConfig(max_steps=12, warmup_steps=0, lr=3e-3, output_dir=tmp_path / "rm"), pairs
        )
    checkpoint = trained.checkpoint
    assert checkpoint is not None
    spec = f"rm:{checkpoint}"
    code, stdout, stderr = eval_cli("--report-only", "--out", str(math_run), "--best-of-n-by", spec)
    assert code == 0, stderr
    assert "scored 24 episodes now (0 failed)" in stderr and f"best-of-N (by {spec})" in stdout
    results = results_of(math_run)
    tasks, metrics = results["tasks"], results["metrics"]
    episodes = list(read_jsonl(math_run / "episodes.jsonl"))
    fresh = RewardModelScorer.from_pretrained(checkpoint).score_conversations([e.messages for e in episodes])
    stored = {(t["task_index"], s["sample"]): s["score"] for t in tasks for s in t["samples"]}
    keys = [(e.meta["task_index"], e.meta["sample_index"]) for e in episodes]
    assert [stored[key] for key in keys] == pytest.approx(fresh, abs=1e-5)
    for k in ("1", "2", "4"):
        best_T = [float(brute_best_of_n(candidates_of(t), int(k))) for t in tasks]
        assert metrics["best_of_n"][k]["value"] == pytest.approx(sum(best_T) / N_TASKS, abs=1e-12)
    print(f"pass@1 {metrics['pass_at_k']['1']['value']:.3f}, best-of-4 by the RM {metrics['best_of_n']['4']['value']:.3f}, "
          f"pass@4 {metrics['pass_at_k']['4']['value']:.3f}")  # fmt: skip
    assert metrics["best_of_n"]["4"]["value"] > metrics["pass_at_k"]["1"]["value"]
    # The same scorer again: every score from scores.json, none asked for; an edited kept score is used.
    kept = json.loads((math_run / SCORES_FILE).read_text())
    assert len(kept["sources"][spec]) == 24
    code, _, stderr = eval_cli("--report-only", "--out", str(math_run), "--best-of-n-by", spec)
    assert code == 0 and "every score from" in stderr and "scored" not in stderr
    assert results_of(math_run)["metrics"]["best_of_n"] == metrics["best_of_n"]
    task = next(t for t in tasks if t["best_of_n"]["4"] > 0 and t["passed"] < K)
    lift = next((task["task_index"], s["sample"]) for s in task["samples"] if not s["passed"])
    kept["sources"][spec][f"{lift[0]}/{lift[1]}"]["score"] = 1e6  # a failing sample now always wins its task
    (math_run / SCORES_FILE).write_text(json.dumps(kept))
    code, _, stderr = eval_cli("--report-only", "--out", str(math_run), "--best-of-n-by", spec)
    assert code == 0 and "every score from" in stderr
    assert results_of(math_run)["metrics"]["best_of_n"]["4"]["value"] < metrics["best_of_n"]["4"]["value"]


def test_a_scorer_that_cannot_work_fails_before_any_episode_is_played(tmp_path):
    for spec, message in ((f"rm:{tmp_path}", "not a trained reward model"),
                          (f"judge:{tmp_path / 'missing.yaml'}", "does not exist")):  # fmt: skip
        out = tmp_path / spec.split(":")[0]
        with pytest.raises(ConfigError, match=message):
            evaluate(EvalConfig(env="toy-digits", model="tiny", n=2, k=1, best_of_n_by=spec, out=out),
                     echo=lambda line: None, show_progress=False)  # fmt: skip
        assert not (out / "episodes.jsonl").exists()
