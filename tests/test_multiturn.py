"""Multi-turn figures: the runner keeps each turn's ``info["turn_metrics"]``; first-attempt pass, recovery,
turns, attempts and tool calls computed from them (hand-built trajectories), in the harness's results.json and
report, in the training run's per-step log, its end-of-run lines and its report."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import pytest

import agentrl
from agentrl.core import Env, ResetResult, StepResult
from agentrl.data.trajectory import Trajectory, TurnSpan, read_jsonl, write_jsonl
from agentrl.evaluation.metrics import PassRule, bootstrap_ci
from agentrl.evaluation.multiturn import episode_turns, first_attempt, multi_turn_metrics, multi_turn_section
from agentrl.models.loading import load_tokenizer
from agentrl.rollout.runner import RolloutLimits, Task, rollout
from agentrl.testing import ScriptedPolicy
from agentrl.types import StopReason

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

HOSTILE = "<script>alert(1)</script>"


# ---------------------------------------------------------------------------------------------- hand-built
def episode(*turns: dict[str, float], passed: bool = False, meta: dict | None = None) -> Trajectory:
    """A trajectory of ``len(turns)`` one-token turns; ``passed`` puts ``correct`` 1 on its last turn."""
    n = max(len(turns), 1)
    spans = [TurnSpan(2 * i + 1, 2 * i + 2, 0.0, {"correct": 1.0} if passed and i == n - 1 else {}) for i in range(len(turns))]
    mask = [0] * (2 * n + 1)
    for span in spans:
        mask[span.start] = 1
    return Trajectory(
        token_ids=list(range(2 * n + 1)), logprobs=[-0.1 * m for m in mask], loss_mask=mask, turns=spans,
        meta={"turn_metrics": list(turns), **(meta or {})},
    )  # fmt: skip


CORRECT = PassRule("correct", 1.0)
A_FAIL, A_PASS, NO_ATTEMPT = {"attempt": 1.0, "attempt_passed": 0.0}, {"attempt": 1.0, "attempt_passed": 1.0}, {}


def test_each_figure_against_hand_counts():
    episodes = [
        episode(A_PASS, passed=True),  # first attempt passes
        episode(A_FAIL, A_PASS, passed=True),  # recovers
        episode(A_FAIL, A_FAIL, A_FAIL),  # fails throughout
        episode(NO_ATTEMPT, A_PASS, passed=True),  # talks first, then passes at its first attempt
        episode(NO_ATTEMPT, NO_ATTEMPT),  # never attempts: not a first-attempt pass, not a failed one
    ]
    figures = multi_turn_metrics(episodes, CORRECT)
    assert figures == pytest.approx({
        "final_pass": 3 / 5, "first_attempt_pass": 2 / 5, "recovery": 1 / 2,
        "turns_per_episode": 10 / 5, "attempts_per_episode": 7 / 5,
    })  # fmt: skip
    assert "tool_calls_per_turn" not in figures  # no turn reported tool calls
    assert [first_attempt(t) for t in episodes] == [True, False, False, True, None]
    assert [episode_turns(t, CORRECT).recovered for t in episodes] == [False, True, False, False, False]


def test_the_pass_rule_decides_final_pass_not_the_last_attempt():
    # The env said the attempt passed, but the run's rule (the reward component) says the episode did not.
    assert multi_turn_metrics([episode(A_FAIL, A_PASS, passed=False)], CORRECT)["recovery"] == pytest.approx(0.0)
    assert multi_turn_metrics([episode(A_FAIL, A_PASS, passed=False)], lambda t: True)["recovery"] == pytest.approx(1.0)


def test_tool_figures_and_their_edge_cases():
    calls = [episode({"tool_calls": 2.0, "tool_errors": 1.0}, {"tool_calls": 1.0}), episode({"tool_calls": 1.0})]
    figures = multi_turn_metrics(calls, CORRECT)
    assert figures == pytest.approx({"turns_per_episode": 1.5, "tool_calls_per_turn": 4 / 3, "tool_error_rate": 1 / 4})
    assert "first_attempt_pass" not in figures and "recovery" not in figures  # never invented
    silent = multi_turn_metrics([episode({"tool_calls": 0.0})], CORRECT)
    assert silent == pytest.approx({"turns_per_episode": 1.0, "tool_calls_per_turn": 0.0, "tool_error_rate": 0.0})


def test_no_failed_first_attempt_gives_a_nan_recovery_and_no_episodes_nothing():
    assert math.isnan(multi_turn_metrics([episode(A_PASS, passed=True)], CORRECT)["recovery"])
    assert multi_turn_metrics([], CORRECT) == {}
    # No turn data at all (a single-turn env, or an episode that failed at reset): turns only.
    bare = Trajectory((0,), (0.0,), (0,), (), stop_reason=StopReason.ERROR, error="RuntimeError: x")
    assert multi_turn_metrics([bare, episode(NO_ATTEMPT)], CORRECT) == pytest.approx({"turns_per_episode": 0.5})
    # A list shorter than the turns (an older ledger) reads as empty mappings for the rest.
    short = episode(A_FAIL, NO_ATTEMPT, passed=True)
    short = Trajectory(short.token_ids, short.logprobs, short.loss_mask, short.turns, meta={"turn_metrics": [A_FAIL]})
    assert short.turn_metrics == (A_FAIL, {}) and first_attempt(short) is False


def test_section_intervals_are_the_bootstrap_over_task_clusters():
    episodes = [episode(A_FAIL, A_PASS, passed=True), episode(A_FAIL), episode(A_PASS, passed=True), episode(A_FAIL)]
    clusters = ["t0", "t0", "t1", "t2"]
    section = multi_turn_section(episodes, CORRECT, clusters, resamples=200, seed=3)
    assert section["episodes"] == 4
    assert section["final_pass"]["value"] == pytest.approx(0.5)
    assert section["final_pass"]["ci"] == pytest.approx(
        list(bootstrap_ci([1.0, 0.0, 1.0, 0.0], resamples=200, seed=3, clusters_T=clusters))
    )
    assert section["recovery"]["value"] == pytest.approx(1 / 3) and section["recovery"]["episodes"] == 3
    assert section["recovery"]["ci"] == pytest.approx(
        list(bootstrap_ci([1.0, 0.0, 0.0], resamples=200, seed=3, clusters_T=["t0", "t0", "t2"]))
    )
    assert section["first_attempt_pass"]["value"] == pytest.approx(0.25)
    assert multi_turn_section([episode(NO_ATTEMPT)], CORRECT, ["t0"]) is None


# ---------------------------------------------------------------------------------------------- the runner
SCHEDULES = {0: [True], 1: [False, True], 2: [False, False, False], 3: [None, True]}
"""Per task: each turn's attempt (None: no attempt this turn; True/False: it passed/failed)."""


