"""verifiers environments through agentrl: an environment package written here with the real verifiers API,
loaded by id, checked, and played by the runner with the token ledger checked turn by turn."""

from __future__ import annotations

import sys

import pytest
from _higher_lower import binary_search

pytest.importorskip("verifiers")

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError, RolloutError
from agentrl.interop.verifiers import VerifiersEnv, installed_environments
from agentrl.models.loading import load_tokenizer
from agentrl.registry import register_loader
from agentrl.rollout.runner import Task, rollout
from agentrl.testing import ScriptedPolicy
from agentrl.types import StopReason

IM_END = "<|im_end|>"

PACKAGE = '''
"""Two verifiers environments: a tool game (vf.ToolEnv) and a feedback game (vf.MultiTurnEnv)."""
import verifiers as vf
from datasets import Dataset

SECRETS = [3, 7, 5, 9]


def _rows(prefix):
    return [{"question": f"{prefix} Find my number from 1 to 10.", "answer": str(s), "info": {"secret": s}}
            for s in SECRETS]


def probe(number: int) -> str:
    """Compare a number with the secret.

    Args:
        number: the number to compare.
    """
    return "recorded"


class ProbeEnv(vf.ToolEnv):
    async def call_tool(self, tool_name, tool_args, tool_call_id, **kwargs):
        return {"role": "tool", "content": f"probed {tool_args['number']}", "tool_call_id": tool_call_id}


def final_number(completion) -> int | None:
    for message in reversed(completion):
        if message["role"] == "assistant" and message["content"].strip().isdigit():
            return int(message["content"].strip())
    return None


def correct(completion, answer) -> float:
    return 1.0 if final_number(completion) == int(answer) else 0.0


def brevity(completion) -> float:
    return -0.01 * sum(1 for m in completion if m["role"] == "assistant")


class HigherLower(vf.MultiTurnEnv):
    """Answer with a number; the env says higher or lower until the number is found."""

    async def env_response(self, messages, state, **kwargs):
        guess = messages[-1]["content"].strip()
        secret = state["info"]["secret"]
        if not guess.isdigit():
            return [{"role": "user", "content": "Answer with a number."}]
        if int(guess) == secret:
            state["final_env_response"] = [{"role": "user", "content": "Found it."}]
            return state["final_env_response"]
        return [{"role": "user", "content": "higher" if int(guess) < secret else "lower"}]


class Forgetful(HigherLower):
    """Shows the model only the latest exchange: a conversation that does not extend the last prompt."""

    async def get_prompt_messages(self, state):
        messages = await super().get_prompt_messages(state)
        return messages[-1:] if state["trajectory"] else messages


def load_environment(kind: str = "feedback", max_turns: int = 6, **kwargs):
    rubric = vf.Rubric(funcs=[correct, brevity], weights=[1.0, 1.0])
    if kind == "tools":
        return ProbeEnv(tools=[probe], dataset=Dataset.from_list(_rows("tools")), rubric=rubric,
                        system_prompt="Use the probe tool, then answer with the number.", max_turns=max_turns)
    if kind == "rewrite":
        return Forgetful(dataset=Dataset.from_list(_rows("rewrite")), rubric=rubric, max_turns=max_turns)
    if kind == "single":
        return vf.SingleTurnEnv(dataset=Dataset.from_list(_rows("single")), rubric=rubric)
    if kind == "group":
        async def rank(completions) -> list[float]:
            return [0.0] * len(completions)
        rubric = vf.Rubric(funcs=[rank])
    return HigherLower(dataset=Dataset.from_list(_rows("train")), eval_dataset=Dataset.from_list(_rows("eval")),
                       rubric=rubric, max_turns=max_turns)
'''

DIST_INFO = """Metadata-Version: 2.1
Name: vf-higher-lower
Version: 0.1.0
Requires-Dist: verifiers>=0.1
"""


@pytest.fixture(scope="module")
def env_package(tmp_path_factory):
    """The package installed the way a wheel installs it: a module plus its dist-info on sys.path."""
    root = tmp_path_factory.mktemp("site")
    (root / "vf_higher_lower.py").write_text(PACKAGE)
    info = root / "vf_higher_lower-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(DIST_INFO)
    (info / "RECORD").write_text("vf_higher_lower.py,,\nvf_higher_lower-0.1.0.dist-info/METADATA,,\n")
    (info / "top_level.txt").write_text("vf_higher_lower\n")
    sys.path.insert(0, str(root))
    register_loader("verifiers", "agentrl.interop.verifiers:load_verifiers_env")
    yield "vf-higher-lower"
    sys.path.remove(str(root))
    sys.modules.pop("vf_higher_lower", None)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_installed_environment_packages_are_discovered(env_package):
    assert env_package in installed_environments()


