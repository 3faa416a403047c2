"""Data-parallel GRPO on 2 processes (gloo, FSDP2) takes the very update one process takes: the same loss, the
same gradient norm, the same weights after the optimizer step, also when the ranks hold unequal token counts
and one of them is padded with a filler; a per-rank mean would not. And ``torchrun -m agentrl train`` runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.learners import data_parallel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # restores torch's threads after each test

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3
LOSS_TOL = 1e-6
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}  # float32 sums in another order (per rank, then over the ranks)
# Adam's first step is lr * g / (|g| + eps): lr * sign(g) where |g| >> eps, but where |g| is near eps (1e-8)
# it turns the gradients' rounding into a share of a step. Pinned, per optimizer step: those elements within
# 10% of a step, the others within 0.5%.
WEIGHT_TOL, WEIGHT_TOL_NEAR_EPS, WELL_CONDITIONED = 5e-3 * LR, 1e-1 * LR, 1e-6


def trajectories() -> tuple[list[Trajectory], list[np.ndarray]]:
    """Five samples of three tasks: rank 0 gets the three short ones (2-4 policy tokens), rank 1 the two long
    ones (11-14) and a filler; the advantages are fixed."""
    out = []
    for k, sampled in enumerate((2, 3, 4, 11, 14)):
        prompt = [1, 20 + k // 2, 30 + k // 2]  # task = k // 2
        ids = prompt + [(40 + 7 * k + j) % 250 + 5 for j in range(sampled)] + [6, 6] + [50 + k]
        mask = [0] * len(prompt) + [1] * sampled + [0, 0] + [1]
        turns = [TurnSpan(len(prompt), len(prompt) + sampled, 0.0), TurnSpan(len(ids) - 1, len(ids), float(k % 2))]
        out.append(Trajectory(ids, [-1.0 * m for m in mask], mask, turns))
    advantages = [(1.0 if k % 2 else -0.5) * np.asarray(t.loss_mask, dtype=np.float64) for k, t in enumerate(out)]
    return out, advantages


def one_update(settings: dict, naive: bool = False) -> dict[str, dict]:
    """One GRPO update of the tiny model on :func:`trajectories`, on this process's rank: the statistics, the
    full gradients before the optimizer step and the full weights after it (on rank 0)."""
    from agentrl.learners import grpo, optim, policy_model

    config = grpo.GRPOConfig(**{"env": "toy-digits-v0", "lr": LR, "warmup_steps": 0, "share_prompt": False,
                                "grad_clip": 1e9, **settings})  # fmt: skip
    optim.seed_everything(0)
    model, _ = policy_model.load_trainable(config)
    if data_parallel.world().size > 1:
        data_parallel.init("cpu")
        data_parallel.shard(model)
        if naive:  # what a per-rank mean does: each rank normalises by its own totals, gradients averaged
            monkeypatch_update_totals(grpo)
            data_parallel.divide_gradients(model, float(data_parallel.world().size))
    optimizer = optim.make_optimizer(model, config.lr)
    scheduler = optim.make_scheduler(optimizer, 0, 1, 1.0)
    grads: list[dict[str, torch.Tensor]] = []  # one per optimizer step

    def capture(*_: object) -> None:
        full = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # gathers: every rank calls
                for n, p in model.named_parameters()}  # fmt: skip
        grads.append({n: g.clone() for n, g in full.items()})

    optimizer.register_step_pre_hook(capture)
    data, advantages = trajectories()
    stats = grpo.update_policy(model, optimizer, scheduler, data, advantages, config, pad_id=0, seed=0)
    weights = {k: v.detach().clone() for k, v in policy_model.export_weights(model)}
    return {"stats": data_parallel.reduce_stats(stats), "grads": grads, "weights": weights}


def monkeypatch_update_totals(grpo: object) -> None:
    """Make the update normalise by this rank's totals alone (the statistics are still summed over ranks)."""

    class Local:
        def __getattr__(self, name: str) -> object:
            return getattr(data_parallel, name)

        @staticmethod
        def all_sum(values: list[float]) -> list[float]:
            return [float(v) for v in values]

    grpo.data_parallel = Local()  # type: ignore[attr-defined]