class AttemptEnv(Env):
    """Each turn follows its task's schedule whatever the model says; two tool calls a turn, the first turn's
    first one erroring. Passing ends the episode with ``correct`` 1; three turns end it otherwise."""

    max_turns = 3

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.options = dict(options or {})
        task = self.options.get("task", (seed or 0) % len(SCHEDULES))  # drawn by seed unless named
        self.schedule, self.turn = SCHEDULES[int(task)], 0
        return ResetResult([{"role": "user", "content": "Write the function."}], {})

    def step(self, action):
        if self.options.get("crash") and self.turn == 1:
            raise RuntimeError("grader exploded")
        if self.options.get("hang") and self.turn == 1:
            time.sleep(1.0)
        attempt = self.schedule[self.turn]
        self.turn += 1
        metrics = {"tool_calls": 2.0, "tool_errors": 1.0 if self.turn == 1 else 0.0, "seconds": 0.5}
        if attempt is not None:
            metrics.update(attempt=1.0, attempt_passed=1.0 if attempt else 0.0)
        if self.options.get("bad"):
            metrics = {"attempt": "yes"}
        done = bool(attempt) or self.turn >= len(self.schedule)
        obs = [] if done else [{"role": "user", "content": f"Tests failed: {HOSTILE}. Try again."}]
        reward = 1.0 if attempt else 0.0
        return StepResult(obs, reward, done, False, {"reward_components": {"correct": reward}, "turn_metrics": metrics})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_the_runner_keeps_each_turns_metrics_through_jsonl(tokenizer, tmp_path):
    tasks = [Task(options={"task": i}, id=f"t{i}") for i in SCHEDULES]
    groups = rollout(AttemptEnv, ScriptedPolicy(tokenizer, "def f(): pass"), tokenizer, tasks)
    trajectories = [t for g in groups for t in g]
    recovering = trajectories[1].meta["turn_metrics"]
    assert recovering == [
        {"tool_calls": 2.0, "tool_errors": 1.0, "seconds": 0.5, "attempt": 1.0, "attempt_passed": 0.0},
        {"tool_calls": 2.0, "tool_errors": 0.0, "seconds": 0.5, "attempt": 1.0, "attempt_passed": 1.0},
    ]  # other names ("seconds") are carried along
    assert [len(t.meta["turn_metrics"]) for t in trajectories] == [len(t.turns) for t in trajectories] == [1, 2, 3, 2]
    write_jsonl(tmp_path / "e.jsonl", trajectories)
    back = list(read_jsonl(tmp_path / "e.jsonl"))
    assert [t.turn_metrics for t in back] == [t.turn_metrics for t in trajectories]
    assert multi_turn_metrics(back, CORRECT) == pytest.approx({
        "final_pass": 0.75, "first_attempt_pass": 0.5, "recovery": 0.5, "turns_per_episode": 2.0,
        "attempts_per_episode": 7 / 4, "tool_calls_per_turn": 2.0, "tool_error_rate": 4 / 16,
    })  # fmt: skip


