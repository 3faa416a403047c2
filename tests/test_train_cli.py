"""``agentrl train``: layered config with errors before any work, a whole tiny run to its run directory, and
a real run killed with SIGKILL then resumed to the same result as a straight run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentrl.errors import ConfigError
from agentrl.pipeline.config import apply_overrides, build_run_config, resolve

TINY_RUN = [
    "--env", "toy-digits", "--threads", "1",
    "--set", "learner.max_steps=6", "--set", "learner.lr=1e-2", "--set", "learner.warmup_steps=0",
    "--set", "learner.max_new_tokens=12", "--set", "learner.save_every=2",
    "--set", "sft.demos=16", "--set", "sft.learner.max_steps=3", "--set", "sft.learner.warmup_steps=0",
    "--set", "sft.learner.batch_size=8", "--set", "eval.tasks=8",
]  # fmt: skip


def agentrl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentrl.cli", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)  # fmt: skip


def rl_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "rl"]


def kill_after_checkpoint(run_dir, step):
    """Start the tiny run into ``run_dir`` and SIGKILL it once its RL checkpoint of ``step`` exists."""
    command = [sys.executable, "-m", "agentrl.cli", "train", *TINY_RUN, "--output-dir", str(run_dir), "--no-report"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "rl" / f"step-{step:06d}").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, f"the run never wrote its step-{step} checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_settings_layer_and_bad_values_name_the_field_and_the_fix(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("algo: rloo\nlearner:\n  lr: 3.0e-4\n  max_steps: 40\n")
    run = build_run_config("toy-digits", config, ["learner.lr=1e-5", "eval.tasks=4"], seed=7)
    resolved = resolve(run, tmp_path / "run")
    assert (run.algo, run.seed, run.eval.tasks) == ("rloo", 7, 4)
    assert resolved.learner.lr == 1e-5 and resolved.learner.max_steps == 40
    assert resolved.learner.advantage == "rloo" and resolved.learner.env == "toy-digits"
    assert resolved.learner.output_dir == tmp_path / "run" / "checkpoints" / "rl"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d=true"]) == {"a": {"b": 1, "c": [1, 2]}, "d": True}
    with pytest.raises(ConfigError, match=r"learner: invalid GRPOConfig:\n  GRPOConfig.lr: got 'fast'"):
        resolve(build_run_config("toy-digits", overrides=["learner.lr=fast"]))
    with pytest.raises(ConfigError, match=r"unknown algo 'sac'; choose one of"):
        build_run_config("toy-digits", algo="sac")
    with pytest.raises(ConfigError, match=r"write key.path=value"):
        build_run_config("toy-digits", overrides=["learner.lr"])


def test_the_later_stages_chain_their_checkpoints_and_check_their_settings_first(tmp_path):
    stages = ["sft.demos=8", "rejection.tasks=4", "rl2.max_steps=8", "rl2.learner.lr=5e-5", "rl2.judge={model: tiny}",
              "gold.every=2", "learner.max_steps=6"]  # fmt: skip
    resolved = resolve(build_run_config("toy-digits", overrides=stages), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert resolved.sampling.model == str(checkpoints / "rl" / "step-000006") == resolved.rejection_sft.model
    assert resolved.sampling.group_size == 8 and resolved.sampling.env == "toy-digits"
    assert resolved.learner2.model == str(checkpoints / "rejection" / "step-000200")
    assert (resolved.learner2.max_steps, resolved.learner2.lr, resolved.learner.lr) == (8, 5e-5, 2e-4)
    without_rejection = resolve(build_run_config("toy-digits", overrides=stages[2:]), tmp_path / "run")
    assert without_rejection.rejection_sft is None
    assert without_rejection.learner2.model == str(checkpoints / "rl" / "step-000006")
    for algo in ("dpo", "ppo"):  # every online learner takes the judge and the gold monitor
        assert build_run_config("toy-digits", overrides=[*stages, f"algo={algo}"]).algo == algo
    with pytest.raises(ConfigError, match=r"unknown key 'rl2.judge.modle' .*did you mean 'rl2.judge.model'\?"):
        resolve(build_run_config("toy-digits", overrides=[*stages[:4], "rl2.judge={modle: tiny}"]))
    with pytest.raises(ConfigError, match=r"rejection.learner: invalid SFTConfig"):
        resolve(build_run_config("toy-digits", overrides=[*stages, "rejection.learner.lr=-1"]))


def test_stages_after_a_time_budget_start_from_the_checkpoint_it_left_also_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    settings = ["learner.max_steps=50", "learner.max_seconds=0.01", "learner.warmup_steps=0",
                "learner.max_new_tokens=8", "rejection.tasks=2", "rejection.group_size=2",
                "rejection.learner.max_steps=1", "rejection.learner.warmup_steps=0", "rejection.learner.batch_size=2",
                "rl2.max_steps=2", "rl2.learner.max_seconds=null", "eval.tasks=2"]  # fmt: skip
    sets = [arg for setting in settings for arg in ("--set", setting)]
    done = agentrl("train", "--env", "toy-digits", "--threads", "1", *sets, "--output-dir", str(run_dir), "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in sorted((checkpoints / "rl").iterdir())] == ["step-000001"]  # the budget ended it
    assert (checkpoints / "rejection" / "step-000001").is_dir() and (checkpoints / "rl2" / "step-000002").is_dir()
    states = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"eval-rl", "rejection", "eval-rejection", "rl2", "eval-rl2"} <= {r["phase"] for r in states}
    for stage in ("RL", "REJECTION", "RL2"):
        assert f"pass@1 after {stage}:" in done.stdout
    again = agentrl("train", "--resume", str(run_dir), "--no-report")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[:3] == done.stdout.splitlines()[:3]  # every phase finished: same figures


def test_dry_run_prints_the_resolved_config_and_errors_exit_before_any_work(tmp_path):
    done = agentrl("train", "--env", "toy-digits", "--set", "learner.max_steps=9", "--dry-run",
                   "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "learner (resolved):" in done.stdout and "max_steps: 9" in done.stdout
    assert not (tmp_path / "run").exists()
    bad = agentrl("train", "--env", "toy-digits", "--set", "sft.learner.batch_size=0", "--set", "sft.demos=4",
                  "--output-dir", str(tmp_path / "bad"))  # fmt: skip
    assert bad.returncode == 1
    assert "SFTConfig.batch_size: got 0" in bad.stderr and "--set sft.learner.<field>" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unknown = agentrl("train", "--env", "no-such-env", "--dry-run")
    assert unknown.returncode == 1 and "no-such-env" in unknown.stderr
    api = agentrl("train", "--env", "toy-digits", "--rollout", "openai", "--dry-run")
    assert api.returncode == 1 and "agentrl eval --base-url" in api.stderr


def test_a_tiny_run_goes_through_every_phase_into_its_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    done = agentrl("train", *TINY_RUN, "--output-dir", str(run_dir), "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pass@1 after SFT:" in done.stdout and "pass@1 after RL:" in done.stdout
    assert "[rl] step 6/6" in done.stderr  # plain progress lines when not on a terminal
    state = json.loads((run_dir / "state.json").read_text())
    assert [name for name in state["phases"]] == ["sft", "eval-sft", "rl", "eval-rl"]
    assert all(p["status"] == "finished" for p in state["phases"].values())
    records = rl_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"]: r["step"] for r in logged if r["phase"].startswith("eval-")} == {"eval-sft": 3, "eval-rl": 6}
    assert {"reward_mean", "pass_rate", "tokens_per_s", "monitor/repeated_ngram_rate"} <= set(records[0]["metrics"])
    assert records[0]["metrics"]["mt/turns_per_episode"] == pytest.approx(1.0)  # toy-digits grades no attempts: no mt/recovery
    assert not {"mt/first_attempt_pass", "mt/recovery", "mt/tool_calls_per_turn"} & set(records[0]["metrics"])
    assert (run_dir / "checkpoints" / "rl" / "step-000006" / "model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tensorboard").rglob("events.out.*"))
    phases = {json.loads(line)["meta"]["phase"] for line in (run_dir / "trajectories.jsonl").read_text().splitlines()}
    assert phases == {"rl"}
    for stage in ("sft", "rl"):  # the harness's own output: results, report, every transcript
        results = json.loads((run_dir / "eval" / stage / "results.json").read_text())
        assert results["metrics"]["tasks"] == 8 and (run_dir / "eval" / stage / "report.html").is_file()


def test_a_run_killed_with_sigkill_resumes_to_the_straight_runs_result(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = agentrl("train", *TINY_RUN, "--output-dir", str(straight), "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]

    kill_after_checkpoint(killed, 2)
    assert not json.loads((killed / "state.json").read_text())["phases"]["rl"]["status"] == "finished"

    resumed = agentrl("train", "--resume", str(killed), "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = rl_records(straight), rl_records(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no step logged twice, none lost
    assert [r["metrics"]["reward_mean"] for r in b] == [r["metrics"]["reward_mean"] for r in a]
    from safetensors.torch import load_file

    final_a = load_file(straight / "checkpoints" / "rl" / "step-000006" / "model.safetensors")
    final_b = load_file(killed / "checkpoints" / "rl" / "step-000006" / "model.safetensors")
    assert all((final_a[k] == final_b[k]).all() for k in final_a)
    again = agentrl("train", "--resume", str(killed), "--set", "learner.lr=1")
    assert again.returncode == 1 and "--resume continues a run with its saved config" in again.stderr


def test_a_resume_skips_a_newest_checkpoint_cut_short_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint(run_dir, 4)
    weights = run_dir / "checkpoints" / "rl" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # what a lost write leaves

    resumed = agentrl("train", "--resume", str(run_dir), "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped the damaged checkpoint" in resumed.stderr and "step-000004 (model.safetensors is truncated" \
        in resumed.stderr and "resuming from" in resumed.stderr and "step-000002" in resumed.stderr
    assert [r["step"] for r in rl_records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_sft_then_dpo_on_pairs_mined_from_a_runs_trajectories(tmp_path):
    sft = agentrl("sft", "--env", "toy-digits", "--demos", "8", "--output-dir", str(tmp_path / "sft"), "--threads", "1",
                  "--set", "max_steps=2", "--set", "warmup_steps=0", "--set", "batch_size=4")  # fmt: skip
    assert sft.returncode == 0, sft.stderr[-2000:]
    model = tmp_path / "sft" / "checkpoints" / "sft" / "step-000002"
    assert f"model: {model}" in sft.stdout
    train = agentrl("train", *TINY_RUN, "--set", "sft.demos=0", "--set", "eval.tasks=0", "--model", str(model),
                    "--output-dir", str(tmp_path / "run"), "--no-report")  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    dpo = agentrl("dpo", "--buffer", str(tmp_path / "run" / "trajectories.jsonl"), "--model", str(model),
                  "--output-dir", str(tmp_path / "dpo"), "--threads", "1", "--set", "max_steps=3",
                  "--set", "warmup_steps=0", "--set", "lr=1e-2")  # fmt: skip
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    assert "pairs mined from" in dpo.stderr and "accuracy 1.00" in dpo.stdout
    assert (tmp_path / "dpo" / "checkpoints" / "dpo" / "step-000003" / "model.safetensors").is_file()
    bad = agentrl("dpo", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "x"),
                  "--loss", "cpo")  # fmt: skip
    assert bad.returncode == 1 and "DPOConfig.loss: got 'cpo'" in bad.stderr


def test_the_code_sandbox_recipe_runs_end_to_end_in_a_small_configuration(tmp_path):
    # The env's own multi-turn recipe (three submissions with public-test feedback, recovery demonstrations,
    # turn-level credit, the local sandbox, pass on all hidden tests), shrunk to seconds; the learning figures
    # belong to the full default, `agentrl train --env code-sandbox`.
    small = ["--set", "sft.demos=32", "--set", "sft.learner.max_steps=2", "--set", "sft.learner.warmup_steps=0",
             "--set", "learner.max_steps=2", "--set", "learner.prompts_per_step=2", "--set", "learner.group_size=4",
             "--set", "learner.warmup_steps=0", "--set", "eval.tasks=6", "--threads", "1"]  # fmt: skip
    environ = {**os.environ, "AGENTRL_CACHE": str(tmp_path / "cache")}
    done = agentrl("train", "--env", "code-sandbox", *small, "--output-dir", str(tmp_path / "run"), env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    share, ci = r"\d+\.\d%", r"\[\d+\.\d, \d+\.\d\]"
    for stage in ("SFT", "RL"):  # the printed shape scripts read
        line = rf"after {stage}: final pass@1 {share} {ci}, first-attempt pass@1 {share} {ci}, recovery "
        assert re.search(line + rf"({share} {ci}|n/a) \(6 held-out tasks\)", done.stdout), done.stdout
    run = tmp_path / "run"
    config = (run / "config.yaml").read_text()
    assert "pass_on: correct" in config and "recover: 0.2" in config and "advantage: turn" in config
    results = json.loads((run / "eval" / "rl" / "results.json").read_text())["metrics"]["multi_turn"]
    assert results["episodes"] == 6 and 1.0 <= results["turns_per_episode"] <= 3.0
    assert 0.0 <= results["first_attempt_pass"]["value"] <= results["final_pass"]["value"] <= 1.0
    assert results["tool_calls_per_turn"] >= 0.0 and 0.0 <= results["tool_error_rate"] <= 1.0
    for record in rl_records(run):  # every RL step logs the multi-turn figures of its rollouts
        assert {"mt/turns_per_episode", "mt/first_attempt_pass", "mt/final_pass"} <= set(record["metrics"])
    report = (run / "report.html").read_text()
    for title in ("First attempts and recovery", "Turns per episode", "Tool calls per turn"):
        assert title in report, title
    assert all((run / "plots" / f"mt_{name}.png").is_file() for name in ("recovery", "turns", "tools"))
    (entry,) = (tmp_path / "cache" / "sft").iterdir()  # the recipe caches its SFT phase
    assert (entry / "checkpoint").is_dir()


def test_a_second_run_with_the_same_sft_phase_takes_it_from_the_cache(tmp_path):
    environ = {**os.environ, "AGENTRL_CACHE": str(tmp_path / "cache")}
    sft_only = [*TINY_RUN, "--set", "sft.cache=true", "--set", "learner.max_steps=1", "--no-report"]
    first = agentrl("train", *sft_only, "--output-dir", str(tmp_path / "a"), env=environ)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "took the finished phase" not in first.stderr
    (entry,) = (tmp_path / "cache" / "sft").iterdir()
    second = agentrl("train", *sft_only, "--output-dir", str(tmp_path / "b"), env=environ)
    assert second.returncode == 0 and f"took the finished phase with the same settings, data, model and code from {entry}" in second.stderr
    sft = [[r["step"], r["metrics"]["loss"]] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "sft"]
    again = [[r["step"], r["metrics"]["loss"]] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "sft"]
    assert sft == again and len(sft) == 3  # the curve is in the second run's log too
    assert (tmp_path / "b" / "checkpoints" / "sft" / "step-000003" / "config.json").is_file()
    changed = agentrl("train", *sft_only, "--set", "sft.learner.lr=1e-3", "--output-dir", str(tmp_path / "c"), env=environ)
    assert changed.returncode == 0 and "took the finished phase" not in changed.stderr
    assert len(list((tmp_path / "cache" / "sft").iterdir())) == 2


def test_rl_starts_from_the_checkpoint_an_sft_time_budget_left(tmp_path):
    cut = [*TINY_RUN, "--set", "sft.learner.max_steps=50", "--set", "sft.learner.max_seconds=0.001",
           "--set", "learner.max_steps=1", "--no-report", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    done = agentrl("train", *cut)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[sft] stopped at step 1/50 by its time budget" in done.stderr
    (rl,) = (tmp_path / "run" / "checkpoints" / "rl").iterdir()
    started = json.loads((rl / "training_state.json").read_text())
    assert "checkpoints/sft/step-000001" in json.dumps(started)


def test_a_run_budget_leaves_rl_the_time_the_evaluation_after_it_needs():
    from agentrl.pipeline.run import rl_seconds

    assert rl_seconds(None, 100.0, 30.0, 510.0) == 510.0  # no run budget: the learner's own limit
    assert rl_seconds(14, 300.0, 40.0, 510.0) == pytest.approx(840 - 300 - 1.25 * 40 - 15)
    assert rl_seconds(14, 300.0, 40.0, 200.0) == 200.0  # never more than the learner's own limit
    assert rl_seconds(14, 300.0, None, None) == pytest.approx(840 - 300 - 15)  # no evaluation to come
    assert rl_seconds(5, 290.0, 40.0, None) == 30.0  # a run already over its budget still trains a little


def test_a_sandbox_that_cannot_run_fails_the_run_before_any_work(tmp_path):
    settings = ["sft.demos=0", "learner.max_steps=1", "learner.warmup_steps=0", "learner.prompts_per_step=1",
                "learner.group_size=2", "learner.max_new_tokens=8", "eval.tasks=2",
                "eval.env_kwargs.sandbox_options.bwrap=/nonexistent/bwrap"]  # fmt: skip
    sets = [arg for setting in settings for arg in ("--set", setting)]
    done = agentrl("train", "--env", "code-sandbox", "--threads", "1", *sets, "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 1
    assert "with eval.env_kwargs=" in done.stderr and "cannot run episodes" in done.stderr
    assert "bubblewrap" in done.stderr and not (tmp_path / "run" / "checkpoints").exists()  # before any work
