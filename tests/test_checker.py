"""The env checker over every registered env, and on envs that break the contract in each way it checks."""

from __future__ import annotations

import subprocess

import gymnasium
import pytest

import agentrl
from agentrl import Env, ResetResult, StepResult
from agentrl.checker import check_env
from agentrl.errors import EnvCheckError
from agentrl.testing import EchoEnv

ALL_CHECKS = ["types", "robustness", "seeding", "async", "outcome", "masks", "gymnasium", "close"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from agentrl.models.loading import load_tokenizer
    from agentrl.models.tiny import build_tiny_model

    return load_tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.mark.parametrize("env_id", [s.id for s in agentrl.list_envs()])
def test_every_registered_env_passes_the_checker_and_gymnasium_make(env_id, tokenizer):
    assert check_env(agentrl.make(env_id), tokenizer=tokenizer) == ALL_CHECKS
    env = gymnasium.make(f"agentrl/{env_id}")
    obs, info = env.reset(seed=0)
    assert obs and isinstance(info, dict)
    env.close()


def test_the_registry_holds_the_toy_envs():
    assert {"toy-echo-v0", "toy-guess-v0"} <= {s.id for s in agentrl.list_envs()}


class _Base(Env):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return ResetResult([{"role": "user", "content": "go"}], {"tools": []})

    def step(self, action):
        return StepResult([{"role": "user", "content": "again"}], 0.0, False, False, {"reward_components": {}})


class SpeaksAsAssistant(_Base):
    def step(self, action):
        return StepResult([{"role": "assistant", "content": "I'll answer for you"}], 0.0, False, False,
                          {"reward_components": {}})


class CrashesOnGarbage(_Base):
    def step(self, action):
        return StepResult([], float(int(action)), True, False, {"reward_components": {}})


class Unseeded(_Base):
    def reset(self, *, seed=None, options=None):
        import random

        super().reset(seed=seed)
        return ResetResult([{"role": "user", "content": str(random.random())}], {"tools": []})


class ComponentsDoNotAddUp(_Base):
    def step(self, action):
        return StepResult([], 1.0, True, False, {"reward_components": {"a": 0.25}})


class CloseTwiceFails(_Base):
    closed = False

    def close(self):
        if self.closed:
            raise RuntimeError("already closed")
        self.closed = True
        super().close()


class LeaksAProcess(_Base):
    procs: list = []  # noqa: RUF012 - shared on purpose: the test reaps every leaked process

    def reset(self, *, seed=None, options=None):
        self.procs.append(subprocess.Popen(["sleep", "30"]))
        return super().reset(seed=seed, options=options)


class AsyncDisagrees(_Base):
    async def areset(self, *, seed=None, options=None):
        await super().areset(seed=seed)
        return ResetResult([{"role": "user", "content": "different"}], {"tools": []})


@pytest.mark.parametrize(
    ("env_cls", "check"),
    [
        (SpeaksAsAssistant, "masks"),
        (CrashesOnGarbage, "robustness"),
        (Unseeded, "seeding"),
        (ComponentsDoNotAddUp, "types"),
        (CloseTwiceFails, "close"),
        (LeaksAProcess, "close"),
        (AsyncDisagrees, "async"),
    ],
)
def test_each_broken_contract_is_caught_and_named(env_cls, check):
    env = env_cls()
    with pytest.raises(EnvCheckError, match=rf"^\[{check}\]"):
        check_env(env, make_env=None if env_cls is LeaksAProcess else env_cls)
    for proc in LeaksAProcess.procs:
        proc.kill()
        proc.wait()


def test_gymnasiums_checker_runs_and_its_failures_are_reported():
    class NoSuperReset(EchoEnv):  # never seeds np_random: gymnasium's own checker catches it
        def reset(self, *, seed=None, options=None):
            self._words, self._turn = ["apple"] * self.rounds, 0
            return ResetResult([{"role": "user", "content": "Say: apple"}], {"tools": []})

    with pytest.raises(EnvCheckError, match=r"^\[gymnasium\]"):
        check_env(NoSuperReset())


def test_agentrl_check_command(tmp_path):
    proc = subprocess.run(["agentrl", "check", "toy-guess-v0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "passed types, robustness, seeding, async, outcome, gymnasium, close" in proc.stdout
    proc = subprocess.run(["agentrl", "check", "toy-gues"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Did you mean" in proc.stderr
