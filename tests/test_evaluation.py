"""``agentrl eval``: the pass@k estimator, bootstrap intervals, episode statistics, escaping in the report,
and the errors bad input gets. The runs end to end are in ``test_evaluation_runs.py``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentrl.cli import main as agentrl_main
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.evaluation.metrics import (
    PassRule,
    bootstrap_ci,
    episode_stats,
    paired_bootstrap,
    pass_at_k,
    tool_call_counts,
    unpaired_bootstrap,
)
from agentrl.evaluation.report import escape, render_transcript
from agentrl.evaluation.store import EpisodeStore

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]
HUMANEVAL = ROOT.parent / "shared" / "datasets" / "humaneval.jsonl"


def eval_cli(*argv: str) -> tuple[int, str, str]:
    """``agentrl eval ...`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = agentrl_main(["eval", *argv])
    return code, out.getvalue(), err.getvalue()


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def humaneval_rows(n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the shared HumanEval copy (read where it is, never copied)."""
    if not HUMANEVAL.is_file():
        pytest.skip(f"no HumanEval copy at {HUMANEVAL}")
    return [json.loads(line) for line in HUMANEVAL.read_text().splitlines()[:n]]


# ---------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
        (10, 1, 1, 0.1),
        (10, 3, 1, 0.3),  # pass@1 is the pass rate, whatever order the passing samples came in
        (10, 0, 5, 0.0),
        (4, 4, 1, 1.0),
        (3, 1, 3, 1.0),  # n - c < k: every k-subset holds the passing sample
        (200, 1, 100, 0.5),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumerating_every_subset():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    n, c, k = 10_000, 5, 1_000
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="draw more samples"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="between 0 and n"):
        pass_at_k(3, 4, 1)


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = np.random.default_rng(1).random(30)
    low, high = bootstrap_ci(values, resamples=1000, seed=7)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, resamples=1000, seed=7)
    assert (low, high) != bootstrap_ci(values, resamples=1000, seed=8)
    narrow = bootstrap_ci(values, confidence=0.5, seed=7)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_ci([0.25], seed=0) == (0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_ci([], seed=0))


def test_bootstrap_interval_has_about_its_nominal_coverage():
    rng = np.random.default_rng(0)
    p, hits, trials = 0.3, 0, 300
    for trial in range(trials):
        low, high = bootstrap_ci(rng.random(60) < p, resamples=500, seed=trial)
        hits += low <= p <= high
    assert 0.88 <= hits / trials <= 0.99


def test_paired_bootstrap_is_narrower_than_unpaired_on_the_same_tasks():
    rng = np.random.default_rng(2)
    a = rng.random(40)  # task difficulty shared by both runs
    b = a + 0.05 + 0.02 * rng.standard_normal(40)
    paired = paired_bootstrap(a, b, seed=3)
    unpaired = unpaired_bootstrap(a, b, seed=3)
    assert paired["diff"] == pytest.approx(b.mean() - a.mean()) == pytest.approx(unpaired["diff"])
    assert 0 < paired["low"] < paired["diff"] < paired["high"] and paired["p_b_not_better"] == 0.0
    assert paired["high"] - paired["low"] < (unpaired["high"] - unpaired["low"]) / 5
    same = paired_bootstrap(a, a + 0.1, seed=0)
    assert same["low"] == pytest.approx(0.1) and same["high"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- episodes
def _trajectory(
    turn_parts: list[dict[str, float]], messages: list[dict[str, Any]], error: str | None = None, **meta: Any
) -> Trajectory:
    turns, ids = [], [1, 2]
    for parts in turn_parts:
        turns.append(TurnSpan(len(ids), len(ids) + 2, sum(parts.values()), parts))
        ids += [3, 4, 5]
    mask = [0] * len(ids)
    for t in turns:
        mask[t.start : t.end] = [1] * (t.end - t.start)
    logprobs = [-0.5 if m else 0.0 for m in mask]
    return Trajectory(
        ids, logprobs, mask, turns, messages, error=error, meta={"task_index": 0, "sample_index": 0, **meta}
    )


def test_pass_rule_episode_stats_and_tool_call_errors():
    messages = [
        {"role": "user", "content": "Find it."},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "guess", "arguments": {"number": "x"}}</tool_call>'
            "<tool_call>{not json</tool_call>",
        },
        {"role": "tool", "tool_call_id": "call_0", "name": "guess", "content": "Error: invalid arguments"},
        {"role": "tool", "content": "Error: tool call 2 is not valid JSON"},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "guess", "arguments": {"number": 7}}</tool_call>',
        },
        {"role": "tool", "tool_call_id": "call_0", "name": "guess", "content": "correct"},
    ]
    assert tool_call_counts(messages) == (3, 2)  # the malformed block counts once, not again for its report
    trajectory = _trajectory(
        [{"solved": 0.0, "format": -0.1}, {"solved": 1.0, "format": 0.0}],
        messages,
        elapsed_s=0.5,
        group_id="task-0",
    )
    stats = episode_stats(trajectory, PassRule("reward", 1.0))
    assert not stats.passed and stats.reward == pytest.approx(0.9)
    assert (stats.turns, stats.sampled_tokens, stats.tool_calls, stats.tool_errors) == (2, 4, 3, 2)
    assert dict(stats.components) == pytest.approx({"solved": 1.0, "format": -0.1})
    assert episode_stats(trajectory, PassRule("solved", 1.0)).passed
    assert episode_stats(trajectory, PassRule("reward", 0.9)).passed  # 0.9 from float sums still reaches 0.9
    assert PassRule("solved", 1.0).describe() == "reward component 'solved' summed over turns >= 1"


def test_transcripts_escape_model_output():
    hostile = '</pre><script>alert("x")</script><img src=x onerror=alert(1)> & \x08\x1b[0m'
    call = {"name": "submit", "arguments": {"code": "print(1)\n</pre><script>evil()</script>", "<k>": "<v>"}}
    messages = [
        {"role": "user", "content": "Say <b>hi</b>"},
        {"role": "assistant", "content": hostile},
        {"role": "tool", "name": "<t>", "tool_call_id": "<id>", "content": "<i>out</i>"},
        {"role": "assistant", "content": f"<u>why</u> <tool_call>{json.dumps(call)}</tool_call>"},
    ]
    trajectory = _trajectory(
        [{"correct": 0.0}, {"correct": 0.0}], messages, error='ValueError: <bad> "quote"'
    )
    results = {"config": {"env": "e<v>", "backend": "hf", "model": "m&m"}, "pass_rule": "total reward >= 1"}
    sample = {"sample": 0, "passed": False, "reward": 0.0, "turns": 2, "sampled_tokens": 4,
              "stop_reason": "error", "latency_s": 0.1}  # fmt: skip
    task = {
        "task_id": "<task>",
        "task_index": 0,
        "n": 1,
        "passed": 0,
        "mean_reward": 0.0,
        "samples": [sample],
    }
    page = render_transcript(results, task, [trajectory], (None, None))
    for raw in ("<script", "<img", "<b>", "<i>", "<u>", "<k>", "<v>", "<t>", "<id>", "<task>", "<bad>"):
        assert raw not in page, raw
    assert "&lt;/pre&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "\\x08\\x1b[0m" in page and "\x08" not in page and "\x1b" not in page
    assert "ValueError: &lt;bad&gt; &quot;quote&quot;" in page and "e&lt;v&gt; × hf:m&amp;m" in page
    assert (
        "→ call <strong>submit</strong>" in page and "print(1)\n&lt;/pre&gt;&lt;script&gt;evil()" in page
    )  # code laid out
    assert escape("a'b") == "a&#x27;b"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "toy-digit"], "Did you mean 'toy-digits'"),
        (
            ["--env", "toy-digits", "--k", "2", "--ks", "1,5"],
            "pass@5 needs at least 5 samples per task, but --k is 2: raise --k to 5",
        ),
        (["--env", "toy-digits", "--n", "0"], "--n must be a positive integer"),
        (["--env", "toy-digits", "--env-arg", "rounds=3"], "cannot be made with --env-arg rounds=3"),
        (["--env", "toy-digits", "--base-url", "127.0.0.1:8000/v1"], "--base-url must start with http://"),
        (["--env", "toy-digits", "--backend", "openai"], "the openai backend needs --base-url"),
        (["--n", "3"], "--env is required"),
        (["--report-only"], "--report-only needs --out"),
    ],
)
def test_bad_input_names_the_fix(argv, message, tmp_path):
    code, _, stderr = (
        eval_cli(*argv, "--out", str(tmp_path / "x")) if "--report-only" not in argv else eval_cli(*argv)
    )
    assert code == 1 and message in stderr, stderr


def test_bad_task_selection_and_directories(tmp_path):
    rows = len(humaneval_rows(200))
    code, _, stderr = eval_cli(
        "--env",
        "code-sandbox",
        "--env-arg",
        f"tasks={HUMANEVAL}",
        "--task-option",
        "task_index",
        "--n",
        str(rows + 1),
        "--out",
        str(tmp_path / "he"),
    )
    assert code == 1 and f"cannot reset task {rows}" in stderr and "lower --n" in stderr
    code, _, stderr = eval_cli("--compare", str(tmp_path), str(tmp_path))
    assert code == 1 and "has no results.json" in stderr
    code, _, stderr = eval_cli("--report-only", "--out", str(tmp_path / "nothing"))
    assert code == 1 and "holds no agentrl eval run" in stderr
    with (
        EpisodeStore(tmp_path / "locked"),
        pytest.raises(ConfigError, match="another agentrl eval is writing"),
    ):
        EpisodeStore(tmp_path / "locked").__enter__()


def test_command_module_is_light():
    code = (
        "import sys, agentrl.evaluation.cli as c, argparse; c.add_arguments(argparse.ArgumentParser()); "
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'httpx') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
