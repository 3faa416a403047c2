"""What a new user meets in the first hour: precision that fails before any work where the CPU cannot do it,
warm-up defaults that fit a short run, an endpoint asked for its models before an evaluation plays."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import JSONHandler, loopback_server
from test_evaluation import eval_cli

import agentrl
from agentrl.errors import ConfigError
from agentrl.learners import optim
from agentrl.learners.dpo import DPOConfig
from agentrl.learners.grpo import GRPOConfig
from agentrl.learners.sft import SFTConfig, env_demonstrations, train_sft
from agentrl.testing import EchoEnv


# ---- bf16 where the CPU cannot run it --------------------------------------------------------------------
def test_bf16_on_a_cpu_without_its_kernels_fails_before_loading_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(optim, "cpu_bf16_error", lambda: "pack_vnni2 is only supported when avx512 is supported")
    loaded = []
    monkeypatch.setattr("agentrl.learners.policy_model.load_trainable", lambda config: loaded.append(config))
    with pytest.raises(ConfigError, match=r"bf16 does not run on this CPU .*pack_vnni2.*set precision='fp32'"):
        train_sft(SFTConfig(max_steps=2, warmup_steps=0, precision="bf16"), [])
    assert loaded == []
    optim.check_precision("fp32", "cpu")  # fp32 never asks


_PROBE = """
import torch
from agentrl.errors import ConfigError
from agentrl.learners import optim
print("capability", torch.backends.cpu.get_cpu_capability())
print("probe", optim.cpu_bf16_error())
try:
    optim.check_precision("bf16", "cpu")
    print("check passed")
except ConfigError as exc:
    print("check refused:", exc)
"""


def test_the_probe_sees_what_default_cpu_kernels_cannot_do():
    """Under ``ATEN_CPU_CAPABILITY=default`` (kernels without AVX-512, as on many AMD EPYC machines) x86 torch
    cannot run a bf16 attention step; the probe must say so and the check must refuse."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "probe None" in out.stdout:
        assert "check passed" in out.stdout
        pytest.skip(f"bf16 attention runs on this CPU even with default kernels: {out.stdout}")
    assert "check refused: bf16 does not run on this CPU" in out.stdout and "DEFAULT" in out.stdout, out.stdout


# ---- warm-up defaults on short runs ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "fields", "expected"),
    [(GRPOConfig, {"env": "x", "max_steps": 3}, 0), (SFTConfig, {"max_steps": 30}, 3),
     (SFTConfig, {"max_steps": 12}, 1), (DPOConfig, {"max_steps": 10}, 1), (SFTConfig, {"max_steps": 31}, 30)],
)  # fmt: skip
def test_a_default_warmup_too_long_for_a_short_run_shrinks_with_a_note(config, fields, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config(**fields).warmup_steps == expected
    notes = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    if expected == config.model_fields["warmup_steps"].default:
        assert notes == []
    else:
        assert notes and f"not fewer than max_steps {fields['max_steps']}" in notes[0]


def test_a_warmup_set_by_hand_is_never_changed():
    with pytest.raises(ConfigError, match=r"warmup_steps \(5\) must be fewer than max_steps \(3\)"):
        SFTConfig(max_steps=3, warmup_steps=5)
    assert SFTConfig(max_steps=3, warmup_steps=2).warmup_steps == 2


def test_a_three_step_sft_run_trains_with_the_default_warmup(one_thread):
    env = agentrl.make("math-v0", tools=["calculator"])
    try:
        demos = env_demonstrations(env, range(2))
    finally:
        env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_sft(SFTConfig(max_steps=3, batch_size=2), demos)
    assert len(result.history) == 3


# ---- agentrl eval against an endpoint ----------------------------------------------------------------------
@contextlib.contextmanager
def api_server(models: list[str], listed: bool = True, reasoning: bool = False
               ) -> Iterator[tuple[str, list[dict[str, Any]]]]:  # fmt: skip
    """A real OpenAI-compatible server on loopback: ``GET /v1/models`` lists ``models`` (unless not
    ``listed``: no such endpoint); chat requests for another model get a 404, and with ``reasoning`` a body
    with ``max_tokens`` gets OpenAI's 400 for reasoning models. Others are answered with a ``guess(50)``."""
    seen: list[dict[str, Any]] = []

    class Handler(JSONHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path})
            if not listed or self.path != "/v1/models":
                self.send_json(404, {"error": {"message": "not found"}})
            else:
                self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body})
            if body["model"] not in models:
                self.send_json(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
            elif reasoning and "max_tokens" in body:
                self.send_json(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with "
                                           "this model. Use 'max_completion_tokens' instead."}})  # fmt: skip
            else:
                call = {"id": "c1", "type": "function", "function": {"name": "guess", "arguments": '{"number": 50}'}}
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self.send_json(200, {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [choice]})

    with loopback_server(Handler) as url:
        yield url, seen


