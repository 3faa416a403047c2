"""GRPO learner: it learns, tool tokens get no gradient, advantages per estimator, filters, resume, LoRA,
gradient checkpointing, bf16, configuration errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import agentrl
from agentrl.data.batch import SHARED_SEGMENT, collate, collate_shared
from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.learners import batching, logprobs, optim, policy_model, rl
from agentrl.learners.grpo import PRESETS, GRPOConfig, sample_advantages, train_grpo, update_policy
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout.hf import HFPolicy
from agentrl.rollout.policy import SamplingParams
from agentrl.rollout.runner import rollout
from agentrl.types import StopReason

FAST = {
    "env": "toy-digits-v0",
    "prompts_per_step": 8,
    "group_size": 8,
    "max_new_tokens": 16,
    "warmup_steps": 0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def ledger(rewards: list[float], sampled: int = 2, gap: int = 2, prompt: int = 3) -> Trajectory:
    """A synthetic multi-turn ledger: ``prompt`` tokens, then per turn ``sampled`` policy tokens + ``gap`` env ones."""
    ids, mask, turns = list(range(prompt)), [0] * prompt, []
    for k, reward in enumerate(rewards):
        start = len(ids)
        ids += [10 + k] * sampled
        mask += [1] * sampled
        turns.append(TurnSpan(start, start + sampled, reward))
        if k + 1 < len(rewards):
            ids += [5] * gap
            mask += [0] * gap
    return Trajectory(ids, [0.0] * len(ids), mask, turns)


# ---- learning -----------------------------------------------------------------------------------
def test_grpo_raises_the_reward_of_the_tiny_model():
    config = GRPOConfig(**FAST, max_steps=18, lr=1e-2, seed=0)
    history = train_grpo(config).history
    first = np.mean([log.reward_mean for log in history[:2]])
    last = np.mean([log.reward_mean for log in history[-3:]])
    assert first < 0.02
    assert last > 0.5, [round(log.reward_mean, 3) for log in history]
    assert history[-1].policy_version == 18  # one weight sync per step


# ---- the tool-token guarantee -------------------------------------------------------------------
def test_tool_and_env_tokens_never_receive_gradient_in_the_rl_loss():
    """A real multi-turn rollout with tool calls and env answers: the gradient reaching the last hidden
    states (what the LM head reads) is exactly zero at every position whose next token is not
    policy-sampled."""
    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    policy = HFPolicy(model, tokenizer, seed=0)
    groups = rollout("toy-guess-v0", policy, tokenizer, 2, group_size=4, sampling=SamplingParams(max_tokens=12),
                     env_kwargs={"max_turns": 3}, seed=1)  # fmt: skip
    trajectories = [t for g in groups for t in g]
    assert all(len(t.turns) == 3 for t in trajectories)  # tool answers between the turns
    config = GRPOConfig(
        env="toy-guess-v0", max_new_tokens=12, aggregation="seq-mean-token-mean", packing=False
    )
    grads: list[torch.Tensor] = []

    def keep_grad(module, inputs, hidden):
        hidden.register_hook(grads.append)

    hook = model.model.norm.register_forward_hook(keep_grad)
    model.train()
    optimizer = optim.make_optimizer(model, 1e-3)
    scheduler = optim.make_scheduler(optimizer, 0, 10, 1.0)
    rewards = [1.0 + i % 3 for i in range(len(trajectories))]  # nonzero advantages everywhere
    advantages = [
        r * np.asarray(t.loss_mask, dtype=float) for r, t in zip(rewards, trajectories, strict=True)
    ]
    update_policy(model, optimizer, scheduler, trajectories, advantages, config, pad_id=0, seed=0)
    hook.remove()
    grad_B_T = grads[0].abs().sum(-1)
    batch = batching.to_batch(trajectories, 0, config)  # the layout the update used: the prompt shared per row
    mask = torch.as_tensor(batch.loss_mask_B_T)
    predicts_policy_token = torch.nn.functional.pad(mask[:, 1:], (0, 1)) == 1  # logits at t predict t + 1
    assert (grad_B_T[~predicts_policy_token] == 0).all()
    assert (grad_B_T[predicts_policy_token] > 0).float().mean() > 0.9
    env_tokens = int(((mask == 0) & (torch.as_tensor(batch.attention_mask_B_T) == 1)).sum())
    assert env_tokens > 100  # the check covered real tool results and templates


# ---- advantages ---------------------------------------------------------------------------------
def group(*rewards: float) -> TrajectoryGroup:
    return TrajectoryGroup("g", tuple(ledger([r]) for r in rewards))


@pytest.mark.parametrize(
    ("advantage", "expected"),
    [
        (
            "grpo",
            [
                (1 - 0.5) / (np.std([1, 0, 1, 0], ddof=1) + 1e-4),
                -(0.5) / (np.std([1, 0, 1, 0], ddof=1) + 1e-4),
            ],
        ),
        ("dr_grpo", [0.5, -0.5]),
        ("rloo", [1 - 1 / 3, 0 - 2 / 3]),
    ],
)
def test_sequence_advantages_sit_on_policy_tokens_only(advantage, expected):
    config = GRPOConfig(env="toy-digits-v0", advantage=advantage)
    out = sample_advantages([group(1, 0, 1, 0)], config)
    assert len(out) == 4
    for values, trajectory, value in zip(out, group(1, 0, 1, 0), [*expected, *expected], strict=True):
        mask = np.asarray(trajectory.loss_mask)
        np.testing.assert_allclose(values[mask == 1], value, rtol=1e-6)
        assert (values[mask == 0] == 0).all()


def test_turn_advantages_give_each_turn_its_return_minus_the_others_at_that_turn():
    config = GRPOConfig(env="toy-digits-v0", advantage="turn")
    a, b = ledger([1.0, 0.0]), ledger([0.0, 2.0])
    out = sample_advantages([TrajectoryGroup("g", (a, b))], config)
    # returns-to-go: a = (1, 0), b = (2, 2); leave-one-out baseline at each turn = the other's return
    assert out[0][a.turns[0].start] == pytest.approx(1 - 2) and out[0][a.turns[1].start] == pytest.approx(
        0 - 2
    )
    assert out[1][b.turns[0].start] == pytest.approx(2 - 1) and out[1][b.turns[1].start] == pytest.approx(
        2 - 0
    )
    assert (out[0][np.asarray(a.loss_mask) == 0] == 0).all()


def test_a_lone_sample_has_no_baseline_and_reinforce_pp_whitens_over_the_batch():
    assert (sample_advantages([group(3.0)], GRPOConfig(env="x"))[0] == 0).all()
    out = sample_advantages([group(1, 0), group(2, 2)], GRPOConfig(env="x", advantage="reinforce_pp"))
    tokens = np.concatenate(
        [v[np.asarray(t.loss_mask) == 1] for v, t in zip(out, [*group(1, 0), *group(2, 2)], strict=True)]
    )
    assert tokens.mean() == pytest.approx(0, abs=1e-6) and tokens.std() == pytest.approx(1, abs=1e-4)


# ---- filters and batches ------------------------------------------------------------------------
def test_filters_drop_failed_episodes_overlong_samples_and_agreeing_groups():
    failed = Trajectory(
        [1, 2], [0, 0], [0, 1], [TurnSpan(1, 2, 1.0)], stop_reason=StopReason.ERROR, error="E: x"
    )
    cut = Trajectory([1, 2], [0, 0], [0, 1], [TurnSpan(1, 2, 0.5)], stop_reason=StopReason.MAX_TOKENS)
    groups = [
        TrajectoryGroup("a", (ledger([1]), failed, cut, ledger([0]))),
        TrajectoryGroup("b", (ledger([1]),) * 2),
    ]
    kept, dropped = rl.filter_groups(groups, GRPOConfig(env="x", overlong="filter", dynamic_sampling=True))
    assert dropped == {"failed": 1, "overlong": 1, "zero_variance": 2}
    assert [len(g) for g in kept] == [2]
    kept, _ = rl.filter_groups(
        groups, GRPOConfig(env="x", overlong="soft", max_new_tokens=1, overlong_cache=1)
    )
    assert kept[0].trajectories[1].total_reward == pytest.approx(0.5 - 1.0)  # 1 token at a limit of 1: -1


def test_place_lays_per_trajectory_values_onto_packed_rows():
    trajectories = [ledger([1.0], prompt=p) for p in (2, 5, 3)]
    values = [np.arange(len(t.token_ids), dtype=float) + 100 * i for i, t in enumerate(trajectories)]
    for packing in (False, True):
        batch = collate(trajectories, packing=packing, row_tokens=10).to_torch()
        placed = batching.place(batch, values)
        for b in range(batch.shape[0]):
            for t in range(batch.shape[1]):
                segment = int(batch.segment_ids_B_T[b, t])
                expected = 0.0 if segment < 0 else values[segment][int(batch.position_ids_B_T[b, t])]
                assert float(placed[b, t]) == expected


# ---- checkpoints, resume, LoRA, memory and precision --------------------------------------------
def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = train_grpo(GRPOConfig(**FAST, max_steps=3, lr=1e-2, output_dir=tmp_path / "a", save_every=1))
    resumed = train_grpo(GRPOConfig(**FAST, max_steps=3, lr=1e-2, output_dir=tmp_path / "b",
                                    resume_from=tmp_path / "a" / "step-000002"))  # fmt: skip
    assert [log.step for log in resumed.history] == [3]
    assert resumed.history[0].reward_mean == straight.history[2].reward_mean
    a, b = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    reloaded = load_model(tmp_path / "b" / "step-000003")
    assert all(torch.equal(v, a[k]) for k, v in reloaded.state_dict().items())


def test_lora_trains_adapters_only_and_checkpoints_merged_weights(tmp_path):
    base = weights(load_model("tiny"))
    config = GRPOConfig(**FAST, max_steps=2, lr=1e-2, lora={"r": 4, "alpha": 8}, output_dir=tmp_path)
    result = train_grpo(config)
    model = result.model
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if not p.requires_grad}  # fmt: skip
    assert all(torch.equal(p, base[n]) for n, p in frozen.items() if n in base)
    merged = load_model(result.checkpoint)
    assert (result.checkpoint / policy_model.ADAPTER_DIR / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        model.eval()
        np.testing.assert_allclose(merged(ids).logits.numpy(), model(input_ids=ids).logits.numpy(), atol=1e-5)
        assert not torch.allclose(merged(ids).logits, load_model("tiny")(ids).logits)
    again = train_grpo(config.model_copy(update={"max_steps": 3, "resume_from": result.checkpoint}))
    assert [log.step for log in again.history] == [3]


def test_gradient_checkpointing_and_bf16_give_the_same_update():
    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    groups = rollout("toy-digits-v0", HFPolicy(model, tokenizer, seed=0), tokenizer, 4, group_size=4,
                     sampling=SamplingParams(max_tokens=16), seed=3)  # fmt: skip
    trajectories = [t for g in groups for t in g]
    advantages = [(i % 2 - 0.5) * np.asarray(t.loss_mask, float) for i, t in enumerate(trajectories)]

    def grads(**overrides):
        config = GRPOConfig(env="toy-digits-v0", max_new_tokens=16, **overrides)
        model, _ = policy_model.load_trainable(config)
        assert model.is_gradient_checkpointing == config.gradient_checkpointing
        captured = {}
        optimizer = optim.make_optimizer(model, 1e-3)
        optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        no_schedule = SimpleNamespace(step=lambda: None)
        update_policy(model, optimizer, no_schedule, trajectories, advantages, config, pad_id=0, seed=0)
        return captured

    plain, checkpointed = grads(), grads(gradient_checkpointing=True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    if (reason := optim.cpu_bf16_error()) is not None:
        pytest.skip(f"bf16 does not run on this CPU (gradient checkpointing checked): {reason}")
    bf16 = grads(precision="bf16")
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in plain.values()]),
        torch.cat([g.flatten() for g in bf16.values()]),
        dim=0,
    )
    assert cosine > 0.99


# ---- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, r"GRPOConfig.env: got .*Field required \(env: registered env id to play"),
        ({"env": "x", "advantage": "ppo"}, r"GRPOConfig.advantage: got 'ppo'"),
        ({"env": "x", "minibatches": 100}, r"minibatches \(100\) exceeds the 64 samples per step"),
        ({"env": "x", "aggregation": "sum"}, r"GRPOConfig.aggregation: got 'sum'"),
        ({"env": "x", "dual_clip": 0.5}, r"GRPOConfig.dual_clip: got 0.5; Input should be greater than 1"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**overrides)


def test_presets_set_their_fields_and_toy_digits_scores_the_share_of_digits():
    for name, preset in PRESETS.items():
        config = GRPOConfig(env="x", **preset)
        assert {k: getattr(config, k) for k in preset} == preset, name
    assert agentrl.make("toy-digits-v0").step("12a4").reward == pytest.approx(0.75)


def test_prompt_shared_packed_and_padded_rows_give_the_same_logprobs():
    """A group's prompt computed once (4-D mask, positions continuing) equals computing it per sample."""
    model, tokenizer = load_model("tiny").eval(), load_tokenizer("tiny")
    groups = rollout("toy-guess-v0", HFPolicy(model, tokenizer, seed=0), tokenizer, 3, group_size=3,
                     sampling=SamplingParams(max_tokens=10), env_kwargs={"max_turns": 2}, seed=2)  # fmt: skip
    trajectories = [t for g in groups for t in g][::-1]  # members of a prompt need not be adjacent
    config = GRPOConfig(env="x")
    shared = collate_shared(trajectories)
    assert shared.shape[0] == 1 and (shared.segment_ids_B_T == SHARED_SEGMENT).sum() > 0  # one opening prompt
    with torch.no_grad():
        out = {}
        for name, batch in (("padded", collate(trajectories)), ("packed", collate(trajectories, packing=True)),
                            ("shared", shared)):  # fmt: skip
            batch = batch.to_torch()
            logprobs_B_T, _ = logprobs.policy_logprobs(model, batch, temperature=0.7)
            out[name] = []
            for i, trajectory in enumerate(trajectories):  # back onto each ledger through the positions
                where = batch.segment_ids_B_T == i
                values = np.zeros(len(trajectory.token_ids), dtype=np.float32)
                values[batch.position_ids_B_T[where].numpy()] = logprobs_B_T[where].numpy()
                out[name].append(values)
    for i, trajectory in enumerate(trajectories):
        mask = np.asarray(trajectory.loss_mask) == 1
        for name in ("packed", "shared"):
            np.testing.assert_allclose(out[name][i][mask], out["padded"][i][mask], atol=2e-5)
    assert config.share_prompt  # the default


def test_a_time_budget_stops_after_the_step_that_spends_it_and_checkpoints_there(tmp_path):
    result = train_grpo(GRPOConfig(**FAST, max_steps=5, max_seconds=1e-3, output_dir=tmp_path))
    assert [log.step for log in result.history] == [1]
    assert result.checkpoint == tmp_path / "step-000001" and result.checkpoint.is_dir()
