"""Reward and process reward models: the losses by hand, learning on synthetic labels, where the head reads,
save/load through the scorers, the rewards interface, resume, and data errors."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_threads

from agentrl.data.buffer import PreferencePair
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints
from agentrl.learners.dpo import LabelledConversation, PreferenceConversation
from agentrl.learners.reward_model import (
    ProcessRewardConfig,
    RewardModelConfig,
    StepLabelledConversation,
    bradley_terry_loss,
    read_step_labels_jsonl,
    step_bce_loss,
    train_process_reward_model,
    train_reward_model,
)
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.models.loading import load_tokenizer
from agentrl.models.value_head import ValueModel
from agentrl.rewards import RewardSpec, WeightedReward
from agentrl.rewards.learned import ProcessRewardScorer, RewardModelScorer, default_to_messages, step_ends
from agentrl.toolenv import Task, ToolEnv

WORDS = "the a cat dog sun moon red blue runs sits big small tree river".split()


def marker_pairs(n: int, seed: int) -> list[PreferenceConversation]:
    """The same random words in both answers, with ``yes`` (chosen) or ``no`` (rejected) somewhere inside."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        k = rng.randint(0, len(words))
        good, bad = [*words[:k], "yes", *words[k:]], [*words[:k], "no", *words[k:]]
        out.append(
            PreferenceConversation(
                [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(5))}],
                [{"role": "assistant", "content": " ".join(good)}],
                [{"role": "assistant", "content": " ".join(bad)}],
            )
        )
    return out


def step_examples(n: int, seed: int) -> list[StepLabelledConversation]:
    """One or two assistant turns (a tool result between) of 1-3 steps; a step is good iff it says ``ok``
    (bad ones say ``oops``), anywhere in the step. Tool results mention both words at random."""
    rng = random.Random(seed)

    def step(good: bool) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), "ok" if good else "oops")
        return " ".join(words)

    out = []
    for _ in range(n):
        messages = [{"role": "user", "content": "solve " + " ".join(rng.choice(WORDS) for _ in range(4))}]
        labels: list[float | None] = []
        for turn in range(rng.randint(1, 2)):
            if turn:
                noise = " ".join(rng.choice([*WORDS, "ok", "oops"]) for _ in range(5))
                messages.append({"role": "tool", "content": noise})
            good = [rng.random() < 0.5 for _ in range(rng.randint(1, 3))]
            messages.append({"role": "assistant", "content": "\n\n".join(step(g) for g in good)})
            labels += [float(g) for g in good]
        out.append(StepLabelledConversation(messages, labels))
    return out


def conversations(pairs: list[PreferenceConversation], side: str) -> list[list]:
    return [[*p.prompt, *getattr(p, side)] for p in pairs]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    config = RewardModelConfig(
        max_steps=12, warmup_steps=0, lr=3e-3, output_dir=tmp_path_factory.mktemp("rm")
    )
    with torch_threads(1):
        return train_reward_model(config, marker_pairs(64, seed=0))


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
    config = ProcessRewardConfig(max_steps=24, warmup_steps=0, lr=3e-3, step_separator="\n\n",
                                 output_dir=tmp_path_factory.mktemp("prm"))  # fmt: skip
    with torch_threads(1):
        return train_process_reward_model(config, step_examples(64, seed=0))


# ---- the losses by hand -------------------------------------------------------------------------
def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1, -1, 0
    expected = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(2)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([0.313262, 1.313262, 0.693147], abs=1e-6)
    # A margin of 0.5 on the first pair: d = 0.5; centring adds 0.1 * (r_c + r_r)^2 = 0.1, 0.1, 1.6.
    margin = torch.tensor([0.5, 0.0, 0.0])
    got = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1).tolist()
    assert got == pytest.approx([math.log(1 + math.exp(-0.5)) + 0.1, expected[1] + 0.1, expected[2] + 1.6])


def test_step_bce_loss_by_hand():
    logits, labels = torch.tensor([0.0, 2.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 1.0, 0.5])
    expected = [math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-2)),
                0.5 * math.log(1 + math.exp(1)) + 0.5 * math.log(1 + math.exp(-1))]  # fmt: skip
    assert step_bce_loss(logits, labels).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[:3] == pytest.approx([0.693147, 2.126928, 0.126928], abs=1e-6)