EVAL = ["--env", "toy-guess", "--n", "2", "--k", "2", "--max-turns", "2", "--quiet"]


def test_a_wrong_model_name_fails_before_any_episode_and_names_the_served_ones(tmp_path):
    out = tmp_path / "wrong"
    with api_server(["served-a", "served-b"]) as (url, seen):
        code, _, stderr = eval_cli(*EVAL, "--base-url", url, "--model", "gpt-x", "--out", str(out))
    assert code == 1, stderr
    assert "does not serve a model named 'gpt-x'; it serves: served-a, served-b" in stderr and "--model served-a" in stderr
    assert [r["path"] for r in seen] == ["/v1/models"] and not (out / "episodes.jsonl").exists()
    with api_server(["served-a"]) as (url, seen):  # a server may take names it does not list: not asked then
        code, _, stderr = eval_cli(*EVAL, "--base-url", url, "--model", "gpt-x", "--no-model-check", "--out", str(out))
    assert code == 1 and "every episode played failed" in stderr and seen[0]["path"] == "/v1/chat/completions"


def test_retry_errors_replays_an_all_failed_directory_under_a_corrected_model(tmp_path):
    out = tmp_path / "retry"
    with api_server(["right"], listed=False) as (url, _):  # no /models to ask: every episode fails
        code, _, stderr = eval_cli(*EVAL, "--base-url", url, "--model", "typo", "--out", str(out))
    assert code == 1 and "--retry-errors" in stderr
    with api_server(["right"]) as (url, seen):
        code, stdout, stderr = eval_cli(*EVAL, "--base-url", url, "--model", "right", "--retry-errors",
                                        "--out", str(out))  # fmt: skip
    assert code == 0, stderr
    assert "replaying them with the settings given now" in stderr and "4 played now, 0 resumed" in stdout
    assert {r["body"]["model"] for r in seen if "body" in r} == {"right"}
    assert json.loads((out / "run.json").read_text())["identity"]["model"] == "right"
    # Once a directory holds episodes that did not fail, its settings bind it again.
    with api_server(["right", "other"]) as (url, _):
        code, _, stderr = eval_cli(*EVAL, "--base-url", url, "--model", "other", "--retry-errors", "--out", str(out))
    assert code == 1 and "sampled with other settings" in stderr


def test_a_reasoning_model_gets_max_completion_tokens_after_one_refusal():
    from agentrl.rollout.openai import OpenAIPolicy
    from agentrl.rollout.policy import SamplingParams

    async def two_turns(url: str) -> list[str]:
        policy = OpenAIPolicy("o-model", url, retries=0)
        try:
            await policy.aprobe()
            for _ in range(2):
                generation = await policy.generate([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=7))
            return [generation.text]
        finally:
            await policy.aclose()

    with api_server(["o-model"], reasoning=True) as (url, seen):
        assert "<tool_call>" in asyncio.run(two_turns(url))[0]
    bodies = [r["body"] for r in seen if "body" in r]
    assert [("max_tokens" in b, b.get("max_completion_tokens")) for b in bodies] == [(True, None), (False, 7),
                                                                                     (False, 7)]  # fmt: skip


# ---- RL without a learning signal --------------------------------------------------------------------------
class _ConstantEnv(EchoEnv):
    """Every episode scores the same: no group has any variance, so GRPO has nothing to learn from."""

    def step(self, action):
        result = super().step(action)
        return result._replace(reward=0.5)


