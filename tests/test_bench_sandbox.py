"""`agentrl bench sandbox` runs for real (a few programs) and prints its side-by-side table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agentrl.bench.sandbox import percentile


def test_percentile_interpolates():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0


@pytest.mark.slow
def test_bench_sandbox_prints_every_runner_with_ratios():
    done = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "bench", "sandbox", "--programs", "6", "--rounds", "2",
         "--backends", "local", "--workers", "1", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["subprocess"], ["local"])]
    assert [(r[0], r[1]) for r in rows] == [("subprocess", "1"), ("subprocess", "2"), ("local", "1"), ("local", "2")]
    for row in rows:
        p50, p95, per_second, speedup = float(row[2]), float(row[3]), float(row[4]), float(row[5].rstrip("x"))
        assert 0 < p50 <= p95 and per_second > 0 and speedup > 0
        assert row[-1] == "0"  # no program failed
    assert [r[5] for r in rows[:2]] == ["1.00x", "1.00x"]