def test_the_first_step_loss_is_the_formula_at_zero_scores(tokenizer):
    """The head starts at zero, so the first logged loss is the loss of all-zero scores: with mined pairs
    whose reward gaps are 1 and 3 and margin_scale 0.5, mean(-log sigmoid(-0.5), -log sigmoid(-1.5))."""
    renderer = ChatRenderer(tokenizer)
    mined = []
    for pair, gap in zip(marker_pairs(2, seed=5), (1.0, 3.0), strict=True):
        chosen = demonstration_ledger(renderer, [*pair.prompt, *pair.chosen])
        rejected = demonstration_ledger(renderer, [*pair.prompt, *pair.rejected])
        chosen = dataclasses.replace(chosen, turns=[dataclasses.replace(chosen.turns[0], reward=gap)])
        mined.append(PreferencePair(chosen, rejected, 0, chosen.turns[0].start))
    config = RewardModelConfig(max_steps=1, warmup_steps=0, batch_size=2, margin_scale=0.5)
    (log,) = train_reward_model(config, mined).history
    assert log.loss == pytest.approx(float(-(F.logsigmoid(torch.tensor([-0.5, -1.5]))).mean()), rel=1e-6)
    assert (log.accuracy, log.margin) == (0.0, 0.0)


# ---- learning -------------------------------------------------------------------------------------
def test_the_reward_model_ranks_held_out_pairs(rm_run, tokenizer):
    held_out = marker_pairs(40, seed=1)
    start = RewardModelScorer(ValueModel.from_pretrained("tiny"), tokenizer)
    trained = RewardModelScorer(rm_run.model, rm_run.tokenizer)

    def accuracy(scorer):
        chosen = scorer.score_conversations(conversations(held_out, "chosen"))
        rejected = scorer.score_conversations(conversations(held_out, "rejected"))
        return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(held_out)

    before, after = accuracy(start), accuracy(trained)
    print(f"held-out pairwise accuracy {before:.2f} -> {after:.2f}")
    assert before == 0.0  # a zero head scores every conversation 0: no pair is ranked
    assert after >= 0.9
    assert rm_run.history[0].loss == pytest.approx(math.log(2), rel=1e-6)
    assert rm_run.history[-1].loss < 0.3
    assert rm_run.extras == {"num_examples": 64, "num_too_long": 0}


def test_the_process_reward_model_learns_step_labels(prm_run):
    scorer = ProcessRewardScorer(prm_run.model, prm_run.tokenizer, separator="\n\n")
    right = total = 0
    for example in step_examples(40, seed=1):
        scores = [s for turn in scorer.step_scores(example.messages) for s in turn]
        assert len(scores) == len(example.labels)
        right += sum((s > 0.5) == (label == 1.0) for s, label in zip(scores, example.labels, strict=True))
        total += len(scores)
    print(f"held-out step accuracy {right / total:.3f} over {total} steps")
    assert right / total >= 0.9
    assert prm_run.history[0].loss == pytest.approx(math.log(2), rel=1e-6)
    assert prm_run.extras == {"num_examples": 64, "num_too_long": 0}


def test_pairs_longer_than_max_seq_len_are_dropped_and_counted(tokenizer):
    pairs, renderer = marker_pairs(8, seed=6), ChatRenderer(tokenizer)
    last = [max(demonstration_ledger(renderer, [*p.prompt, *side]).turns[-1].last_token
                for side in (p.chosen, p.rejected)) for p in pairs]  # fmt: skip
    limit = sorted(last)[len(last) // 2]
    result = train_reward_model(RewardModelConfig(max_steps=1, warmup_steps=0, max_seq_len=limit), pairs)
    too_long = sum(x >= limit for x in last)
    assert 0 < too_long < len(pairs) and result.extras == {"num_examples": 8 - too_long, "num_too_long": too_long}


# ---- where the head reads -----------------------------------------------------------------------
def test_each_step_is_scored_at_the_token_ending_it(tokenizer):
    renderer = ChatRenderer(tokenizer)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Step one.\n\nStep two\n\n\n\nthree"},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "<answer>5</answer>"},
    ]
    ledger, ends = step_ends(renderer, messages, "\n\n")
    text = [tokenizer.decode(ledger.token_ids[: e + 1]) for turn in ends for e in turn]
    assert [len(turn) for turn in ends] == [3, 1]
    # Each step ends with its separator (here the token ".\n\n", then the first of two "\n\n" tokens).
    assert text[0].endswith("assistant\nStep one.\n\n") and text[1].endswith("one.\n\nStep two\n\n")
    assert text[2].endswith("three<|im_end|>") and text[3].endswith("<answer>5</answer><|im_end|>")
    assert len(ledger.token_ids) == ends[-1][-1] + 1  # the ledger stops at the last assistant token
    _, per_turn = step_ends(renderer, messages, None)
    assert per_turn == [[ends[0][-1]], [ends[1][-1]]]


