"""``agentrl bench async`` in its one-process mode: both reward curves are printed, and for a synchronous run
the curve by sampling version is the curve by step (each step samples with the weights of the step before)."""

from __future__ import annotations

import argparse
import ast
import re

import pytest

from agentrl.bench import async_bench

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_a_synchronous_run_samples_each_version_once(capsys):
    parser = argparse.ArgumentParser()
    async_bench.add_arguments(parser)
    args = parser.parse_args(["--steps", "3", "--tasks", "2", "--group", "2", "--turns", "2", "--p50", "0.01",
                              "--p99", "0.05", "--modes", "single"])  # fmt: skip
    assert async_bench.main(args) == 0
    out = capsys.readouterr().out
    by_step = ast.literal_eval(re.search(r"reward curve (\[.*\])", out).group(1))
    by_version = ast.literal_eval(re.search(r"reward by the version that sampled it (\[.*\])", out).group(1))
    assert len(by_step) == 3 and by_version == pytest.approx(by_step, abs=1e-3)
