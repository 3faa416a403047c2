"""Experiment trackers behind ``tracking.report_to``: each backend in its offline mode, for real (W&B offline
run files, an MLflow file store, trackio's local database, TensorBoard event files), the registry, and
that nothing is imported unless chosen.

MLflow and trackio cannot be installed beside this project's pinned packages (see README, "Experiment
trackers"); their tests run where they are installed and are skipped elsewhere, except under
``AGENTRL_REQUIRE_TRACKERS=1`` (CI runs this file once more in a virtualenv that has them), where a missing
one fails."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from agentrl.errors import ConfigError
from agentrl.trackers import (
    TRACKERS,
    Tracker,
    TrackerRun,
    TrackerSettings,
    check_report_to,
    register_tracker,
)
from agentrl.tracking import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _tracker_package(name: str) -> object:
    """The tracker's package; skipped where it is missing, unless CI requires it."""
    if os.environ.get("AGENTRL_REQUIRE_TRACKERS") == "1":
        return __import__(name)
    return pytest.importorskip(name)


def _log_two_phases(path: Path, settings: TrackerSettings) -> RunDir:
    """sft steps 1-3 and rl steps 1-2 (rl restarts the step count), with a string and a NaN to leave out."""
    run = RunDir(path, tracking=settings)
    run.write_config({"lr": 0.1, "learner": {"group_size": 8}})
    run.start_phase("sft", total=3)
    for step in (1, 2, 3):
        run.log("sft", step, {"loss": 1.0 / step, "note": "text", "bad": math.nan})
    run.finish_phase("sft")
    run.start_phase("rl", total=2)
    for step in (1, 2):
        run.log("rl", step, {"reward": 0.5 * step, "pass@1": 0.25 * step})
    run.finish_phase("rl")
    return run


class _Recorder(Tracker):
    seen: ClassVar[list[tuple[str, str, int, dict[str, float | int]]]] = []

    def __init__(self, run: TrackerRun):
        self.config = dict(run.config)
        _Recorder.seen.append(("open", run.name, 0, {"lr": run.config["lr"]}))

    def start_phase(self, phase: str, step: int, truncated: bool) -> None:
        _Recorder.seen.append(("start", phase, step, {"truncated": int(truncated)}))

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        _Recorder.seen.append(("log", phase, step, dict(metrics)))

    def close(self) -> None:
        _Recorder.seen.append(("close", "", 0, {}))


@pytest.fixture
def recorder():
    _Recorder.seen = []
    register_tracker("recorder", _Recorder)
    yield _Recorder
    TRACKERS.pop("recorder", None)


def test_a_registered_tracker_gets_every_phase_and_numbers_only(tmp_path, recorder):
    _log_two_phases(tmp_path / "run", TrackerSettings(("recorder",), name="my-run")).close()
    kinds = [entry[0] for entry in recorder.seen]
    assert kinds == ["open", "start", "log", "log", "log", "start", "log", "log", "close"]
    assert recorder.seen[0] == ("open", "my-run", 0, {"lr": 0.1})  # opened with the written config
    assert recorder.seen[2] == ("log", "sft", 1, {"loss": 1.0})  # the string and the NaN are left out
    assert recorder.seen[-2] == ("log", "rl", 2, {"reward": 1.0, "pass@1": 0.5})
    assert not (tmp_path / "run" / "tensorboard").exists()  # report_to replaces the default


def test_a_resumed_phase_tells_the_trackers_it_truncated(tmp_path, recorder):
    _log_two_phases(tmp_path, TrackerSettings(("recorder",))).close()
    recorder.seen = []
    with RunDir(tmp_path, tracking=TrackerSettings(("recorder",))) as run:
        run.start_phase("rl", total=2, step=1)
    assert ("start", "rl", 1, {"truncated": 1}) in recorder.seen


def test_unknown_tracker_names_the_closest_and_the_choices():
    with pytest.raises(ConfigError, match=r"did you mean 'wandb'.*tensorboard.*trackio"):
        check_report_to(["wandbb"])
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        RunDir("unused", tracking=TrackerSettings(("neptune",)))
    assert check_report_to(["wandb", "tensorboard", "wandb"]) == ("wandb", "tensorboard")


def test_options_for_an_unknown_tracker_are_refused(tmp_path):
    run = RunDir(tmp_path, tracking=TrackerSettings((), options={"wandbb": {"mode": "offline"}}))
    with pytest.raises(ConfigError, match=r"tracking.options: \['wandbb'\] name no tracker"):
        run.start_phase("sft")


def test_a_tracker_that_is_not_installed_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not there
    run = RunDir(tmp_path, tracking=TrackerSettings(("wandb",)))
    with pytest.raises(ConfigError, match=r"names 'wandb'.*pip install 'agentrl\[trackers\]'"):
        run.start_phase("sft")