def test_turns_played_before_an_error_or_the_deadline_keep_their_entries(tokenizer):
    tasks = [Task(options={"task": 2, mode: True}, id=mode) for mode in ("crash", "hang", "bad")]
    groups = rollout(AttemptEnv, ScriptedPolicy(tokenizer, "x"), tokenizer, tasks, limits=RolloutLimits(deadline_s=0.4))
    crash, hang, bad = (g.trajectories[0] for g in groups)
    assert crash.stop_reason is StopReason.ERROR and crash.error == "RuntimeError: grader exploded"
    assert hang.stop_reason is StopReason.DEADLINE
    for trajectory in (crash, hang):  # turn 1 answered, turn 2 never: one entry per ledger turn
        assert len(trajectory.turns) == 2
        assert trajectory.meta["turn_metrics"][0]["attempt_passed"] == pytest.approx(0.0) and trajectory.meta["turn_metrics"][1] == {}
    assert bad.stop_reason is StopReason.ERROR
    assert bad.error == "ValueError: the env's info['turn_metrics']['attempt'] must be a finite number, got 'yes'"
    assert bad.meta["turn_metrics"] == [{}]


def test_an_env_without_turn_metrics_gets_empty_entries(tokenizer):
    [group] = rollout("toy-echo-v0", ScriptedPolicy(tokenizer, "apple"), tokenizer, 1)
    assert group.trajectories[0].meta["turn_metrics"] == [{}, {}, {}]


# ---------------------------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """``evaluate`` with the tiny model on the four scheduled tasks, greedy, once each."""
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.harness import evaluate

    agentrl.register("test-attempts-v0", AttemptEnv, override=True, max_turns=3)
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(env="test-attempts-v0", task_option="task", n=4, k=1, temperature=0.0, max_new_tokens=4,
                        concurrency=2, pass_rule=CORRECT, resamples=300, out=out)  # fmt: skip
    lines: list[str] = []
    outcome = evaluate(config, echo=lines.append, show_progress=False)
    return outcome, out


def test_results_json_has_the_multi_turn_section(eval_run):
    outcome, _ = eval_run
    metrics = outcome.results["metrics"]
    section = metrics["multi_turn"]
    assert section["episodes"] == 4
    assert section["final_pass"]["value"] == pytest.approx(0.75)
    assert section["first_attempt_pass"]["value"] == pytest.approx(0.5)
    assert section["recovery"]["value"] == pytest.approx(0.5) and section["recovery"]["episodes"] == 2
    assert section["turns_per_episode"] == pytest.approx(2.0) and section["attempts_per_episode"] == pytest.approx(1.75)
    assert section["tool_calls_per_turn"] == pytest.approx(2.0) and section["tool_error_rate"] == pytest.approx(0.25)
    # One sample per task: final pass is pass@1, with the very same interval (same bootstrap, same draws).
    assert section["final_pass"]["ci"] == pytest.approx(metrics["pass_at_k"]["1"]["ci"])
    for name in ("first_attempt_pass", "recovery"):
        low, high = section[name]["ci"]
        assert 0.0 <= low <= section[name]["value"] <= high <= 1.0
    firsts = {t["task_index"]: t["samples"][0]["first_attempt_passed"] for t in outcome.results["tasks"]}
    assert firsts == {0: True, 1: False, 2: False, 3: True}


