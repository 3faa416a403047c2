"""`agentrl bench sandbox` runs for real (a few programs) and prints its side-by-side table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentrl.bench.sandbox import _fork_run, load_tasks, percentile
from agentrl.errors import ConfigError


def test_percentile_interpolates():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0


def test_fork_baseline_runs_and_fails_programs():
    assert _fork_run("import sys\nprint(len(sys.stdin.read()))", b"abc")
    assert not _fork_run("raise ValueError('no')", b"")
    assert not _fork_run("while True:\n    pass\n", b"", seconds=0.3)  # its SIGALRM time limit


def test_tasks_file_gives_reference_programs(tmp_path):
    row = {"prompt": "def f(x):\n", "canonical_solution": "    return x + 1\n", "entry_point": "f",
           "test": "def check(c):\n    assert c(1) == 2\n"}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (program,) = load_tasks(str(path))
    exec(program, {})  # the reference passes its own test
    with pytest.raises(ConfigError, match="HumanEval-format"):
        load_tasks(str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_bench_sandbox_prints_every_runner_with_ratios():
    done = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "bench", "sandbox", "--programs", "6", "--rounds", "2",
         "--backends", "local", "--workers", "1", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    runners = ("subprocess", "fork", "local")
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in runners and not line.split()[1].startswith("x")]
    assert [(r[0], r[1]) for r in rows] == [(name, w) for name in runners for w in ("1", "2")]
    for row in rows:
        p50, p95, per_second = float(row[2]), float(row[3]), float(row[4])
        vs_subprocess, vs_fork = float(row[5].rstrip("x")), float(row[6].rstrip("x"))
        assert 0 < p50 <= p95 and per_second > 0 and vs_subprocess > 0 and vs_fork > 0
        assert row[-1] == "0"  # no program failed
    assert [r[5] for r in rows[:2]] == ["1.00x", "1.00x"] and [r[6] for r in rows[2:4]] == ["1.00x", "1.00x"]
    phases = [line for line in done.stdout.splitlines() if line.startswith("local x")]
    assert len(phases) == 2 and all("program" in line and "channel" in line for line in phases)
