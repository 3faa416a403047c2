"""The trajectory buffer: filters, batches (padded and packed), JSONL, preference pairs, logprob mismatch."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from agentrl.data.buffer import (
    TrajectoryBuffer,
    TrajectoryGroup,
    collate,
    drop_zero_variance,
    is_overlong,
    logprob_mismatch,
    mine_pair,
    soft_overlong_penalty,
)
from agentrl.data.trajectory import LedgerBuilder
from agentrl.errors import ConfigError
from agentrl.models.loading import load_tokenizer
from agentrl.rollout.runner import rollout
from agentrl.testing import ScriptedPolicy
from agentrl.types import StopReason


def make(turns, *, prompt=(1, 2, 3), obs=(9, 9), stop=StopReason.TERMINATED, finish=None, trainable=True, **meta):
    """A trajectory from ``[(sampled ids, reward), ...]``: prompt, then turns separated by ``obs``."""
    ledger = LedgerBuilder(prompt, [{"role": "user", "content": "task"}])
    for n, (ids, reward) in enumerate(turns):
        ledger.add_sampled(ids, [-0.5] * len(ids))
        ledger.set_reward(reward, {"r": reward})
        ledger.add_messages([{"role": "assistant", "content": " ".join(map(str, ids))}])
        if n + 1 < len(turns):
            ledger.add_observation(obs)
            ledger.add_messages([{"role": "tool", "content": "obs"}])
    meta = {"finish_reasons": finish or ["stop"] * len(turns), **meta}
    return ledger.finish(stop, trainable=trainable, meta=meta)


def group(name, *rewards):
    return TrajectoryGroup(name, tuple(make([((5 + i, 6), r)]) for i, r in enumerate(rewards)))


# ---------------------------------------------------------------------------------------------- filters
def test_zero_variance_groups_are_dropped():
    groups = [group("mixed", 0.0, 1.0), group("all-right", 1.0, 1.0), group("alone", 1.0), group("close", 0.5, 0.5 + 1e-9)]
    assert [g.group_id for g in drop_zero_variance(groups)] == ["mixed"]
    buffer = TrajectoryBuffer(groups)
    assert buffer.filter_zero_variance() == 5 and [g.group_id for g in buffer.groups] == ["mixed"]
    assert groups[0].rewards_G.tolist() == [0.0, 1.0] and groups[0].reward_std == 0.5


@pytest.mark.parametrize(
    ("length", "factor", "expected"),
    [(80, 1.0, 0.0), (0, 1.0, 0.0), (90, 1.0, -0.5), (95, 2.0, -1.5), (100, 1.0, -1.0), (150, 1.0, -1.0)],
)
def test_soft_overlong_penalty_by_hand(length, factor, expected):
    assert soft_overlong_penalty(length, max_length=100, cache=20, factor=factor) == pytest.approx(expected)


def test_overlong_filter_and_penalty():
    clean = make([((5, 6), 1.0)])
    cut_by_turn_cap = make([((5, 6), 1.0)], finish=["length"])
    budget = make([((5, 6), 0.0)], stop=StopReason.MAX_TOKENS)
    overflow = make([((5, 6), 0.0)], stop=StopReason.CONTEXT_OVERFLOW)
    assert [is_overlong(t) for t in (clean, cut_by_turn_cap, budget, overflow)] == [False, True, True, True]
    buffer = TrajectoryBuffer([TrajectoryGroup("g", (clean, cut_by_turn_cap)), TrajectoryGroup("h", (budget,))])
    assert buffer.filter_overlong() == 2 and buffer.trajectories() == [clean]

    long = make([((5,) * 6, 1.0), ((6,) * 4, 2.0)])  # 10 sampled tokens
    buffer = TrajectoryBuffer([TrajectoryGroup("g", (long, clean))])
    buffer.apply_overlong_penalty(max_length=12, cache=4)
    penalised, untouched = buffer.groups[0].trajectories
    assert penalised.turns[-1].reward == pytest.approx(2.0 - 0.5)
    assert penalised.turns[-1].reward_components == {"r": 2.0, "overlong": -0.5}
    assert penalised.turns[0] == long.turns[0] and untouched == clean
    with pytest.raises(ConfigError, match="cache"):
        soft_overlong_penalty(5, max_length=10, cache=11)


# ---------------------------------------------------------------------------------------------- batches
def test_padded_batch_by_dimension():
    a = make([((5, 6), 0.5), ((7,), 1.0)])  # 3 + 2 + 2 + 1 = 8 tokens
    b = make([((8,), -1.0)], prompt=(1,))  # 2 tokens
    batch = collate([a, b], pad_id=0)
    assert batch.shape == (2, 8) and batch.num_tokens == 10
    assert batch.token_ids_B_T.tolist() == [[1, 2, 3, 5, 6, 9, 9, 7], [1, 8, 0, 0, 0, 0, 0, 0]]
    assert batch.loss_mask_B_T.tolist() == [[0, 0, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.attention_mask_B_T.tolist() == [[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.sampler_logprobs_B_T[0].tolist() == [0, 0, 0, -0.5, -0.5, 0, 0, -0.5]
    assert batch.turn_rewards_B_T.tolist() == [[0, 0, 0, 0, 0.5, 0, 0, 1.0], [0, -1.0, 0, 0, 0, 0, 0, 0]]
    assert batch.rewards_B.tolist() == [1.5, -1.0]
    assert batch.segment_ids_B_T.tolist() == [[0] * 8, [1, 1, -1, -1, -1, -1, -1, -1]]
    tensors = batch.to_torch()
    assert tensors.token_ids_B_T.dtype == torch.int64 and tensors.sampler_logprobs_B_T.dtype == torch.float32
    assert torch.equal(tensors.loss_mask_B_T, torch.as_tensor(batch.loss_mask_B_T))


def test_packed_batch_holds_every_trajectory_once_with_restarting_positions():
    trajectories = [make([((5,) * n, float(n))], prompt=(1,) * (10 - n)) for n in (1, 2, 3)] + [
        make([((6,) * k, 1.0)], prompt=(2,)) for k in (2, 3, 4)
    ]
    lengths = [len(t.token_ids) for t in trajectories]  # 10, 10, 10, 3, 4, 5
    batch = collate(trajectories, packing=True, row_tokens=14)
    padded = collate(trajectories)
    assert batch.shape[1] <= 14 and batch.shape[0] < len(trajectories)
    assert batch.token_ids_B_T.size < padded.token_ids_B_T.size and batch.num_tokens == sum(lengths)
    for i, trajectory in enumerate(trajectories):
        rows, cols = np.nonzero(batch.segment_ids_B_T == i)
        assert len(set(rows)) == 1 and cols.tolist() == list(range(cols[0], cols[0] + lengths[i]))
        row = rows[0]
        assert batch.token_ids_B_T[row, cols].tolist() == list(trajectory.token_ids)
        assert batch.loss_mask_B_T[row, cols].tolist() == list(trajectory.loss_mask)
        assert batch.position_ids_B_T[row, cols].tolist() == list(range(lengths[i]))
    with pytest.raises(ConfigError, match="does not fit"):
        collate(trajectories, packing=True, row_tokens=5)


def test_minibatches_cover_trainable_trajectories_once_reproducibly():
    groups = [group(f"g{i}", 0.0, 1.0, 0.5) for i in range(3)]
    groups.append(TrajectoryGroup("api", (make([((5,), 1.0)], trainable=False),)))
    buffer = TrajectoryBuffer(groups)
    batches = list(buffer.minibatches(4, seed=1))
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    seen = [t for b in batches for t in b.trajectories]
    assert sorted(map(id, seen)) == sorted(id(t) for g in groups[:3] for t in g)
    assert [t for b in buffer.minibatches(4, seed=1) for t in b.trajectories] == seen
    assert [t for b in buffer.minibatches(4, seed=2) for t in b.trajectories] != seen
    with pytest.raises(ConfigError, match="batch_size"):
        next(buffer.minibatches(0))


# ---------------------------------------------------------------------------------------------- persistence
def test_jsonl_round_trip_keeps_groups(tmp_path):
    buffer = TrajectoryBuffer([group("a", 0.0, 1.0), group("b", 1.0, 1.0, 0.25)])
    path = tmp_path / "buffer.jsonl"
    assert buffer.save(path) == 5
    back = TrajectoryBuffer.load(path)
    assert [g.group_id for g in back.groups] == ["a", "b"]
    assert [[t.token_ids for t in g] for g in back.groups] == [[t.token_ids for t in g] for g in buffer.groups]
    assert [g.rewards_G.tolist() for g in back.groups] == [[0.0, 1.0], [1.0, 1.0, 0.25]]
    assert all(t.meta["group_id"] == g.group_id for g in back.groups for t in g)
    buffer.save(path, append=True)
    assert len(TrajectoryBuffer.load(path)) == 10


# ---------------------------------------------------------------------------------------------- pairs
def test_pairs_split_at_the_first_divergent_turn():
    best = make([((5, 6), 0.0), ((7, 7), 1.0), ((8,), 1.0)])
    worst = make([((5, 6), 0.0), ((7, 4, 4), 0.0)])
    middle = make([((5, 6), 0.0), ((7, 7), 0.5)])
    pair = mine_pair(TrajectoryGroup("g", (worst, best, middle)))
    assert pair is not None and pair.chosen is best and pair.rejected is worst
    assert (pair.split_turn, pair.prefix_length, pair.margin) == (1, best.turns[1].start, 2.0)
    assert best.token_ids[: pair.prefix_length] == worst.token_ids[: pair.prefix_length]
    assert pair.completion_mask("chosen") == [0] * 7 + [1, 1, 0, 0, 1]
    assert pair.completion_mask("rejected") == [0] * 7 + [1, 1, 1]
    messages = pair.to_messages()
    assert [m["content"] for m in messages["prompt"]] == ["task", "5 6", "obs"]
    assert [m["content"] for m in messages["chosen"]] == ["7 7", "obs", "8"]
    assert [m["content"] for m in messages["rejected"]] == ["7 4 4"]


def test_no_pair_without_a_margin_or_a_divergent_turn():
    same = make([((5, 6), 1.0)])
    assert mine_pair(TrajectoryGroup("tie", (same, make([((5, 7), 1.0)])))) is None
    assert mine_pair(TrajectoryGroup("one", (same,))) is None
    # A crashed episode's low reward is not the policy's doing: it is never the rejected side.
    crashed = make([((5, 8), 0.0)], stop=StopReason.ERROR)
    assert mine_pair(TrajectoryGroup("crash", (same, crashed))) is None
    prefix = TrajectoryGroup("prefix", (make([((5, 6), 1.0), ((7,), 1.0)]), make([((5, 6), 0.0)])))
    assert mine_pair(prefix) is None
    assert mine_pair(group("small", 0.0, 0.1), min_margin=0.2) is None


def test_pairs_from_real_runner_groups():
    tokenizer = load_tokenizer("tiny")
    calls = itertools.count()

    def reply(prompt):  # sample 0 answers every turn right; sample 1 gets its second turn wrong
        n = next(calls)
        return "wrong" if n == 4 else re.findall(r"Say: (\w+)", prompt)[-1]

    groups = rollout("toy-echo-v0", ScriptedPolicy(tokenizer, reply), tokenizer, 1, group_size=2, concurrency=1)
    buffer = TrajectoryBuffer(groups)
    [pair] = buffer.preference_pairs()
    assert pair.chosen.total_reward == 3.0 and pair.rejected.total_reward == 2.0 and pair.split_turn == 1
    chosen_text = tokenizer.decode([t for t, m in zip(pair.chosen.token_ids, pair.completion_mask("chosen"), strict=True) if m])
    rejected_text = tokenizer.decode(
        [t for t, m in zip(pair.rejected.token_ids, pair.completion_mask("rejected"), strict=True) if m]
    )
    assert rejected_text.startswith("wrong<|im_end|>") and not chosen_text.startswith("wrong")


# ---------------------------------------------------------------------------------------------- mismatch
def test_logprob_mismatch_by_hand_for_numpy_and_torch():
    sampler = [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
    learner = [[-1.5, -2.0, -9.0], [-0.25, 0.0, 0.0]]
    mask = [[1, 1, 0], [1, 0, 0]]
    log_ratio = np.array([-0.5, 0.0, 0.25])
    k3 = float(np.mean(np.exp(log_ratio) - 1 - log_ratio))
    for convert in (np.array, torch.tensor):
        stats = logprob_mismatch(convert(sampler), convert(learner), convert(mask))
        assert stats.tokens == 3 and stats.max_abs == 0.5
        assert stats.mean_abs == pytest.approx(0.75 / 3) and stats.k3_kl == pytest.approx(k3) and k3 > 0
    buffer = TrajectoryBuffer()
    buffer.record_mismatch(torch.tensor(sampler, dtype=torch.bfloat16), torch.tensor(learner), torch.tensor(mask))
    buffer.record_mismatch(np.array(sampler), np.array(sampler), np.array(mask))
    assert [s.k3_kl for s in buffer.mismatch_history] == [pytest.approx(k3, abs=1e-6), 0.0]
    assert logprob_mismatch(np.zeros(2), np.ones(2), np.zeros(2)).tokens == 0
    with pytest.raises(ValueError, match="shapes"):
        logprob_mismatch(np.zeros(2), np.zeros(3), np.zeros(2))
    assert math.isfinite(buffer.mismatch_history[0].mean_abs)