def test_summary_and_report_show_the_figures_and_mark_recovered_episodes(eval_run):
    from agentrl.evaluation.report import format_summary

    outcome, out = eval_run
    summary = format_summary(outcome.results)
    assert re.search(r"first-attempt pass\s+0\.500\s+\[", summary)
    assert re.search(r"recovery\s+0\.500\s+\[.*of the 2 episodes whose first attempt failed", summary)
    assert re.search(r"tool calls / turn\s+2\.00", summary)
    page = (out / "report.html").read_text()
    assert "<h2>Multi-turn</h2>" in page
    assert 'href="transcripts/task-00001.html#sample-0">task=1 sample 0</a>' in page  # the recovered one
    transcript = (out / "transcripts" / "task-00001.html").read_text()
    assert "first attempt failed, recovered ↻" in transcript and HOSTILE not in transcript
    assert "recovered" not in (out / "transcripts" / "task-00002.html").read_text()


def test_a_run_without_attempt_data_has_no_section(tmp_path):
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.harness import build_results
    from agentrl.evaluation.report import format_summary

    config = EvalConfig(env="toy-echo-v0", n=2, k=1, pass_rule=CORRECT, resamples=50, out=tmp_path)
    trajectories = [episode({"tool_calls": 1.0}, meta={"task_index": i, "sample_index": 0}) for i in range(2)]
    results = build_results(config, trajectories)
    assert "multi_turn" not in results["metrics"] and "multi-turn" not in format_summary(results)
    assert all("first_attempt_passed" not in s for t in results["tasks"] for s in t["samples"])


# ---------------------------------------------------------------------------------------------- training run
def test_eval_result_and_the_end_of_run_lines(eval_run):
    from agentrl.pipeline.cli_train import eval_lines
    from agentrl.pipeline.run import EvalResult

    outcome, out = eval_run
    result = EvalResult.from_results(outcome.results, out)
    assert result.first_attempt == pytest.approx(0.5) and result.recovery == pytest.approx(0.5)
    logged = result.metrics()
    assert {"mt/first_attempt_pass", "mt/first_attempt_pass/ci_low", "mt/recovery/ci_high", "mt/turns_per_episode",
            "mt/tool_error_rate"} <= set(logged)  # fmt: skip
    first, second = eval_lines("sft", result)
    pattern = (r"after SFT: final pass@1 (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\], first-attempt pass@1 (\d+\.\d)% "
               r"\[(\d+\.\d), (\d+\.\d)\], recovery (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\] \((\d+) held-out tasks\)")  # fmt: skip
    match = re.fullmatch(pattern, first)
    assert match and match.group(1) == "75.0" and match.group(4) == "50.0" and match.group(7) == "50.0"
    assert match.group(10) == "4" and re.fullmatch(r"after SFT: mean reward 0\.750", second)


def test_the_line_formatter_by_hand():
    from agentrl.pipeline.cli_train import eval_lines
    from agentrl.pipeline.run import EvalResult

    plain = EvalResult(0.31, (0.26, 0.363), 0.4125, 300, None)  # type: ignore[arg-type]
    assert eval_lines("rl", plain) == ["pass@1 after RL: 31.0% (300 held-out tasks, mean reward 0.412)"]
    multi = EvalResult(0.31, (0.26, 0.363), 0.5, 300, None, 0.22, (0.175, 0.269), 0.115, (0.079, 0.154))  # type: ignore[arg-type]
    assert eval_lines("rejection", multi) == [
        "after REJECTION: final pass@1 31.0% [26.0, 36.3], first-attempt pass@1 22.0% [17.5, 26.9], recovery "
        "11.5% [7.9, 15.4] (300 held-out tasks)",
        "after REJECTION: mean reward 0.500",
    ]
    none_failed = EvalResult(1.0, (1.0, 1.0), 1.0, 3, None, 1.0, (1.0, 1.0), math.nan, (math.nan, math.nan))  # type: ignore[arg-type]
    assert "recovery n/a (3 held-out tasks)" in eval_lines("rl2", none_failed)[0]


