"""The online learners' shell on a learner of our own: it plays step k at the runner's k-th call, hands the
update every step's groups, checkpoints the learner's state with the weights, restores it on resume, and
stops on max_steps or max_seconds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import agentrl
from agentrl.data.buffer import TrajectoryGroup
from agentrl.errors import RolloutError
from agentrl.learners import loop, optim, policy_model
from agentrl.learners.rl import RolloutConfig
from agentrl.testing import EchoEnv

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FAST = {"env": "toy-digits-v0", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "warmup_steps": 0}


def counting_learner(config: RolloutConfig, seen: list[tuple[int, tuple[int, ...]]], *, trains: bool = True
                     ) -> loop.Online:  # fmt: skip
    """A learner whose update moves one weight by a fixed amount and counts its calls in ``state``."""
    model, tokenizer = policy_model.load_trainable(config)
    optimizer = optim.make_optimizer(model, 1e-3, 0.0, (0.9, 0.99))
    scheduler = optim.make_scheduler(optimizer, 0, config.max_steps, 1.0)
    state = {"updates": 0}

    def update(step: int, groups: Sequence[TrajectoryGroup]) -> loop.Update:
        seen.append((step, tuple(t.meta["reset_seed"] for g in groups for t in g)))
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        state["updates"] += 1
        trained = [t for g in groups for t in g] if trains else []
        return loop.Update(trained, {"zero_variance": 0 if trains else 4}, {"updates": float(state["updates"])})

    return loop.Online(model, tokenizer, optimizer, scheduler, update, state=state)


def test_a_learner_of_our_own_gets_steps_checkpoints_and_an_exact_resume(tmp_path):
    config = RolloutConfig(**FAST, max_steps=3, output_dir=tmp_path / "a", save_every=1)
    seen: list[tuple[int, tuple[int, ...]]] = []
    logs: list[float] = []
    hooks = loop.Hooks(on_step=lambda log: logs.append(log.update["updates"]))
    straight = loop.run_online(config, "counting", lambda: counting_learner(config, seen), hooks)
    assert [step for step, _ in seen] == [0, 1, 2] and len({seeds for _, seeds in seen}) == 3
    assert logs == [1.0, 2.0, 3.0] and [log.policy_version for log in straight.history] == [1, 2, 3]
    assert straight.extras == {"updates": 3} and straight.checkpoint == tmp_path / "a" / "step-000003"

    resumed_seen: list[tuple[int, tuple[int, ...]]] = []
    again = config.model_copy(update={"output_dir": tmp_path / "b", "resume_from": tmp_path / "a" / "step-000002"})
    resumed = loop.run_online(again, "counting", lambda: counting_learner(again, resumed_seen), loop.Hooks())
    assert resumed_seen == seen[2:]  # the straight run's third step: same call, same tasks
    assert resumed.extras == {"updates": 3}  # the count came back from the checkpoint's metadata
    assert [log.step for log in resumed.history] == [3]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_seconds_ends_the_loop_with_a_checkpoint(tmp_path):
    config = RolloutConfig(**FAST, max_steps=50, max_seconds=0.001, output_dir=tmp_path)
    seen: list[tuple[int, tuple[int, ...]]] = []
    result = loop.run_online(config, "counting", lambda: counting_learner(config, seen), loop.Hooks())
    assert len(result.history) == 1 and result.checkpoint == tmp_path / "step-000001"


class BrokenEnv(EchoEnv):
    def step(self, action):
        raise OSError("the tool server is gone")


def test_a_run_whose_every_episode_fails_stops_naming_the_error(tmp_path):
    agentrl.register("test-broken-v0", BrokenEnv, override=True, max_turns=3)
    config = RolloutConfig(**{**FAST, "env": "test-broken-v0"}, max_steps=20, output_dir=tmp_path)
    seen: list[tuple[int, tuple[int, ...]]] = []
    logged: list[int] = []
    hooks = loop.Hooks(on_step=lambda log: logged.append(log.step))
    with pytest.raises(RolloutError, match=r"last 3 steps .* at step 3, 4 of 4 ended with: OSError: the tool server is gone"):
        loop.run_online(config, "counting", lambda: counting_learner(config, seen), hooks)
    assert logged == [1, 2, 3] and not list(tmp_path.iterdir())  # logged, and nothing saved of a run that trained on nothing


def test_steps_that_train_nothing_are_reported(tmp_path):
    config = RolloutConfig(**FAST, max_steps=loop.SILENT_STEPS)
    seen: list[tuple[int, tuple[int, ...]]] = []
    with pytest.warns(RuntimeWarning, match=r"counting: steps 1-5 trained on no sample \(dropped: 4 zero_variance\)"):
        loop.run_online(config, "counting", lambda: counting_learner(config, seen, trains=False), loop.Hooks())
