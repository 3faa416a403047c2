"""Shared training pieces: atomic checkpoints, resume state, RNG round trips, the LR schedule."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from agentrl.errors import ConfigError
from agentrl.learners import checkpoints, optim
from agentrl.models.loading import load_model, load_tokenizer


@pytest.fixture
def model():
    return load_model("tiny")


def test_save_writes_a_loadable_resumable_checkpoint_and_replaces_an_old_one(tmp_path, model):
    tokenizer = load_tokenizer("tiny")
    optimizer = optim.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    scheduler = optim.make_scheduler(optimizer, 2, 10, 0.1)
    path = checkpoints.save_checkpoint(
        tmp_path / "ck", model, tokenizer, optimizer=optimizer, scheduler=scheduler, step=1
    )
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    checkpoints.save_checkpoint(path, model, tokenizer, optimizer=optimizer, scheduler=scheduler, step=2)
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)
    assert checkpoints.load_training_state(path).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporaries left


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, model):
    tokenizer = load_tokenizer("tiny")
    path = checkpoints.save_checkpoint(tmp_path / "ck", model, tokenizer, step=1)
    before = load_model(path).lm_head.weight.clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    class CrashingTokenizer:  # the weights are already written when this raises
        def save_pretrained(self, directory):
            assert any(p.suffix == ".safetensors" for p in directory.iterdir())
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, model, CrashingTokenizer(), step=2)
    assert torch.equal(load_model(path).lm_head.weight, before)
    assert checkpoints.load_training_state(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # A crash while writing a *new* checkpoint leaves no directory that looks like one.
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(checkpoints.step_dir(tmp_path, 5), model, CrashingTokenizer())
    assert checkpoints.checkpoint_dirs(tmp_path) == []


def test_the_next_save_removes_what_a_killed_write_left_behind(tmp_path, model):
    # A SIGKILL between mkdtemp and the rename leaves a whole checkpoint in a hidden temporary; the run's next
    # checkpoint (after a resume, say) removes it, and keep_last still holds.
    from agentrl.learners.config import TrainConfig

    leftover = tmp_path / ".step-000002.tmp-k1ll3d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / ".step-000001.tmp-abc-old").mkdir()
    config = TrainConfig(output_dir=tmp_path, keep_last=1, warmup_steps=0)
    tokenizer = load_tokenizer("tiny")
    optimizer = optim.make_optimizer(model, lr=1e-3)
    for step in (3, 4):
        checkpoints.save_step(config, model, tokenizer, optimizer, None, step, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_resume_state_restores_optimizer_scheduler_step_and_rng(tmp_path, model):
    optimizer = optim.make_optimizer(model, lr=1e-2)
    scheduler = optim.make_scheduler(optimizer, 1, 5, 0.0)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    optim.seed_everything(7)
    path = checkpoints.save_checkpoint(tmp_path / "ck", model, optimizer=optimizer, scheduler=scheduler, step=1)
    expected = (torch.rand(3), random.random())

    fresh = load_model(path)
    optimizer2 = optim.make_optimizer(fresh, lr=1e-2)
    scheduler2 = optim.make_scheduler(optimizer2, 1, 5, 0.0)
    optim.seed_everything(99)
    state = checkpoints.load_training_state(path, optimizer2, scheduler2)
    assert state.step == 1
    assert (torch.rand(3).tolist(), random.random()) == (expected[0].tolist(), expected[1])
    assert (
        scheduler2.last_epoch == scheduler.last_epoch
        and optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    )
    first = next(iter(optimizer.state.values()))
    second = next(iter(optimizer2.state.values()))
    assert torch.equal(first["exp_avg_sq"], second["exp_avg_sq"])


def test_resuming_from_a_plain_model_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"has no training_state\.pt"):
        checkpoints.load_training_state(tmp_path)


def test_warmup_cosine_on_hand_computed_points():
    assert optim.warmup_cosine(0, 4, 14, 0.1) == pytest.approx(0.25)
    assert optim.warmup_cosine(3, 4, 14, 0.1) == pytest.approx(1.0)
    assert optim.warmup_cosine(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert optim.warmup_cosine(9, 4, 14, 0.1) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert optim.warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert optim.warmup_cosine(40, 4, 14, 0.1) == pytest.approx(0.1)
    assert optim.warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)


def test_a_time_budget_moves_the_schedule_when_the_time_runs_ahead_of_the_steps(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(optim.time, "perf_counter", lambda: clock[0])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = optim.make_scheduler(optimizer, 0, 100, 0.1, max_seconds=10.0)
    optimizer.step()
    clock[0] = 105.0  # one step, half the time: the rate of step 50
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optim.warmup_cosine(50, 0, 100, 0.1))
    optimizer.step()
    clock[0] = 130.0  # past the budget: the final rate
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)

    clock[0] = 200.0
    fast = optim.make_scheduler(optimizer, 0, 100, 0.1, max_seconds=10.0)
    for _ in range(20):  # 20 steps in 1 s: the steps lead the time (10%)
        optimizer.step()
        fast.step()
    clock[0] = 201.0
    optimizer.step()
    fast.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optim.warmup_cosine(21, 0, 100, 0.1))


def test_weight_decay_skips_one_dimensional_parameters(model):
    groups = optim.make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_batches_depend_only_on_seed_and_step():
    straight = optim.iterate_batches(10, 4, seed=3)
    first = [next(straight) for _ in range(7)]
    resumed = optim.iterate_batches(10, 4, seed=3, start_step=4)
    assert [next(resumed) for _ in range(3)] == first[4:]
    assert sorted(i for b in first[:3] for i in b) == list(range(10))  # an epoch covers every row once


def test_length_grouped_batches_pad_less_and_still_cover_every_row_once():
    lengths = torch.randint(10, 400, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    per_epoch = 1000 // 8

    def epoch(batches):
        return [next(batches) for _ in range(per_epoch)]

    def padding(epoch_batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in epoch_batches)

    grouped = epoch(optim.iterate_batches(1000, 8, seed=3, lengths=lengths))
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert padding(grouped) < 0.2 * padding(epoch(optim.iterate_batches(1000, 8, seed=3)))
    # The batches of an epoch come in a shuffled order, not from the shortest up.
    assert [max(lengths[i] for i in b) for b in grouped] != sorted(max(lengths[i] for i in b) for b in grouped)
    straight = optim.iterate_batches(1000, 8, seed=3, lengths=lengths)
    first = [next(straight) for _ in range(per_epoch + 5)]
    resumed = optim.iterate_batches(1000, 8, seed=3, start_step=per_epoch - 2, lengths=lengths)
    assert [next(resumed) for _ in range(7)] == first[per_epoch - 2 :]
    with pytest.raises(ValueError, match="3 lengths for 1000 rows"):
        next(optim.iterate_batches(1000, 8, seed=3, lengths=[1, 2, 3]))


def test_autocast_rejects_an_unknown_precision():
    with pytest.raises(ConfigError, match="'fp32', 'bf16'"):
        optim.autocast("fp8", "cpu")


def test_importing_the_learners_package_imports_no_torch():
    code = "import sys, agentrl.learners; print('torch' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_checkpoint_cut_short_is_told_from_a_whole_one_without_loading_it(tmp_path, model):
    path = checkpoints.save_checkpoint(tmp_path / "ck", model, load_tokenizer("tiny"), step=3)
    assert checkpoints.checkpoint_problem(path) is None
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    assert "model.safetensors is truncated" in checkpoints.checkpoint_problem(path)
    weights.write_bytes(whole)
    state = path / checkpoints.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    assert "training_state.pt is damaged" in checkpoints.checkpoint_problem(path)
