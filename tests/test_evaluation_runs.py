"""``agentrl eval`` end to end: the tiny model on a toy env (results, report, plots, transcripts), a run killed
mid-way and resumed, ``--compare``, a real OpenAI-compatible server on loopback, and the code-sandbox env on
HumanEval tasks (the tiny model, and a server that submits known solutions).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import JSONHandler, loopback_server
from test_evaluation import HUMANEVAL, eval_cli, humaneval_rows, results_of

from agentrl.data.trajectory import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

DIGITS = ["--env", "toy-digits-v0", "--n", "6", "--k", "4", "--max-new-tokens", "12", "--pass-threshold", "0.02",
          "--quiet"]  # fmt: skip


def sample_table(results: dict[str, Any]) -> list[tuple[int, int, float, bool, int]]:
    return [
        (t["task_index"], s["sample"], s["reward"], s["passed"], s["sampled_tokens"])
        for t in results["tasks"]
        for s in t["samples"]
    ]


# ---------------------------------------------------------------------------------------------- end to end
def _kill_when_saved(process: subprocess.Popen[bytes], episodes: Path, lines: int) -> None:
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if episodes.exists() and episodes.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.005)
    process.kill()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Iterator[tuple[Path, subprocess.Popen[bytes], threading.Thread]]:
    """``agentrl eval`` in a subprocess, SIGKILLed once 3 episodes are saved (by a watcher thread)."""
    out = tmp_path_factory.mktemp("killed")
    command = [sys.executable, "-m", "agentrl.cli", "eval", *DIGITS, "--concurrency", "1", "--out", str(out)]
    with open(out.parent / "killed.log", "wb") as log:
        process = subprocess.Popen(
            command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log
        )
    watcher = threading.Thread(
        target=_kill_when_saved, args=(process, out / "episodes.jsonl", 3), daemon=True
    )
    watcher.start()
    yield out, process, watcher
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, killed_run) -> Path:
    """An uninterrupted run: toy-digits-v0, the tiny model, 6 tasks x 4 samples (the killed run starts first,
    so its start-up overlaps this one)."""
    out = tmp_path_factory.mktemp("reference")
    code, stdout, stderr = eval_cli(*DIGITS, "--out", str(out))
    assert code == 0, stderr
    assert "pass@1" in stdout and "pass@4" in stdout and "total reward >= 0.02" in stdout
    return out


def test_run_writes_results_report_plots_and_transcripts(reference):
    results = results_of(reference)
    metrics = results["metrics"]
    assert results["config"]["env"] == "toy-digits-v0" and results["config"]["model"] == "tiny"
    assert (metrics["episodes"], metrics["tasks"]) == (24, 6)
    for k in ("1", "4"):
        entry = metrics["pass_at_k"][k]
        assert entry["tasks"] == 6 and entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    tasks = results["tasks"]
    c_T = [t["passed"] for t in tasks]
    assert 0 < sum(c_T) < 24, "the threshold should leave some passes and some failures"
    assert metrics["pass_at_k"]["1"]["value"] == pytest.approx(sum(c_T) / 24)
    assert metrics["pass_at_k"]["4"]["value"] == pytest.approx(np.mean([float(c > 0) for c in c_T]))
    rewards = [s["reward"] for t in tasks for s in t["samples"]]
    assert metrics["reward"]["value"] == pytest.approx(np.mean(rewards))
    assert metrics["reward_components"]["digits"] == pytest.approx(np.mean(rewards))
    assert metrics["stop_reasons"] == {"terminated": 24} and metrics["turns"]["mean"] == 1.0
    assert metrics["sampled_tokens"]["max"] <= 12 and metrics["latency_s"]["min"] > 0
    # Every (task, sample) once, readable as trajectories with their task and seeds.
    trajectories = list(read_jsonl(reference / "episodes.jsonl"))
    keys = {(t.meta["task_index"], t.meta["sample_index"]) for t in trajectories}
    assert len(trajectories) == 24 and keys == {(i, s) for i in range(6) for s in range(4)}
    assert (
        len({t.meta["reset_seed"] for t in trajectories}) == 6
        and len({t.meta["sample_seed"] for t in trajectories}) == 24
    )
    html = (reference / "report.html").read_text()
    plots = sorted(p.name for p in (reference / "plots").glob("*.png"))
    assert {"pass_at_k.png", "reward.png", "turns.png", "tokens.png", "stop_reasons.png"} <= set(plots)
    assert all((reference / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert all(f'src="plots/{p}"' in html for p in plots)
    assert len(list((reference / "transcripts").glob("task-*.html"))) == 6
    assert 'href="transcripts/task-00005.html#sample-3"' in html
    assert "Write digits." in (reference / "transcripts" / "task-00000.html").read_text()


def test_killed_run_resumes_without_duplicates_to_the_same_results(reference, killed_run):
    out, process, watcher = killed_run
    watcher.join(timeout=200)
    process.wait(timeout=30)
    episodes = out / "episodes.jsonl"
    saved = episodes.read_bytes().count(b"\n") if episodes.exists() else 0
    assert 3 <= saved < 24, (out.parent / "killed.log").read_text(errors="replace")[-3000:]
    with open(episodes, "a") as f:
        f.write('{"schema": 1, "token_ids": [1, 2')  # a line torn by a kill mid-write
    code, _, stderr = eval_cli(*DIGITS, "--out", str(out))
    assert code == 0, stderr
    assert "dropping a torn last line" in stderr and f"{saved} of 24 episodes already played" in stderr
    lines = episodes.read_text().splitlines()
    keys = [
        (json.loads(line)["meta"]["task_index"], json.loads(line)["meta"]["sample_index"]) for line in lines
    ]
    assert len(lines) == 24 and len(set(keys)) == 24
    resumed, uninterrupted = results_of(out), results_of(reference)
    assert resumed["timing"]["resumed"] == saved and resumed["timing"]["played"] == 24 - saved
    assert sample_table(resumed) == sample_table(uninterrupted)
    assert resumed["metrics"]["pass_at_k"] == uninterrupted["metrics"]["pass_at_k"]
    assert resumed["metrics"]["reward"] == uninterrupted["metrics"]["reward"]
    # A second rerun plays nothing; a changed sampling setting is refused, naming it.
    code, _, stderr = eval_cli(*DIGITS, "--out", str(out))
    assert code == 0 and "24 of 24 episodes already played" in stderr
    assert len(episodes.read_text().splitlines()) == 24
    code, _, stderr = eval_cli(*DIGITS, "--temperature", "0.5", "--out", str(out))
    assert code == 1 and "temperature: 1.0 there, 0.5 now" in stderr and "another --out" in stderr


def test_compare_two_runs(reference, tmp_path):
    other = tmp_path / "greedy"
    code, _, stderr = eval_cli(*DIGITS, "--temperature", "0", "--out", str(other))
    assert code == 0 and "--temperature 0 samples greedily" in stderr
    code, stdout, _ = eval_cli("--compare", str(reference), str(other), "--out", str(tmp_path / "cmp"))
    assert code == 0
    assert "paired bootstrap over 6 common tasks" in stdout
    for row in ("pass@1", "pass@4", "mean reward", "mean turns", "tool-call error rate"):
        assert row in stdout
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    a, b = results_of(reference), results_of(other)
    reward = next(r for r in result["rows"] if r["metric"] == "mean reward")
    assert reward["diff"] == pytest.approx(b["metrics"]["reward"]["value"] - a["metrics"]["reward"]["value"])
    assert reward["low"] <= reward["diff"] <= reward["high"]
    assert "<table>" in (tmp_path / "cmp" / "compare.html").read_text()


# ---------------------------------------------------------------------------------------------- loopback server
@contextlib.contextmanager
def chat_server(
    answer: Callable[[dict[str, Any]], dict[str, Any]],
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real OpenAI-compatible ``/v1/chat/completions`` server on loopback, answering with ``answer(body)``
    (an assistant message; one with ``"status"`` is sent as that HTTP error instead)."""
    seen: list[dict[str, Any]] = []

    class Handler(JSONHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            message = answer(body)
            status = int(message.pop("status", 200))
            choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
            reply = {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [choice]}
            if status != 200:
                reply = {"error": {"message": message.get("content", "failed"), "code": status}}
            self.send_json(status, reply)

    with loopback_server(Handler) as url:
        yield url, seen


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        ],
    }