def test_later_messages_and_padding_do_not_move_a_score(rm_run, prm_run):
    rm = RewardModelScorer(rm_run.model, rm_run.tokenizer)
    conversation = conversations(marker_pairs(1, seed=7), "chosen")[0]
    later = [{"role": "tool", "content": "yes yes yes"}, {"role": "user", "content": "no"}]
    longer = [*conversation, {"role": "assistant", "content": "yes " * 30}]
    alone, with_later = rm.score_conversations([conversation, [*conversation, *later]])
    batched = rm.score_conversations([conversation, longer])[0]  # right-padded beside a longer row
    assert with_later == pytest.approx(alone, abs=1e-5)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert alone != rm.score_conversations([longer])[0]

    prm = ProcessRewardScorer(prm_run.model, prm_run.tokenizer, separator="\n\n")
    example = step_examples(30, seed=2)
    first = next(e for e in example if len([m for m in e.messages if m["role"] == "assistant"]) == 2)
    cut = next(i for i, m in enumerate(first.messages) if m["role"] == "assistant") + 1
    head, full = prm.step_scores(first.messages[:cut]), prm.step_scores(first.messages)
    assert full[0] == pytest.approx(head[0], abs=1e-5)  # the tool result and next turn come after


# ---- scorers: save, load, and the rewards interface --------------------------------------------
def test_a_saved_model_scores_the_same_through_from_pretrained(rm_run, prm_run, tmp_path):
    assert rm_run.checkpoint is not None and (rm_run.checkpoint / "value_head.safetensors").is_file()
    texts = conversations(marker_pairs(6, seed=3), "chosen") + conversations(
        marker_pairs(6, seed=3), "rejected"
    )
    live = RewardModelScorer(rm_run.model, rm_run.tokenizer).score_conversations(texts)
    loaded = RewardModelScorer.from_pretrained(rm_run.checkpoint, batch_size=5).score_conversations(texts)
    assert loaded == pytest.approx(live, abs=1e-6)
    assert len(set(live)) > 1

    prm = ProcessRewardScorer.from_pretrained(prm_run.checkpoint)  # the separator comes from the checkpoint
    assert prm.separator == "\n\n"
    example = step_examples(1, seed=4)[0]
    live_steps = ProcessRewardScorer(prm_run.model, prm_run.tokenizer, separator="\n\n").step_scores(
        example.messages
    )
    loaded_steps = prm.step_scores(example.messages)
    assert [len(t) for t in loaded_steps] == [len(t) for t in live_steps]
    flat = [s for turn in live_steps for s in turn]
    assert [s for turn in loaded_steps for s in turn] == pytest.approx(flat, abs=1e-6)

    with pytest.raises(ConfigError, match=r"holds a process-reward-model; load it with ProcessRewardScorer"):
        RewardModelScorer.from_pretrained(prm_run.checkpoint)
    with pytest.raises(ConfigError, match=r"has no value_head.safetensors, so it is not a trained reward"):
        RewardModelScorer.from_pretrained("tiny")


def test_the_scorers_are_named_components_of_a_weighted_reward(rm_run, prm_run):
    rm = RewardModelScorer(rm_run.model, rm_run.tokenizer, name="rm")
    task = Task("red cat sun", answer="dog")
    reward = WeightedReward([RewardSpec("correct", lambda t, a: float(a == t.answer)),
                             RewardSpec("rm", rm, weight=0.5)])  # fmt: skip
    result = reward(task, "the dog yes runs")
    (expected,) = rm.score_conversations([default_to_messages(task, "the dog yes runs")])
    assert result.components == {"correct": 0.0, "rm": pytest.approx(0.5 * expected, abs=1e-6)}
    assert result.score == pytest.approx(0.5 * expected, abs=1e-6)
    assert rm(task, default_to_messages(task, "the dog yes runs")).score == pytest.approx(expected, abs=1e-6)
    assert rm("red cat sun", "the dog yes runs").score == pytest.approx(expected, abs=1e-6)  # a str task: its prompt

    def echo(text: str) -> str:
        """Echo text."""
        return text

    prm = ProcessRewardScorer(prm_run.model, prm_run.tokenizer, separator="\n\n")
    env = ToolEnv([echo], [task], lambda t, a: 0.0,
                  process_reward=WeightedReward([RewardSpec("prm", prm, weight=2.0)]))  # fmt: skip
    env.reset(seed=0)
    call = '<tool_call>\n{"name": "echo", "arguments": {"text": "ok"}}\n</tool_call>'
    first = env.step(f"the cat ok\n\nsun oops\n\n{call}")
    second = env.step("<answer>dog</answer> ok")
    transcript = [{"role": "user", "content": "red cat sun"},
                  {"role": "assistant", "content": f"the cat ok\n\nsun oops\n\n{call}"}]  # fmt: skip
    steps = prm.step_scores(transcript)[-1]
    assert len(steps) == 3
    assert first.info["reward_components"]["prm"] == pytest.approx(2.0 * min(steps), abs=1e-6)
    transcript += [
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "<answer>dog</answer> ok"},
    ]
    (last,) = prm.step_scores(transcript)[-1]
    assert second.info["reward_components"]["prm"] == pytest.approx(2.0 * last, abs=1e-6)