def test_grpo_without_a_learning_signal_warns_after_a_few_steps(one_thread):
    from agentrl.learners import loop
    from agentrl.learners.grpo import train_grpo

    agentrl.register("test-constant-v0", lambda: _ConstantEnv(rounds=1), override=True, max_turns=1)
    config = GRPOConfig(env="test-constant-v0", max_steps=loop.SILENT_STEPS, prompts_per_step=2, group_size=2,
                        max_new_tokens=4, warmup_steps=0)  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"grpo: steps 1-5 moved no weight \(gradient norm 0: every group"):
        result = train_grpo(config)
    assert [log.update["grad_norm"] for log in result.history] == [0.0] * loop.SILENT_STEPS


def test_an_unknown_setting_gets_a_did_you_mean():
    from agentrl.pipeline.config import build_run_config

    with pytest.raises(ConfigError, match=r"unknown key 'lrr': did you mean 'lr'\?"):
        GRPOConfig(env="x", lrr=1)
    with pytest.raises(ConfigError, match=r"unknown key 'evl' \(--set evl.tasks=3\): did you mean 'eval'\?"):
        build_run_config("toy-digits", overrides=["evl.tasks=3"])


# ---- tasks drawn with replacement --------------------------------------------------------------------------
def _episode(task_index: int, env_task_id: str, passed: bool):
    from agentrl.evaluation.metrics import EpisodeStats

    return EpisodeStats(f"task-{task_index}", task_index, 0, float(passed), {}, passed, 1, 1, 1, "terminated",
                        None, 0.1, 0, 0, env_task_id=env_task_id)  # fmt: skip


def test_tasks_drawn_twice_are_one_cluster_of_the_interval():
    from agentrl.evaluation.metrics import bootstrap_ci, summarize

    distinct = [1.0, 0.0, 0.0, 0.0, 1.0]
    plain = bootstrap_ci(distinct, seed=3)
    repeated = distinct * 4  # 20 tasks, 5 problems
    naive = bootstrap_ci(repeated, seed=3)
    clustered = bootstrap_ci(repeated, seed=3, clusters_T=[i % 5 for i in range(20)])
    assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])  # repeats no longer narrow it
    assert clustered == pytest.approx(plain, abs=0.11)

    metrics = summarize([_episode(i, f"P{i % 5}", distinct[i % 5] == 1.0) for i in range(20)], [1], seed=3)
    assert (metrics["tasks"], metrics["distinct_tasks"]) == (20, 5)
    assert metrics["pass_at_k"]["1"]["ci"] == pytest.approx(list(clustered))
    unique = summarize([_episode(i, f"P{i}", distinct[i % 5] == 1.0) for i in range(20)], [1], seed=3)
    assert unique["distinct_tasks"] == 20 and unique["pass_at_k"]["1"]["ci"] == pytest.approx(list(naive))


# ---- agentrl check reaches the outcome reward --------------------------------------------------------------
def _shop(reward):
    from agentrl.toolenv import Task, ToolEnv

    def price(item: str) -> float:
        """The price of one item, in dollars.

        Args:
            item: What to price, e.g. "apple".
        """
        return {"apple": 0.5, "melon": 3.0}[item]

    task = Task("How many dollars do 4 apples cost?", answer="2.0",
                demonstration=('<tool_call>\n{"name": "price", "arguments": {"item": "apple"}}\n</tool_call>',
                               "<answer>2.0</answer>"))  # fmt: skip
    return ToolEnv([price], [task], reward=reward, max_turns=4)


def test_check_reaches_the_outcome_reward_of_a_right_answer():
    from agentrl.checker import check_env
    from agentrl.errors import EnvCheckError

    assert "outcome" in check_env(_shop(lambda task, answer: float(answer == task.answer)), skip_gymnasium=True)
    only_wrong = _shop(lambda task, answer: 0.0 if answer != task.answer else None)  # forgot the right case
    with pytest.raises(EnvCheckError, match=r"\[outcome\] the reference episode of task 0 .* returned None"):
        check_env(only_wrong, skip_gymnasium=True)


