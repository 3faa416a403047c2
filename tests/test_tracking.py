"""Run directories: metrics JSONL (NaN, torn lines, a killed writer), TensorBoard events, resume bookkeeping,
trajectories, checkpoints, and the progress display on a terminal and off one."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time

import numpy as np
import pytest

from agentrl.data.trajectory import Trajectory, TurnSpan, read_jsonl
from agentrl.errors import ConfigError
from agentrl.progress import Progress, format_duration, progress_fields
from agentrl.tracking import RunDir, flatten_metrics, read_metrics


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return None
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _trajectory(reward: float) -> Trajectory:
    return Trajectory(
        token_ids=[1, 2, 3],
        logprobs=[0.0, -0.5, -0.25],
        loss_mask=[0, 1, 1],
        turns=[TurnSpan(1, 3, reward, {"correct": reward})],
        meta={"task_id": "t"},
    )


# ---- metrics ------------------------------------------------------------------------------------------
def test_flatten_nests_normalises_and_names_a_bad_value():
    flat = flatten_metrics(
        {
            "reward_mean": np.float32(0.5),
            "samples": np.int64(8),
            "ok": True,
            "note": "x",
            "none": None,
            "update": {"kl": float("nan"), "loss": float("-inf"), "deep": {"x": 1}},
        }
    )
    assert flat == {
        "reward_mean": 0.5,
        "samples": 8,
        "ok": 1,
        "note": "x",
        "none": None,
        "update/kl": None,
        "update/loss": None,
        "update/deep/x": 1,
    }
    assert type(flat["samples"]) is int and type(flat["reward_mean"]) is float
    with pytest.raises(TypeError, match="'update/bad'"):
        flatten_metrics({"update": {"bad": [1, 2]}})


def test_metrics_round_trip_with_nan_as_null(tmp_path):
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("rl", total=2)
        written = run.log(
            "rl",
            1,
            {
                "step": 1,
                "reward_mean": 0.25,
                "update": {"kl": math.nan, "entropy": 2.0},
                "ratio": math.inf,
                "policy": "v1",
            },
        )
        run.log("rl", 2, {"reward_mean": 0.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    raw = json.loads(lines[0], parse_constant=no_constants)  # strict JSON: no NaN / Infinity tokens
    assert raw["metrics"] == {
        "reward_mean": 0.25,
        "update/kl": None,
        "update/entropy": 2.0,
        "ratio": None,
        "policy": "v1",
    }
    records = read_metrics(tmp_path)
    assert [(r.phase, r.step) for r in records] == [("rl", 1), ("rl", 2)]
    assert records[0].metrics == written.metrics and records[0].metrics["update/kl"] is None
    assert records[1].elapsed >= records[0].elapsed >= 0 and records[0].time == pytest.approx(
        time.time(), abs=60
    )
    assert read_metrics(tmp_path, phase="sft") == []


def test_log_needs_a_started_phase_and_phase_names_are_checked(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    with pytest.raises(ConfigError, match=r"start_phase\('rl'\)"):
        run.log("rl", 1, {"x": 1})
    with pytest.raises(ConfigError, match="phase name"):
        run.start_phase("../escape")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_appending(tmp_path):
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("sft")
        run.log("sft", 1, {"loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"phase": "sft", "step": 2, "ti')  # what a kill mid-write leaves
    assert [r.step for r in read_metrics(tmp_path)] == [1]
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("sft", step=1)
        run.log("sft", 2, {"loss": 1.5})
    assert [(r.step, r.metrics["loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 1.5)]
    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft"}\n{"phase": "sft", "step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics record"):
        read_metrics(tmp_path)


_WRITER = textwrap.dedent(
    """
    import sys
    from agentrl.tracking import RunDir

    run = RunDir(sys.argv[1], tensorboard=False)
    run.start_phase("rl", total=10**9)
    step = 0
    while True:
        step += 1
        run.log("rl", step, {"reward_mean": step / 7, "components": {"correct": 0.5, "format": 1.0},
                             "note": "x" * (step % 300)})
    """
)


def test_a_writer_killed_mid_run_leaves_a_readable_log(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        metrics = tmp_path / "metrics.jsonl"
        while not metrics.exists() or metrics.stat().st_size < 200_000:
            assert proc.poll() is None and time.monotonic() < deadline, "the writer died or stalled"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    records = read_metrics(tmp_path)
    assert len(records) > 100
    assert [r.step for r in records] == list(range(1, len(records) + 1))
    assert all(r.metrics["reward_mean"] == pytest.approx(r.step / 7) for r in records)
    state = json.loads((tmp_path / "state.json").read_text())  # atomic: never half written
    assert state["phases"]["rl"]["status"] == "running" and state["phases"]["rl"]["step"] >= len(records) - 1


# ---- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_events_read_back(tmp_path):
    with RunDir(tmp_path) as run:
        run.start_phase("rl")
        for step in (1, 2, 3):
            run.log("rl", step, {"reward_mean": step / 4, "update": {"kl": 0.01 * step}, "policy": "v1"})
        run.start_phase("sft")
        run.log("sft", 1, {"loss": 3.5})
    assert _scalars(tmp_path / "tensorboard" / "rl", "rl/reward_mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    kl = _scalars(tmp_path / "tensorboard" / "rl", "rl/update/kl")
    assert [s for s, _ in kl] == [1, 2, 3] and kl[2][1] == pytest.approx(0.03)
    assert _scalars(tmp_path / "tensorboard" / "rl", "rl/policy") is None  # strings stay in the JSONL
    assert _scalars(tmp_path / "tensorboard" / "sft", "sft/loss") == [(1, 3.5)]


# ---- resume -------------------------------------------------------------------------------------------
def test_resume_truncates_a_phase_past_its_checkpoint_step_and_keeps_the_rest(tmp_path):
    run = RunDir(tmp_path)
    run.write_config({"lr": 1e-3, "output": tmp_path / "x", "betas": (0.9, 0.99)})
    run.start_phase("sft", total=2)
    for step in (1, 2):
        run.log("sft", step, {"loss": 3.0 - step})
    run.finish_phase("sft")
    run.start_phase("rl", total=5)
    for step in range(1, 6):
        run.log("rl", step, {"reward_mean": step / 10})
        run.add_trajectories("rl", step, [_trajectory(step / 10)])
    run.close()  # the run is killed after step 5; its last checkpoint is step 3

    run = RunDir(tmp_path)
    assert run.is_finished("sft") and not run.is_finished("rl")
    phases = run.phases
    assert list(phases) == ["sft", "rl"]
    assert (phases["rl"].status, phases["rl"].step, phases["rl"].total) == ("running", 5, 5)
    assert phases["sft"].seconds > 0
    assert run.read_config() == {"lr": 1e-3, "output": str(tmp_path / "x"), "betas": [0.9, 0.99]}
    elapsed_at_3 = read_metrics(tmp_path, "rl")[2].elapsed

    run.start_phase("rl", total=5, step=3)
    assert [(r.phase, r.step) for r in read_metrics(tmp_path)] == [
        ("sft", 1),
        ("sft", 2),
        ("rl", 1),
        ("rl", 2),
        ("rl", 3),
    ]
    assert [t.meta["step"] for t in read_jsonl(tmp_path / "trajectories.jsonl")] == [1, 2, 3]
    for step in (4, 5):
        run.log("rl", step, {"reward_mean": -step})
        run.add_trajectories("rl", step, [_trajectory(-step)])
    run.finish_phase("rl")
    run.close()

    records = read_metrics(tmp_path, "rl")
    assert [(r.step, r.metrics["reward_mean"]) for r in records] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, -4),
        (5, -5),
    ]
    assert records[3].elapsed >= elapsed_at_3  # run time continues from the checkpoint's record
    trajectories = list(read_jsonl(tmp_path / "trajectories.jsonl"))
    tags = [(t.meta["phase"], t.meta["step"], t.total_reward) for t in trajectories]
    assert tags[-2:] == [("rl", 4, -4.0), ("rl", 5, -5.0)] and trajectories[0].meta["task_id"] == "t"
    state = json.loads((tmp_path / "state.json").read_text())
    status = {name: (entry["status"], entry["step"]) for name, entry in state["phases"].items()}
    assert status == {"sft": ("finished", 2), "rl": ("finished", 5)}
    # TensorBoard hides the events the resumed steps replaced.
    events = _scalars(tmp_path / "tensorboard" / "rl", "rl/reward_mean")
    assert [step for step, _ in events] == [1, 2, 3, 4, 5]
    assert [value for _, value in events] == pytest.approx([0.1, 0.2, 0.3, -4.0, -5.0])
    assert _scalars(tmp_path / "tensorboard" / "sft", "sft/loss") == [(1, 2.0), (2, 1.0)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_restarting_a_phase_afresh_drops_all_its_records(tmp_path):
    with RunDir(tmp_path) as run:
        run.start_phase("eval-base")
        run.log("eval-base", 0, {"pass@1": 0.1})  # killed before finish_phase
    with RunDir(tmp_path) as run:
        assert not run.is_finished("eval-base")
        run.start_phase("eval-base")
        assert read_metrics(tmp_path) == []
        run.log("eval-base", 0, {"pass@1": 0.2})
        run.finish_phase("eval-base")
    assert [r.metrics for r in read_metrics(tmp_path)] == [{"pass@1": 0.2}]
    events = _scalars(tmp_path / "tensorboard" / "eval-base", "eval-base/pass@1")
    assert [(step, round(value, 6)) for step, value in events] == [(0, 0.2)]


def test_latest_checkpoint_finds_the_learners_newest_step(tmp_path):
    from agentrl.learners import checkpoints

    class Weights:  # the checkpoint layout does not depend on the model; this keeps transformers unloaded
        def save_pretrained(self, directory, safe_serialization):
            (directory / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # no tensors

    run = RunDir(tmp_path, tensorboard=False)
    assert run.latest_checkpoint("rl") is None
    directory = run.checkpoint_dir("rl")
    assert directory == tmp_path / "checkpoints" / "rl" and directory.is_dir()
    for step in (2, 4):
        checkpoints.save_checkpoint(checkpoints.step_dir(directory, step), Weights(), step=step)
    (directory / ".step-000006.tmp-crashed").mkdir()  # what a crash mid-save leaves
    assert run.latest_checkpoint("rl") == (directory / "step-000004", 4)


@pytest.mark.parametrize("damaged", ["model.safetensors", "training_state.pt", "training_state.json"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before_saying_why(tmp_path, damaged, capsys):
    from agentrl.learners import checkpoints

    class Weights:
        def save_pretrained(self, directory, safe_serialization):
            header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
            (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))

    run = RunDir(tmp_path, tensorboard=False)
    directory = run.checkpoint_dir("rl")
    for step in (2, 4):
        checkpoints.save_checkpoint(checkpoints.step_dir(directory, step), Weights(), step=step)
    file = directory / "step-000004" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a write cut short
    assert run.latest_checkpoint("rl") == (directory / "step-000002", 2)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "step-000004" in said[0] and damaged in said[0] and "step-000002" in said[0]


def test_a_bad_trajectory_line_stops_a_resume_before_metrics_are_rewritten(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    run.start_phase("rl", total=4)
    for step in (1, 2, 3, 4):
        run.log("rl", step, {"loss": 1.0})
        run.add_trajectories("rl", step, [_trajectory(1.0)])
    run.close()
    metrics = run.metrics_path.read_bytes()
    lines = run.trajectories_path.read_text().splitlines(keepends=True)
    lines[1] = '{"meta": {"phase": "rl", "step": 2}, "token_ids": [1, 2\n'
    run.trajectories_path.write_text("".join(lines))
    again = RunDir(tmp_path, tensorboard=False)
    with pytest.raises(ConfigError, match=r"trajectories.jsonl:2 .*delete or fix that line"):
        again.start_phase("rl", total=4, step=2)
    assert run.metrics_path.read_bytes() == metrics


# ---- progress -----------------------------------------------------------------------------------------
def test_progress_fields_pick_the_headline_numbers():
    assert progress_fields(
        {"reward_mean": 0.4312, "pass_rate": 0.38, "sampled_tokens": 3040, "seconds": 2.0}
    ) == {"reward": "0.431", "pass": "0.380", "tok/s": "1520"}
    assert progress_fields({"loss": 1.25, "tokens": 100, "seconds": 0}) == {"loss": "1.250"}
    assert progress_fields({"tokens_per_s": 99.6, "reward_mean": None}) == {"tok/s": "100"}
    assert (
        format_duration(4.25) == "4.2s"
        and format_duration(65) == "1m05s"
        and format_duration(7500) == "2h05m"
    )


def test_progress_off_a_terminal_prints_plain_lines():
    stream = io.StringIO()
    with Progress("rl", total=4, stream=stream, interval_s=0) as progress:
        assert not progress.tty
        for step in range(1, 5):
            progress.update(
                step, {"reward_mean": step / 4, "pass_rate": 0.5, "sampled_tokens": 100, "seconds": 0.5}
            )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(
        r"\[rl\] step 2/4 \(50%\) reward 0\.500 pass 0\.500 tok/s 200 \| \S+s, eta \S+s", lines[1]
    )
    assert lines[3].startswith("[rl] step 4/4 (100%) reward 1.000") and "eta" not in lines[3]
    assert "\r" not in stream.getvalue()  # no bar redraws in a log file

    stream = io.StringIO()
    progress = Progress("sft", total=100, initial=40, stream=stream, interval_s=3600)
    for step in range(41, 101):
        progress.update(step, {"loss": 1.0})
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "[sft] step 41/100 (41%)",
        "[sft] step 100/100 (100%)",
    ]


def test_progress_on_a_terminal_draws_a_tqdm_bar():
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # rows, columns
    stream = open(slave, "w", encoding="utf-8")  # closed in the finally below
    try:
        progress = Progress("rl", total=3, stream=stream)
        assert progress.tty
        for step in (1, 2, 3):
            progress.update(step, {"reward_mean": 0.5, "pass_rate": 0.25})
        progress.close()
        stream.flush()
        out = b""
        while chunk := _read_ready(master):
            out += chunk
    finally:
        stream.close()
        os.close(master)
    text = out.decode()
    assert "rl: 100%" in text and "3/3" in text and "reward 0.500 pass 0.250" in text and "\r" in text


def _read_ready(fd: int) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], 0.5)
    return os.read(fd, 65536) if ready else b""
