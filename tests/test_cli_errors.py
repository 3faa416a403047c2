"""A user's mistake at the command line ends in one ``agentrl: error:`` sentence naming the file or flag and
the fix (exit code 1), never a traceback, and nothing already on disk is created, rewritten or lost.

Most tests call :func:`agentrl.cli.main` in-process (an escaping exception is the traceback a user would
see); the alias bomb runs as a subprocess, bounded by a timeout."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentrl.cli import main
from agentrl.errors import ConfigError
from agentrl.pipeline.config import load_yaml

pytestmark = pytest.mark.usefixtures("one_thread")  # the CLI runs in-process and sets torch's threads: restored after


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``agentrl argv``; assert it exits 1 with an error and no traceback; return the error."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "agentrl: error: " in err and "Traceback" not in err, err
    return err[err.index("agentrl: error: "):]  # after any progress lines


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes("env: toy-digits\n# caf\xe9\n".encode("latin-1"))
    err = fails(capsys, "train", "--config", str(config), "--dry-run")
    assert str(config) in err and "UTF-8" in err


def test_yaml_aliases_are_refused_so_an_alias_bomb_cannot_hang_the_run(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["env: toy-digits", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\nlearner: {lr: *a9}\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml.*alias"):
        load_yaml(bomb)
    done = subprocess.run([sys.executable, "-m", "agentrl.cli", "train", "--config", str(bomb), "--dry-run"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr and "alias" in done.stderr
    anchors = tmp_path / "anchors.yaml"  # an anchor used once is harmless: still refused, with the fix
    anchors.write_text("env: toy-digits\nlearner: &l {lr: 0.1}\nrl2: {learner: *l}\n")
    with pytest.raises(ConfigError, match=r"write the value out"):
        load_yaml(anchors)


def test_an_output_dir_that_is_a_file_fails_at_dry_run(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    err = fails(capsys, "train", "--env", "toy-digits", "--output-dir", str(file), "--dry-run")
    assert str(file) in err and "--output-dir" in err
    err = fails(capsys, "train", "--env", "toy-digits", "--output-dir", str(file / "run"), "--dry-run")
    assert str(file) in err
    err = fails(capsys, "sft", "--data", str(file), "--output-dir", str(file), "--dry-run")
    assert "--output-dir" in err
    assert file.read_text() == "mine"


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` with ``options`` for the block (the test skips where mounting is not allowed)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip(f"needs permission to mount a tmpfs ({options})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_unwritable_output_dir_fails_before_any_work(tmp_path, capsys):
    err = fails(capsys, "train", "--env", "toy-digits", "--output-dir", "/sys/agentrl-run", "--dry-run")
    assert "/sys" in err and "--output-dir" in err


def test_a_read_only_output_dir_fails_before_any_work(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "size=1M,ro") as mount:
        err = fails(capsys, "train", "--env", "toy-digits", "--output-dir", str(mount / "run"))
        assert str(mount) in err and "read-only" in err.lower()


def test_resume_of_a_file_or_a_missing_path_names_it_and_creates_nothing(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    err = fails(capsys, "train", "--resume", str(file))
    assert str(file) in err and "--resume" in err
    missing = tmp_path / "no-such-run"
    err = fails(capsys, "train", "--resume", str(missing))
    assert str(missing) in err and "--resume" in err
    assert not missing.exists()


def test_eval_out_that_is_a_file_fails_before_any_model_loads(tmp_path, capsys):
    file = tmp_path / "results"
    file.write_text("mine")
    err = fails(capsys, "eval", "--env", "toy-digits", "--model", "tiny", "--n", "1", "--out", str(file))
    assert str(file) in err and "--out" in err
    assert file.read_text() == "mine"


def test_offline_commands_name_a_missing_input_file_and_bad_env_kwargs(tmp_path, capsys):
    out = tmp_path / "out"
    err = fails(capsys, "sft", "--data", str(tmp_path / "none.jsonl"), "--output-dir", str(out))
    assert "--data" in err and "none.jsonl" in err
    err = fails(capsys, "dpo", "--buffer", str(tmp_path / "none.jsonl"), "--output-dir", str(out))
    assert "--buffer" in err and "none.jsonl" in err
    err = fails(capsys, "dpo", "--data", str(tmp_path / "none.jsonl"), "--output-dir", str(out))
    assert "--data" in err
    err = fails(capsys, "sft", "--env", "toy-digits", "--env-kwargs", "{bad", "--output-dir", str(out), "--dry-run")
    assert "--env-kwargs" in err and "JSON" in err
    assert not out.exists()


def test_an_unknown_env_kwarg_fails_at_dry_run_naming_the_section_and_the_env_arguments(tmp_path, capsys):
    err = fails(capsys, "train", "--env", "code-sandbox", "--set", "env_kwargs.taks=rl",
                "--output-dir", str(tmp_path / "run"), "--dry-run")  # fmt: skip
    assert "'env_kwargs.taks'" in err and "did you mean 'env_kwargs.tasks'" in err and "CodeSandboxEnv" in err
    err = fails(capsys, "train", "--env", "toy-digits", "--set", "eval.tasks=4", "--set", "eval.env_kwargs.split=x",
                "--output-dir", str(tmp_path / "run"), "--dry-run")  # fmt: skip
    assert "'eval.env_kwargs.split'" in err and "no key goes under eval.env_kwargs" in err
    assert "toy-digits-v0" in err
    err = fails(capsys, "sft", "--env", "toy-digits", "--env-kwargs", '{"split": "x"}',
                "--output-dir", str(tmp_path / "sft"), "--dry-run")  # fmt: skip
    assert "--env-kwargs" in err and "'split'" in err
    assert not (tmp_path / "run").exists()


def _stopped_run(run_dir) -> None:
    """A run directory as a run killed during its RL phase leaves it (no checkpoint yet)."""
    from agentrl.pipeline.config import build_run_config
    from agentrl.tracking import RunDir

    settings = ["sft.demos=0", "eval.tasks=0", "learner.max_steps=4", "learner.warmup_steps=0"]
    run = RunDir(run_dir, tensorboard=False)
    run.write_config(build_run_config("toy-digits", overrides=settings, output_dir=str(run_dir)))
    run.start_phase("rl", total=4)
    for step in (1, 2, 3):
        run.log("rl", step, {"loss": 1.0})
    run.close()
    (run_dir / "trajectories.jsonl").write_text("".join(
        json.dumps({"meta": {"phase": "rl", "step": step}}) + "\n" for step in (1, 2, 3)))  # fmt: skip


@pytest.mark.parametrize(("name", "damage", "expected"), [
    ("state.json", lambda text: text[: len(text) // 2], r"state.json is damaged"),
    ("config.yaml", lambda text: text.replace("learner:", "learner: [", 1), r"config.yaml is damaged"),
    ("metrics.jsonl", lambda text: text.replace('"step": 2', '"step": 2,,', 1), r"metrics.jsonl:2 "),
    ("trajectories.jsonl", lambda text: text.replace('"step": 2', '"step": [', 1), r"trajectories.jsonl:2 "),
])  # fmt: skip
def test_resume_of_a_damaged_run_dir_names_the_file_and_line_and_changes_nothing(tmp_path, capsys, name, damage,
                                                                                 expected):  # fmt: skip
    run_dir = tmp_path / "run"
    _stopped_run(run_dir)
    file = run_dir / name
    file.write_text(damage(file.read_text()))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    err = fails(capsys, "train", "--resume", str(run_dir))
    assert re.search(expected, err), err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_config_yaml_that_is_not_utf8_stops_a_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _stopped_run(run_dir)
    (run_dir / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes() + b"# \xe9\n")
    err = fails(capsys, "train", "--resume", str(run_dir))
    assert "config.yaml" in err and "UnicodeDecodeError" in err


def test_a_full_disk_is_one_sentence_and_the_run_resumes_after_space_is_freed(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "size=3m") as disk:
        run_dir = disk / "run"  # room for the logs, not for a checkpoint of the tiny model (about 4 MB)
        err = fails(capsys, "train", "--env", "toy-digits", "--threads", "1", "--output-dir", str(run_dir),
                    "--set", "sft.demos=0", "--set", "eval.tasks=0", "--set", "learner.max_steps=2",
                    "--set", "learner.save_every=1", "--set", "learner.max_new_tokens=4", "--set", "learner.warmup_steps=0",
                    "--no-report")  # fmt: skip
        assert "No space left on device" in err and "nothing already saved was lost" in err
        assert "step-000001" in err and "--resume" in err
        assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(["train", "--resume", str(run_dir), "--no-report"]) == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["phase"] == "rl"] == [1, 2]


@pytest.mark.parametrize("error", [OSError(5, "Input/output error", "x"), OSError(1, "Operation not permitted"),
                                   KeyError("bug")])  # fmt: skip
def test_an_unexpected_error_keeps_its_traceback(monkeypatch, error):
    import agentrl.pipeline.cli_train as cli_train

    def crash(args):
        raise error

    monkeypatch.setattr(cli_train, "main", crash)
    with pytest.raises(type(error)):
        main(["train", "--env", "toy-digits"])
