"""``agentrl bench gpu`` runs end to end on the tiny shape (what a CPU can run; the GPU machine runs the Qwen3
shapes with the same code): every column is measured, the identity check sees the learner's own weights, and
at step 0 the truncated learner's ratios are 1 where an untruncated learner's are the kept mass."""

from __future__ import annotations

import argparse
import json

import pytest

from agentrl.bench import gpu

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_tiny_shape_measures_every_column(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--shapes", "tiny", "--batches", "4", "8", "--prompt", "16", "--new-tokens", "8",
                              "--learner-rows", "2", "--learner-steps", "1", "--out", str(out)])  # fmt: skip
    assert gpu.main(args) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["decode_tok_s_b4"] > 0 and row["decode_tok_s_b8"] > 0 and row["learner_tok_s"] > 0
    assert row["check_gap"] < 1e-5 and row["sync_s"] >= 0 and row["check_s"] > 0
    assert row["ratio_err_max"] < 1e-4  # on-policy at step 0 under top-k 50 / top-p 0.9
    assert row["untruncated_ratio_mean"] < 0.5  # near-uniform random weights: the kept mass is small
    assert "tiny" in capsys.readouterr().out