def binary_search(body: dict[str, Any]) -> dict[str, Any]:
    """Plays toy-guess-v0: a malformed first guess (a word), then binary search over 1..100."""
    messages = body["messages"]
    if not any(m["role"] == "assistant" for m in messages):
        return _call("guess", {"number": "fifty"})
    low, high, last = 1, 100, None
    for m in messages:
        if m["role"] == "assistant":
            last = json.loads(m["tool_calls"][0]["function"]["arguments"])["number"]
        elif m["role"] == "tool" and isinstance(last, int):
            low, high = (
                (last + 1, high)
                if m["content"] == "higher"
                else (low, last - 1)
                if m["content"] == "lower"
                else (low, high)
            )
    return _call("guess", {"number": (low + high) // 2})


def test_openai_compatible_server_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTRL_TEST_KEY", "sk-loopback")
    out = tmp_path / "served"
    with chat_server(binary_search) as (url, seen):
        code, stdout, stderr = eval_cli(
            "--env",
            "toy-guess",
            "--base-url",
            url,
            "--model",
            "searcher",
            "--api-key-env",
            "AGENTRL_TEST_KEY",
            "--n",
            "3",
            "--k",
            "2",
            "--pass-on",
            "solved",
            "--temperature",
            "0.7",
            "--quiet",
            "--out",
            str(out),
        )
    assert code == 0, stderr
    assert {r["path"] for r in seen} == {"/v1/chat/completions"} and {r["auth"] for r in seen} == {
        "Bearer sk-loopback"
    }
    assert all(
        r["body"]["model"] == "searcher" and r["body"]["tools"][0]["function"]["name"] == "guess"
        for r in seen
    )
    results = results_of(out)
    metrics = results["metrics"]
    assert results["config"]["backend"] == "openai" and results["config"]["api_key_env"] == "AGENTRL_TEST_KEY"
    assert "sk-loopback" not in json.dumps(results) + (out / "run.json").read_text()
    assert metrics["pass_at_k"]["1"]["value"] == 1.0 and metrics["pass_at_k"]["2"]["value"] == 1.0
    samples = [s for t in results["tasks"] for s in t["samples"]]
    assert all(s["reward"] == pytest.approx(0.9) and 2 <= s["turns"] <= 8 for s in samples)
    turns = sum(s["turns"] for s in samples)
    assert len(seen) == turns  # one request per turn
    assert metrics["tool_calls"] == {"calls": turns, "failed": 6, "error_rate": pytest.approx(6 / turns)}
    assert "pass@1" in stdout and "reward component 'solved' summed over turns >= 1" in stdout
    # Rescoring the saved episodes needs no server; it keeps the saved pass rule unless told otherwise.
    code, stdout, _ = eval_cli("--report-only", "--out", str(out))
    assert code == 0 and "'solved' summed over turns >= 1" in stdout and "0 played now" in stdout
    assert results_of(out)["metrics"]["pass_at_k"]["1"]["value"] == 1.0
    code, _, _ = eval_cli("--report-only", "--out", str(out), "--pass-on", "reward")  # 0.9: a format penalty
    assert code == 0 and results_of(out)["metrics"]["pass_at_k"]["1"]["value"] == 0.0
    code, _, _ = eval_cli(
        "--report-only", "--out", str(out), "--pass-on", "reward", "--pass-threshold", "0.9"
    )
    assert code == 0 and results_of(out)["metrics"]["pass_at_k"]["1"]["value"] == 1.0
    code, _, stderr = eval_cli("--report-only", "--out", str(out), "--pass-on", "solvd")
    assert (
        code == 1
        and "no episode has a reward component by that name" in stderr
        and "format, solved" in stderr
    )


# ---------------------------------------------------------------------------------------------- code-sandbox
def test_code_sandbox_humaneval_with_the_tiny_model(tmp_path):
    rows = humaneval_rows(3)
    out = tmp_path / "he-tiny"
    code, _, stderr = eval_cli(
        "--env",
        "code-sandbox",
        "--env-arg",
        f"tasks={HUMANEVAL}",
        "--task-option",
        "task_index",
        "--n",
        "3",
        "--k",
        "2",
        "--max-new-tokens",
        "24",
        "--max-turns",
        "2",
        "--quiet",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    results = results_of(out)
    metrics = results["metrics"]
    assert (metrics["episodes"], metrics["tasks"]) == (6, 3)
    assert [t["env_task_id"] for t in results["tasks"]] == [r["task_id"] for r in rows]
    for entry in metrics["pass_at_k"].values():
        assert 0.0 <= entry["ci"][0] <= entry["value"] <= entry["ci"][1] <= 1.0
    assert set(metrics["reward_components"]) >= {"correct"} and metrics["errors"]["count"] == 0
    assert sum(metrics["stop_reasons"].values()) == 6
    page = (out / "transcripts" / "task-00000.html").read_text()
    assert "HumanEval/0" in page and "has_close_elements" in page


def test_code_sandbox_humaneval_scores_submissions_through_a_server(tmp_path):
    rows = humaneval_rows(3)
    solutions = {r["entry_point"]: r["prompt"] + r["canonical_solution"] for r in rows}
    wrong = rows[1]["entry_point"]

    def submit(body: dict[str, Any]) -> dict[str, Any]:
        task = body["messages"][1]["content"]
        name = next(n for n in solutions if f"def {n}(" in task)
        code = solutions[name] if name != wrong else f"def {name}(*args):\n    return None\n"
        return _call("submit", {"code": code})

    out = tmp_path / "he-served"
    with chat_server(submit) as (url, _):
        code, _, stderr = eval_cli(
            "--env",
            "code-sandbox",
            "--env-arg",
            f"tasks={HUMANEVAL}",
            "--task-option",
            "task_index",
            "--n",
            "3",
            "--k",
            "2",
            "--base-url",
            url,
            "--model",
            "oracle",
            "--quiet",
            "--out",
            str(out),
        )
    assert code == 0, stderr
    results = results_of(out)
    assert [t["passed"] for t in results["tasks"]] == [2, 0, 2]
    assert results["metrics"]["pass_at_k"]["1"]["value"] == pytest.approx(2 / 3)
    assert results["metrics"]["reward_components"]["correct"] == pytest.approx(2 / 3)
    assert results["metrics"]["stop_reasons"] == {"terminated": 6}


def test_failed_episodes_are_kept_and_replayed_with_retry_errors(tmp_path):
    out = tmp_path / "retry"
    args = ["--env", "toy-guess", "--model", "m", "--n", "2", "--k", "2", "--pass-on", "solved", "--quiet"]
    with chat_server(lambda body: {"status": 400, "content": "no such adapter"}) as (url, _):
        code, stdout, stderr = eval_cli(*args, "--base-url", url, "--out", str(out))
    assert code == 1 and "every episode played failed" in stderr and "answered 400: no such adapter" in stderr
    assert "--retry-errors" in stderr and "stop reasons      error 4" in stdout
    with chat_server(binary_search) as (url, seen):
        code, stdout, _ = eval_cli(*args, "--base-url", url, "--out", str(out))  # failures are results
        assert code == 0 and not seen and results_of(out)["metrics"]["errors"]["count"] == 4
        code, stdout, _ = eval_cli(*args, "--base-url", url, "--out", str(out), "--retry-errors")
    assert code == 0 and seen and "4 played now, 0 resumed" in stdout
    results = results_of(out)
    assert results["metrics"]["errors"]["count"] == 0 and results["metrics"]["pass_at_k"]["1"]["value"] == 1.0
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 8  # the latest record of a pair counts


def test_eval_plays_turn_split_ledgers_and_refuses_unknown_history_or_format(tmp_path):
    from agentrl.errors import ConfigError
    from agentrl.evaluation.config import EvalConfig

    out = tmp_path / "split"
    guess = ["--env", "toy-guess-v0", "--n", "2", "--k", "2", "--max-new-tokens", "8", "--max-turns", "3", "--quiet"]
    code, _, stderr = eval_cli(*guess, "--history", "turn_split", "--out", str(out))
    assert code == 0, stderr
    ledgers = read_jsonl(out / "episodes.jsonl")
    multi = [t for t in ledgers if len(t.turns) > 1]
    assert multi and all(len(t.sequence_starts) == len(t.turns) for t in multi)  # one sequence a turn
    with pytest.raises(ConfigError, match="--history"):
        EvalConfig(env="toy-guess-v0", history="split")
    with pytest.raises(ConfigError, match="unknown tool format"):
        EvalConfig(env="toy-guess-v0", tool_format="hermes3")