def test_multi_turn_env_plays_through_the_runner_with_rubric_components_and_exact_masks(
    env_package, tokenizer
):
    tasks = [Task(options={"task_index": i}) for i in range(4)]
    groups = rollout(f"verifiers:{env_package}", ScriptedPolicy(tokenizer, binary_search), tokenizer, tasks)
    for group, secret in zip(groups, [3, 7, 5, 9], strict=True):
        [trajectory] = group.trajectories
        assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.error is None
        guesses = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
        assert guesses[-1] == str(secret)
        # The rubric's weighted functions are the components of the final reward; they sum to it.
        final = trajectory.turns[-1]
        assert dict(final.reward_components) == pytest.approx(
            {"correct": 1.0, "brevity": -0.01 * len(guesses)}
        )
        assert trajectory.total_reward == pytest.approx(1.0 - 0.01 * len(guesses))
        # The ledger: sampled guesses masked 1, the env's higher/lower turns and template glue masked 0.
        ids, mask = trajectory.token_ids, trajectory.loss_mask
        sampled = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert sampled == "".join(g + IM_END for g in guesses)
        context = tokenizer.decode(
            [
                t
                for t, m in zip(
                    ids[trajectory.prompt_length :], mask[trajectory.prompt_length :], strict=True
                )
                if not m
            ]
        )
        assert (
            context.count("<|im_start|>user\n") == len(guesses) - 1 and "eval Find my number" not in context
        )
        assert "eval Find my number" in tokenizer.decode(ids[: trajectory.prompt_length])


def test_tool_env_gets_openai_tool_calls_from_hermes_blocks(env_package, tokenizer):
    def reply(prompt: str) -> str:
        if "probed 4" not in prompt:
            return '<tool_call>\n{"name": "probe", "arguments": {"number": 4}}\n</tool_call>'
        return "3"

    env = agentrl.make(f"verifiers:{env_package}", kind="tools", split="train")
    assert [t["function"]["name"] for t in env.tools] == ["probe"]
    [group] = rollout(
        lambda: env, ScriptedPolicy(tokenizer, reply), tokenizer, [Task(options={"task_index": 0})]
    )
    [trajectory] = group.trajectories
    roles = [m["role"] for m in trajectory.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert trajectory.messages[3]["content"] == "probed 4"
    assert trajectory.turns[-1].reward_components["correct"] == pytest.approx(1.0)
    assert "<tool_response>\nprobed 4\n</tool_response>" in tokenizer.decode(trajectory.token_ids)


def test_the_env_checker_passes_and_max_turns_truncates(env_package):
    env = agentrl.make(f"verifiers:{env_package}", max_turns=2)
    check_env(env)
    env.reset(seed=1, options={"task_index": 0})
    assert env.step("1").terminated is False  # secret 3: "higher"
    last = env.step("2")
    assert last.truncated and not last.terminated and last.info["stop_condition"] == "max_turns_reached"
    assert last.info["reward_components"]["correct"] == pytest.approx(0.0)
    assert "num_turns" in last.info["metrics"]
    env.reset(seed=1, options={"task": 0})
    empty = env.step("")  # verifiers refuses an empty reply: the episode ends, scored, with the reason
    assert empty.terminated and "EmptyModelResponseError" in empty.info["error"]
    assert empty.info["reward_components"]["correct"] == pytest.approx(0.0)
    env.close()


def test_a_single_turn_env_terminates_at_its_one_turn(env_package):
    env = agentrl.make(f"verifiers:{env_package}", kind="single", split="train")
    env.reset(options={"task": 1})
    step = env.step("7")
    assert step.terminated and not step.truncated and step.reward == pytest.approx(0.99)
    env.close()


def test_an_env_that_rewrites_history_fails_the_step_naming_the_ledger(env_package):
    env = agentrl.make(f"verifiers:{env_package}", kind="rewrite")
    env.reset(options={"task": 0})
    with pytest.raises(RolloutError, match="token ledger"):
        env.step("1")
    env.close()


def test_bad_envs_are_refused_with_the_reason(env_package):
    with pytest.raises(ConfigError, match="group reward functions"):
        agentrl.make(f"verifiers:{env_package}", kind="group")
    with pytest.raises(ConfigError, match=r"could not be loaded.*import no_such_env"):
        agentrl.make("verifiers:no-such-env")
    with pytest.raises(ConfigError, match="split"):
        agentrl.make(f"verifiers:{env_package}", split="test")
    env = agentrl.make(f"verifiers:{env_package}")
    with pytest.raises(ConfigError, match="task 99"):
        env.reset(options={"task_index": 99})
    assert isinstance(env, VerifiersEnv)
    env.close()


def test_a_closed_env_stops_its_parked_rollout(env_package):
    env = agentrl.make(f"verifiers:{env_package}")
    env.reset(seed=0)
    rollout_task = env._rollout
    env.close()
    assert rollout_task is not None and rollout_task.done()