def _rank(rank: int, size: int, port: int, out: str, settings: dict, naive: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = one_update(settings, naive)
    if rank == 0:
        torch.save(result, out)
    import torch.distributed as dist

    dist.destroy_process_group()


def two_ranks(tmp_path: Path, settings: dict, naive: bool = False) -> dict:
    port = free_port()
    out = str(tmp_path / "result.pt")
    mp.spawn(_rank, args=(2, port, out, settings, naive), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_shares_are_contiguous_equal_counts_padded_with_fillers(monkeypatch):
    data, advantages = trajectories()
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(data_parallel.local_share(data, advantages))
    (first, _), (second, second_adv) = shares
    assert first == data[:3] and second[:2] == data[3:]
    assert data_parallel.is_filler(second[2]) and second[2].num_sampled == 0 and not second_adv[2].any()
    assert sum(t.num_sampled for t in first) == 12 and sum(t.num_sampled for t in second) == 27


SETTINGS = {
    "token-mean": {"aggregation": "token-mean"},
    "seq-mean-token-mean": {"aggregation": "seq-mean-token-mean"},
    "seq-mean-token-sum-norm": {"aggregation": "seq-mean-token-sum-norm"},
    # micro-batches of 2 (rank 0: 2 + 1, rank 1: 2 + 1 of which one filler), 2 passes, a shared-prompt layout
    "token-mean-micro-mu2": {"aggregation": "token-mean", "micro_batch_size": 2, "mu": 2, "share_prompt": True},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_two_ranks_take_the_one_process_update(tmp_path, settings):
    alone = one_update(settings)
    both = two_ranks(tmp_path, settings)
    # The loss terms are the objective itself; the token means (clip fraction, ratio) are means of micro-batch
    # means, whose micro-batches differ between one and two processes.
    same = ("loss", "entropy") if "micro_batch_size" in settings else ("loss", "entropy", "clip_fraction", "ratio")
    for key in same:
        assert both["stats"][key] == pytest.approx(alone["stats"][key], abs=LOSS_TOL), key
    assert both["stats"]["grad_norm"] == pytest.approx(alone["stats"]["grad_norm"], rel=1e-5)
    assert len(both["grads"]) == len(alone["grads"]) == settings.get("mu", 1)
    for step, grads in enumerate(alone["grads"]):
        assert both["grads"][step].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(both["grads"][step][name], grad, **GRAD_TOL)
    assert both["weights"].keys() == alone["weights"].keys()
    start = _start()
    assert max(float((alone["weights"][k] - v).abs().max()) for k, v in start.items()) > LR / 2  # it moved
    for name, tensor in alone["weights"].items():
        gap = (both["weights"][name] - tensor).abs()
        assert float(gap.max()) <= WEIGHT_TOL_NEAR_EPS * len(alone["grads"]), name
        if name not in alone["grads"][0]:  # a tied alias (lm_head.weight is the embedding)
            continue
        steady = torch.stack([g[name].abs() for g in alone["grads"]]).min(0).values > WELL_CONDITIONED
        assert float(torch.where(steady, gap, 0.0).max()) <= WEIGHT_TOL * len(alone["grads"]), name


def test_a_per_rank_token_mean_would_take_another_update(tmp_path):
    """The check above has teeth: normalising by each rank's own tokens and averaging the gradients (what a
    plain data-parallel wrapper does) gives another loss and other gradients on these unequal shares."""
    alone = one_update(SETTINGS["token-mean"])
    naive = two_ranks(tmp_path, SETTINGS["token-mean"], naive=True)
    assert abs(naive["stats"]["loss"] - alone["stats"]["loss"]) > 100 * LOSS_TOL
    gap = max(float((naive["grads"][0][k] - g).abs().max() / g.abs().max()) for k, g in alone["grads"][0].items())
    assert gap > 0.05  # a gradient off by more than 5% of its largest entry


def test_learners_not_yet_data_parallel_stop_before_any_work(monkeypatch):
    from agentrl.errors import ConfigError
    from agentrl.learners.grpo import GRPOConfig, train_grpo
    from agentrl.learners.ppo import PPOConfig, train_ppo

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing is joined before the check
    with pytest.raises(ConfigError, match=r"ppo does not run data-parallel yet .*supported: grpo.*without torchrun"):
        train_ppo(PPOConfig(env="toy-digits-v0"))
    with pytest.raises(ConfigError, match="LoRA does not run data-parallel yet"):
        train_grpo(GRPOConfig(env="toy-digits-v0", lora={"r": 4}))


def _resume_rank(rank: int, size: int, port: int, out: str) -> None:
    """A straight 2-step GRPO run and one resumed from its first checkpoint, both on ``size`` ranks."""
    from agentrl.learners.grpo import GRPOConfig, train_grpo

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    fast = {"env": "toy-digits-v0", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8, "warmup_steps": 0,
            "lr": 1e-2, "max_steps": 2}  # fmt: skip
    straight = train_grpo(GRPOConfig(**fast, output_dir=Path(out) / "a", save_every=1))
    resumed = train_grpo(GRPOConfig(**fast, output_dir=Path(out) / "b", resume_from=Path(out) / "a" / "step-000001"))
    if rank == 0:
        torch.save({"straight": straight.model.state_dict(), "resumed": resumed.model.state_dict(),
                    "steps": [log.step for log in resumed.history]}, Path(out) / "result.pt")  # fmt: skip


def test_a_run_on_two_ranks_resumes_exactly_from_its_checkpoint(tmp_path):
    """The checkpoint holds the whole optimizer state (gathered from the shards) and the resumed run scatters it
    back: the resumed run ends on the straight run's weights."""
    mp.spawn(_resume_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["steps"] == [2]
    state = torch.load(tmp_path / "a" / "step-000001" / "training_state.pt", weights_only=True)
    assert "model.embed_tokens.weight" in state["optimizer"]["state"]  # whole, by name
    for name, tensor in result["straight"].items():
        torch.testing.assert_close(result["resumed"][name], tensor, atol=0, rtol=0)


def _start() -> dict[str, torch.Tensor]:
    from agentrl.models.loading import load_model

    return dict(load_model("tiny").state_dict())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(run_dir: Path, ranks: int) -> None:
    """``agentrl train`` on toy-digits for 2 steps, under torchrun with ``ranks`` > 1 (``--master_port 0`` is
    not passed on to the ranks by torchrun's static rendezvous: a free port is)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "agentrl", "train", "--env", "toy-digits-v0",
               "--output-dir", str(run_dir), "--threads", "1", "--no-report", "--report-to", "none",
               "--set", "sft.demos=0", "--set", "eval.tasks=0", "--set", "learner.max_steps=2",
               "--set", "learner.warmup_steps=0", "--set", "learner.prompts_per_step=2",
               "--set", "learner.group_size=4", "--set", "learner.max_new_tokens=8"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "envs"), str(ROOT / "sandboxes")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_agentrl_train_writes_one_run_that_matches_one_process(tmp_path):
    import json

    from agentrl.models.loading import load_model

    train(tmp_path / "two", 2)
    train(tmp_path / "one", 1)
    runs = {name: tmp_path / name for name in ("one", "two")}
    assert [p.name for p in (runs["two"] / "checkpoints" / "rl").iterdir()] == ["step-000002"]
    logs = {k: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for k, p in runs.items()}
    assert [(r["phase"], r["step"]) for r in logs["two"]] == [("rl", 1), ("rl", 2)]  # one writer: rank 0
    for one, two in zip(logs["one"], logs["two"], strict=True):  # the same episodes, the same update
        assert two["metrics"]["reward_mean"] == pytest.approx(one["metrics"]["reward_mean"], abs=1e-9)
        assert two["metrics"]["update/loss"] == pytest.approx(one["metrics"]["update/loss"], abs=LOSS_TOL)
        assert two["metrics"]["update/grad_norm"] == pytest.approx(one["metrics"]["update/grad_norm"], rel=1e-5)
    weights = {k: load_model(p / "checkpoints" / "rl" / "step-000002").state_dict() for k, p in runs.items()}
    start = _start()
    assert max(float((weights["one"][k] - v).abs().max()) for k, v in start.items()) > 1e-4  # seen: 3.1e-4
    for name, tensor in weights["one"].items():  # full weights, loadable by from_pretrained
        assert float((weights["two"][name] - tensor).abs().max()) <= 1e-5, name  # seen: 1.9e-6