def test_agentrl_check_takes_env_args_and_names_a_wrong_one():
    run = [sys.executable, "-m", "agentrl.cli", "check"]
    good = subprocess.run([*run, "toy-echo", "--env-arg", "rounds=2"], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0 and "outcome" in good.stdout, good.stderr
    bad = subprocess.run([*run, "toy-echo", "--env-arg", "round=2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "--env-arg" in bad.stderr and "rounds" in bad.stderr, bad.stderr


def test_dpo_on_a_buffer_without_pairs_says_why(tmp_path, one_thread):
    from agentrl.cli import main as agentrl_main
    from agentrl.data.buffer import TrajectoryBuffer
    from agentrl.models.loading import load_model, load_tokenizer
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams
    from agentrl.rollout.runner import rollout

    agentrl.register("test-constant-v0", lambda: _ConstantEnv(rounds=1), override=True, max_turns=1)
    tokenizer = load_tokenizer("tiny")
    groups = rollout("test-constant-v0", HFPolicy(load_model("tiny"), tokenizer, seed=0), tokenizer, 3,
                     group_size=2, sampling=SamplingParams(max_tokens=4), seed=0)  # fmt: skip
    path = tmp_path / "trajectories.jsonl"
    TrajectoryBuffer(groups).save(path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = agentrl_main(["dpo", "--buffer", str(path), "--output-dir", str(tmp_path / "dpo")])
    assert code == 1 and "dpo: 0 pairs mined" in err.getvalue()
    assert "3 groups (tasks); 3 whose rewards differ by no more than --min-margin 0 (every sample scored alike" \
        in err.getvalue(), err.getvalue()


def test_a_run_without_a_recipe_says_what_is_off_and_how_to_turn_it_on():
    from agentrl.pipeline.cli_train import phases_off
    from agentrl.pipeline.config import build_run_config

    notes = phases_off(build_run_config("toy-guess"))
    assert len(notes) == 2 and all("toy-guess has no default_run recipe" in n for n in notes)
    assert "--set sft.demos=N" in notes[0] and "--set eval.tasks=N" in notes[1]
    assert phases_off(build_run_config("toy-guess", overrides=["sft.demos=4", "eval.tasks=2"])) == []


# ---- progress ------------------------------------------------------------------------------------------------
def test_the_eta_follows_the_pace_after_the_first_step_and_knows_the_budget():
    from agentrl.progress import eta_seconds

    assert eta_seconds(0, 99, 0.0, None) is None  # one step says nothing of the pace
    assert eta_seconds(4, 10, 8.0, None) == pytest.approx(20.0)
    assert eta_seconds(4, 10, 8.0, 5.0) == pytest.approx(5.0) and eta_seconds(4, 10, 8.0, 60.0) == pytest.approx(20.0)
    assert eta_seconds(0, 99, 0.0, 30.0) == pytest.approx(30.0) and eta_seconds(4, 10, 8.0, -1.0) == 0.0


def test_a_budget_shows_in_the_eta_and_ends_the_phase_with_a_line():
    from agentrl.progress import Progress

    stream = io.StringIO()
    with Progress("rl", total=250, stream=stream, interval_s=0, budget_s=0.0) as bar:
        bar.update(1, {"reward_mean": 0.5})
        bar.update(2, {"reward_mean": 0.5})
        bar.stopped_early(2, "its time budget")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(", eta 0.0s (budget)") and "eta 0.0s (budget)" in lines[1]
    assert lines[2] == "[rl] stopped at step 2/250 by its time budget"


def test_a_training_run_says_when_its_budget_ends_rl_and_shows_no_transformers_bars(tmp_path):
    run = [sys.executable, "-m", "agentrl.cli", "train", "--env", "toy-digits", "--threads", "1", "--no-report",
           "--set", "learner.max_steps=50", "--set", "learner.max_seconds=0.001", "--set", "learner.max_new_tokens=4",
           "--set", "learner.prompts_per_step=2", "--set", "learner.group_size=2", "--output-dir", str(tmp_path / "r")]
    done = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rl] stopped at step 1/50 by its time budget (learner.max_seconds = 0.001 s" in done.stderr
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr, done.stderr


# ---- the README ----------------------------------------------------------------------------------------------
def test_the_readme_tool_env_snippet_runs_as_pasted():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("\n```", 1)[0] for b in readme.split("```python\n")[1:]]
    snippets = [b for b in blocks if "from agentrl.toolenv import Task, ToolEnv" in b]
    assert len(snippets) == 1, "the README's ToolEnv snippet is gone"
    code = snippets[0].replace('"shop-v0"', '"test-readme-shop-v0"')
    exec(compile(code, "README.md", "exec"), {})  # a fresh namespace, as a new file would be
    env = agentrl.make("test-readme-shop")
    try:
        assert "apples" in env.reset(seed=0)[0][-1]["content"]
    finally:
        env.close()
