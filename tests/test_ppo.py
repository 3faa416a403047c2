"""PPO learner: it learns, GAE on KL-shaped rewards over policy tokens, the critic's alignment, the adaptive
KL coefficient, and an exact resume of actor, critic and both optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_grpo import FAST, ledger, weights

from agentrl.data.batch import collate
from agentrl.learners.ppo import CRITIC_DIR, PPOConfig, gae_advantages, train_ppo
from agentrl.models.value_head import ValueModel

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_ppo_raises_the_reward_of_the_tiny_model():
    config = PPOConfig(**FAST, max_steps=16, lr=1e-2, critic_lr=1e-3, mu=1, minibatches=1, seed=0)
    history = train_ppo(config).history
    first = np.mean([log.reward_mean for log in history[:2]])
    last = np.mean([log.reward_mean for log in history[-3:]])
    assert first < 0.02
    assert last > 0.5, [round(log.reward_mean, 3) for log in history]
    assert all(log.update["value_loss"] >= 0 for log in history)


def test_gae_bootstraps_across_env_tokens_and_the_kl_penalty_shapes_each_policy_token():
    trajectory = ledger([0.0, 1.0], sampled=2, gap=3, prompt=2)  # policy tokens at 2, 3 and 7, 8
    mask = np.asarray(trajectory.loss_mask)
    values = [np.where(mask == 1, 0.5, 9.0)]  # values on env tokens must be ignored
    logprobs = [np.where(mask == 1, -1.0, 0.0)]
    ref = [np.where(mask == 1, -1.5, 0.0)]  # k1 = logp - ref = 0.5 per policy token
    config = PPOConfig(env="x", gamma=1.0, lam=1.0, whiten_advantages=False)
    (adv,), (ret,), kl = gae_advantages([trajectory], values, config, logprobs, ref, kl_coef=0.2)
    # rewards: -0.1 on each policy token, +1 on the last one; lam = gamma = 1: A_t = sum of rewards from t on - V_t
    expected_returns = {2: 1 - 0.4, 3: 1 - 0.3, 7: 1 - 0.2, 8: 1 - 0.1}
    for t, r in expected_returns.items():
        assert ret[t] == pytest.approx(r) and adv[t] == pytest.approx(r - 0.5)
    assert (adv[mask == 0] == 0).all() and kl == pytest.approx(4 * 0.5)
    config = PPOConfig(env="x", gamma=0.5, lam=1.0, turn_level=True, whiten_advantages=False)
    (adv,), _, _ = gae_advantages([trajectory], [np.zeros(len(mask))], config)
    assert adv[2] == adv[3] == pytest.approx(0.5) and adv[7] == adv[8] == pytest.approx(1.0)


def test_the_critic_reads_the_state_before_each_token_and_starts_at_zero():
    critic = ValueModel.from_pretrained("tiny").requires_grad_(False)
    batch = collate([ledger([1.0], prompt=4), ledger([0.0], prompt=2)]).to_torch()
    values = critic(batch)
    assert values.shape == batch.token_ids_B_T.shape and (values == 0).all()  # zero-initialised head
    torch.nn.init.normal_(critic.head.weight)
    values = critic(batch)
    hidden = critic.backbone(input_ids=batch.token_ids_B_T[:1, :3]).last_hidden_state
    assert float(values[0, 3]) == pytest.approx(float(critic.head(hidden[0, 2])), abs=1e-5)  # from position 2
    assert float(values[0, 0]) == 0.0


def test_resume_restores_actor_critic_optimizers_and_kl_coefficient(tmp_path):
    common = {**FAST, "max_steps": 3, "lr": 1e-2, "mu": 2, "minibatches": 2, "kl_coef": 0.05, "kl_target": 0.01,
              "kl_horizon": 100}  # fmt: skip
    straight = train_ppo(PPOConfig(**common, output_dir=tmp_path / "a", save_every=1))
    assert straight.extras["kl_coef"] != 0.05  # the controller moved it
    assert (tmp_path / "a" / "step-000002" / CRITIC_DIR / "value_head.safetensors").is_file()
    resumed = train_ppo(
        PPOConfig(**common, output_dir=tmp_path / "b", resume_from=tmp_path / "a" / "step-000002")
    )
    assert resumed.history[0].reward_mean == straight.history[2].reward_mean
    assert resumed.extras["kl_coef"] == straight.extras["kl_coef"]
    for a, b in ((straight.model, resumed.model), (straight.extras["critic"], resumed.extras["critic"])):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