# ---- checkpoints ----------------------------------------------------------------------------------
def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    common = {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "lr": 3e-3, "center_coef": 0.01}
    pairs = marker_pairs(10, seed=0)
    straight = train_reward_model(RewardModelConfig(**common), pairs)
    train_reward_model(RewardModelConfig(**common, output_dir=tmp_path, save_every=2), pairs)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000004"]
    torch.manual_seed(12345)  # a different global RNG state: the checkpoint's must be restored
    resumed = train_reward_model(RewardModelConfig(**common, resume_from=tmp_path / "step-000002"), pairs)
    assert [log.step for log in resumed.history] == [3, 4]
    assert [log.loss for log in resumed.history] == [log.loss for log in straight.history[2:]]
    assert [log.lr for log in resumed.history] == [log.lr for log in straight.history[2:]]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


# ---- data and configuration errors --------------------------------------------------------------
def test_read_step_labels_jsonl_reads_records_and_null_labels(tmp_path):
    user = {"role": "user", "content": "hi"}
    lines = [
        {"messages": [user, {"role": "assistant", "content": "a\n\nb"}], "labels": [1, None]},
        {"messages": [user, {"role": "assistant", "content": "a"}], "labels": [True], "tools": []},
    ]
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    first, second = read_step_labels_jsonl(path, separator="\n\n")
    assert first == StepLabelledConversation((user, lines[0]["messages"][1]), (1, None))
    assert second.labels == (True,)
    with pytest.raises(ConfigError, match=r"steps.jsonl:1: 2 labels for 1 assistant turns, per turn \[1\]"):
        read_step_labels_jsonl(path)  # counted per turn, the first line has one label too many


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"steps.jsonl:2: not JSON"),
        ('{"msgs": []}', r"steps.jsonl:2: expected \{\"messages\""),
        ('{"messages": [], "labels": 1}', r"steps.jsonl:2: expected .*one label per step"),
        ('{"messages": ["hi"], "labels": []}', r"steps.jsonl:2: expected "),
        (
            '{"messages": [{"role": "assistant", "content": "a\\n\\nb\\n\\nc"}], "labels": [1, 0]}',
            r"steps.jsonl:2: 2 labels for 3 steps \(assistant messages split at '\\n\\n'\), per turn \[3\]; "
            "give one label per step",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}], "labels": [2]}',
            r"steps.jsonl:2: label 2 must",
        ),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"messages": [{"role": "assistant", "content": "x"}], "labels": [1]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_step_labels_jsonl(path, separator="\n\n")


def test_bad_data_and_settings_are_config_errors():
    wrong = StepLabelledConversation([{"role": "assistant", "content": "a\n\nb"}], [1])
    with pytest.raises(ConfigError, match=r"example 0: 1 labels for 2 steps"):
        train_process_reward_model(
            ProcessRewardConfig(max_steps=1, warmup_steps=0, step_separator="\n\n"), [wrong]
        )
    unpaired = LabelledConversation([], [{"role": "assistant", "content": "a"}], True)
    with pytest.raises(ConfigError, match=r"PreferenceConversation or PreferencePair.*loss='kto'"):
        train_reward_model(RewardModelConfig(max_steps=1, warmup_steps=0), [unpaired])
    with pytest.raises(ConfigError, match="raise max_seq_len"):
        train_reward_model(RewardModelConfig(max_steps=1, warmup_steps=0, max_seq_len=4), marker_pairs(2, 0))
    with pytest.raises(ConfigError, match=r"lora is not supported for reward models.*set lora=None"):
        RewardModelConfig(lora={"r": 4})
    with pytest.raises(ConfigError, match=r"ProcessRewardConfig.step_separator: got ''"):
        ProcessRewardConfig(step_separator="")
    with pytest.raises(ConfigError, match=r"RewardModelConfig.center_coef: got -1"):
        RewardModelConfig(center_coef=-1)