def test_nothing_is_imported_unless_chosen(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from agentrl.tracking import RunDir
        from agentrl.trackers import TrackerSettings
        with RunDir({str(tmp_path)!r}, tracking=TrackerSettings(())) as run:
            run.write_config({{"a": 1}})
            run.start_phase("sft")
            run.log("sft", 1, {{"loss": 0.5}})
        heavy = [m for m in ("wandb", "mlflow", "trackio", "torch", "tensorboard") if m in sys.modules]
        print(heavy)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "envs"), str(ROOT / "sandboxes")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _tensorboard_scalars(path: Path, phase: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path / "tensorboard" / phase))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_at_once(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = TrackerSettings(("tensorboard", "wandb"), project="agentrl-test", options={"wandb": {"mode": "offline"}})
    run = _log_two_phases(tmp_path, settings)
    wandb_run = next(t for t in run._trackers or () if type(t).__name__ == "WandbTracker").run
    summary = {k: wandb_run.summary[k] for k in ("sft/loss", "sft/step", "rl/reward", "rl/step", "rl/pass@1")}
    assert wandb_run.config["learner"] == {"group_size": 8}
    run.close()
    assert summary == pytest.approx({"sft/loss": 1 / 3, "sft/step": 3, "rl/reward": 1.0, "rl/step": 2,
                                     "rl/pass@1": 0.5})  # fmt: skip
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    (log,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    keys = (b"sft/loss", b"rl/reward", b"rl/step")
    for _ in range(600):  # W&B's own process may still be writing its transaction log when finish() returns
        if all(key in Path(log).read_bytes() for key in keys):
            break
        time.sleep(0.05)
    assert all(key in Path(log).read_bytes() for key in keys)  # what `wandb sync` uploads
    assert _tensorboard_scalars(tmp_path, "sft")["sft/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert _tensorboard_scalars(tmp_path, "rl")["rl/pass@1"] == [(1, 0.25), (2, 0.5)]

    with RunDir(tmp_path, tracking=settings) as again:  # a resumed run continues the same W&B run
        again.start_phase("rl", total=3, step=2)
        again.log("rl", 3, {"reward": 2.0})
    assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))) == 2  # two sessions, one id


@pytest.mark.slow
def test_mlflow_file_store(tmp_path, monkeypatch):
    _tracker_package("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = TrackerSettings(("mlflow",), project="agentrl-test", name="first")
    _log_two_phases(tmp_path, settings).close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    found = client.get_run(run_id)
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    assert found.data.params == {"lr": "0.1", "learner.group_size": "8"}
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")]
    assert history == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "rl/pass_1")] == [(1, 0.25), (2, 0.5)]
    assert "sft/note" not in found.data.metrics and "sft/bad" not in found.data.metrics

    with RunDir(tmp_path, tracking=settings) as again:
        again.start_phase("rl", total=3, step=2)
        again.log("rl", 3, {"reward": 2.0})
    assert [m.step for m in client.get_metric_history(run_id, "rl/reward")] == [1, 2, 3]
    assert len(client.search_runs([found.info.experiment_id])) == 1


@pytest.mark.slow
def test_trackio_local(tmp_path):
    _tracker_package("trackio")
    script = textwrap.dedent(f"""
        import json, math
        from pathlib import Path
        from tests.test_trackers import _log_two_phases
        from agentrl.trackers import TrackerSettings
        _log_two_phases(Path({str(tmp_path / "run")!r}),
                        TrackerSettings(("trackio",), project="agentrl-test", name="first")).close()
        from trackio.sqlite_storage import SQLiteStorage
        logs = SQLiteStorage.get_logs("agentrl-test", "first")
        print("ROWS", json.dumps([{{k: v for k, v in row.items() if "/" in k}} for row in logs]))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "envs"), str(ROOT / "sandboxes")])}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    sft = [(r["sft/step"], r["sft/loss"]) for r in rows if "sft/loss" in r]
    assert sft == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [(r["rl/step"], r["rl/pass@1"]) for r in rows if "rl/reward" in r] == [(1, 0.25), (2, 0.5)]
    assert not any("sft/note" in r for r in rows)


def test_run_config_tracking_section_and_flag():
    from agentrl.pipeline.cli_train import report_to
    from agentrl.pipeline.config import build_run_config

    run = build_run_config("toy-echo", tracking=report_to("wandb, tensorboard"))
    assert run.tracking.report_to == ["wandb", "tensorboard"]
    assert build_run_config("toy-echo").tracking.settings().report_to == ("tensorboard",)
    assert build_run_config("toy-echo", tracking=report_to("none")).tracking.report_to == []
    overridden = build_run_config("toy-echo", overrides=["tracking.report_to=[mlflow]", "tracking.project=p"])
    assert overridden.tracking.settings() == TrackerSettings(("mlflow",), "p", None, {})
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        build_run_config("toy-echo", overrides=["tracking.report_to=mlfow"])


def test_offline_commands_refuse_an_unknown_tracker_before_loading_anything(tmp_path, capsys):
    from agentrl.cli import main

    data = tmp_path / "demos.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    code = main(["sft", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--report-to", "trackoi"])
    assert code != 0
    assert "unknown tracker 'trackoi' (did you mean 'trackio'?)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_eval_logs_its_summary_to_the_trackers(tmp_path, capsys):
    from agentrl.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--env", "toy-digits", "--model", "tiny", "--n", "2", "--max-new-tokens", "4",
                 "--out", str(out), "--quiet", "--report-to", "tensorboard"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())["metrics"]
    scalars = _tensorboard_scalars(out, "eval")
    assert scalars["eval/pass_at_k/1/value"] == [(0, pytest.approx(results["pass_at_k"]["1"]["value"]))]
    assert scalars["eval/tasks"] == [(0, 2.0)]
    assert main(["eval", "--env", "toy-digits", "--model", "tiny", "--n", "1", "--out", str(tmp_path / "x"),
                 "--report-to", "tensorbord"]) != 0  # fmt: skip
    assert "did you mean 'tensorboard'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