def test_train_report_plots_the_figures_and_shows_recovered_transcripts(eval_run, tmp_path):
    from agentrl.pipeline.run import EvalResult
    from agentrl.tracking import RunDir, read_metrics
    from agentrl.train_report import charts_for, write_train_report

    outcome, out = eval_run
    shutil.copytree(out, tmp_path / "eval" / "rl")
    result = EvalResult.from_results(outcome.results, tmp_path / "eval" / "rl")
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("eval-sft")
        run.log("eval-sft", 0, {**result.metrics(), "mt/recovery": 0.25})
        run.finish_phase("eval-sft")
        run.start_phase("rl", total=5)
        for step in range(1, 6):
            run.log("rl", step, {"reward_mean": 0.1 * step, "mt/first_attempt_pass": 0.1 * step,
                                 "mt/recovery": math.nan if step == 1 else 0.2 * step,
                                 "mt/turns_per_episode": 3 - 0.2 * step, "mt/tool_calls_per_turn": 1.5})  # fmt: skip
        run.finish_phase("rl")
        run.start_phase("eval-rl")
        run.log("eval-rl", 5, result.metrics())
        run.finish_phase("eval-rl")
    page = write_train_report(tmp_path).read_text()
    assert {"mt_recovery.png", "mt_turns.png", "mt_tools.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}
    charts = {c.name: c for c in charts_for(read_metrics(tmp_path))}
    recovery = {s.label: list(s.steps) for s in charts["mt_recovery"].series}
    assert recovery == {"first_attempt_pass": [1, 2, 3, 4, 5], "recovery": [2, 3, 4, 5]}  # NaN: no point
    assert [s.label for s in charts["mt_turns"].series] == ["turns_per_episode"]
    text = re.sub(r"<[^>]+>", " ", page)
    ci = r"\[[\d.]+, [\d.]+\]"
    # side by side, each with its interval: final pass@1, first-attempt pass@1, recovery, turns, attempts, ...
    assert re.search(rf"Multi-turn evaluations.*\ssft\s+0\.75 {ci}\s+0\.5 {ci}\s+0\.25 {ci}\s+2\s+1\.75\s+2\s+0\.25", text)
    assert re.search(rf"after rl\s+0\.75 {ci}\s+0\.5 {ci}\s+0\.5 {ci}\s+2\s+1\.75", text)
    assert "Recovered episodes (after rl)" in text and "task=1" in text and "first attempt failed, recovered" in text
    assert text.count("first attempt failed, recovered") == 1  # only one episode of the four recovered
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_agentrl_train_logs_the_figures_per_step_and_prints_the_multi_turn_lines(tmp_path, capsys):
    """A whole tiny run in this process (the env is registered here): RL 2 steps, held-out eval of 4 tasks."""
    from agentrl.cli import main

    agentrl.register("test-attempts-v0", AttemptEnv, override=True, max_turns=3)
    overrides = ["learner.max_steps=2", "learner.max_new_tokens=4", "learner.warmup_steps=0", "eval.tasks=4",
                 "eval.pass_on=correct", "sft.demos=0", "learner.save_every=2"]  # fmt: skip
    argv = ["train", "--env", "test-attempts-v0", "--threads", "1", "--report-to", "none", "--output-dir",
            str(tmp_path / "run"), *(x for o in overrides for x in ("--set", o))]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^after RL: final pass@1 \d+\.\d% \[\d+\.\d, \d+\.\d\], first-attempt pass@1 \d+\.\d% "
                     r"\[\d+\.\d, \d+\.\d\], recovery (n/a|\d+\.\d% \[\d+\.\d, \d+\.\d\]) \(4 held-out tasks\)$",
                     printed, re.M), printed  # fmt: skip
    assert re.search(r"^after RL: mean reward \d\.\d{3}$", printed, re.M)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["metrics"] for r in records if r["phase"] == "rl"]
    assert len(steps) == 2
    for metrics in steps:
        assert {"mt/final_pass", "mt/first_attempt_pass", "mt/recovery", "mt/turns_per_episode",
                "mt/attempts_per_episode", "mt/tool_calls_per_turn", "mt/tool_error_rate"} <= set(metrics)  # fmt: skip
        assert metrics["mt/final_pass"] == pytest.approx(metrics["pass_rate"])
        assert metrics["mt/tool_calls_per_turn"] == pytest.approx(2.0)
    [evaluated] = [r["metrics"] for r in records if r["phase"] == "eval-rl"]
    assert {"mt/first_attempt_pass", "mt/first_attempt_pass/ci_low", "mt/recovery/ci_high"} <= set(evaluated)
    assert "Multi-turn evaluations" in (tmp_path / "run" / "report.html").read_text()
