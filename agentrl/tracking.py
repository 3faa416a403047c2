"""A training run's directory and its metrics log (the progress display is :mod:`agentrl.progress`).

A run directory holds everything one ``agentrl train`` run writes, so ``--resume <run dir>`` can pick it up
and :func:`agentrl.train_report.write_train_report` can draw it::

    <run>/
      config.yaml          the resolved config (written atomically)
      state.json           phases in order: status, last step logged, total, seconds run (atomic)
      metrics.jsonl        one record per line: {"phase", "step", "time", "elapsed", "metrics": {...}}
      trajectories.jsonl   sampled trajectories, ``meta["phase"]`` / ``meta["step"]`` tagged
      tensorboard/<phase>/ TensorBoard event files, tags ``<phase>/<metric>`` (the default tracker)
      trackers.json        W&B / MLflow / trackio run ids, when ``report_to`` names them (see agentrl.trackers)
      checkpoints/<phase>/ the learner's ``output_dir`` (``step-NNNNNN`` checkpoints)

A run is a sequence of *phases* (e.g. ``sft``, ``eval-sft``, ``rl``, ``eval-rl``), each with its own step
count. An evaluation is a phase named ``eval`` or ``eval-<what it evaluates>``; its step is the step of the
policy it evaluated.

Durability: each metrics line is flushed as written; a line torn by a kill is dropped when the directory is
next opened. Non-finite floats are written as ``null``.

Resuming: :meth:`RunDir.start_phase` with ``step=S`` (the step of the checkpoint the learner resumes from)
*truncates*: it removes the phase's records with a step above ``S`` from ``metrics.jsonl`` and
``trajectories.jsonl`` (an atomic rewrite) and tells TensorBoard to hide the phase's events from step
``S + 1`` on, so the resumed run's steps are never logged twice. It reads and checks both files before it
rewrites either; :func:`check_run_dir` checks a whole directory (config, state, both logs) changing nothing,
and :meth:`RunDir.latest_checkpoint` skips a newest checkpoint whose files were cut short.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from agentrl._safe_text import escape_surrogates
from agentrl.errors import ConfigError
from agentrl.trackers import Tracker, TrackerSettings, check_report_to, open_trackers

if TYPE_CHECKING:
    from agentrl.data.trajectory import Trajectory

__all__ = [
    "MetricRecord",
    "PhaseState",
    "RunDir",
    "atomic_write_text",
    "check_output_dir",
    "check_run_dir",
    "flatten_metrics",
    "read_metrics",
]

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
TRAJECTORIES_FILE = "trajectories.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"

Scalar = float | int | str | None
_PHASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ---- records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricRecord:
    """One line of ``metrics.jsonl``.

    Attributes:
        phase: the phase that logged it.
        step: the phase's step (eval phases: the step of the policy evaluated).
        time: Unix time when it was written.
        elapsed: seconds the phase had run by then, summed over the sessions of a resumed run.
        metrics: flat ``{name: value}``; ``None`` where the value was NaN or infinite.
    """

    phase: str
    step: int
    time: float
    elapsed: float
    metrics: Mapping[str, Scalar]


@dataclass(frozen=True)
class PhaseState:
    """A phase's entry in ``state.json``.

    Attributes:
        status: ``"running"`` (started, perhaps killed since) or ``"finished"``.
        step: the last step logged (0 before any).
        total: the steps the phase plans, when known.
        seconds: time the phase ran, summed over sessions (up to its last log or its finish).
    """

    status: Literal["running", "finished"]
    step: int
    total: int | None
    seconds: float


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Flatten nested mappings into ``"outer/inner"`` keys and normalise the values.

    ``RLStepLog.as_dict()`` flattens to ``reward_components/<name>``, ``update/kl``, ``stop_reasons/<why>``...

    Returns:
        ``{name: value}`` with bools and integers as ``int``, other reals (NumPy's too) as ``float``, NaN and
        infinities as ``None``, strings and ``None`` kept.

    Raises:
        TypeError: a value of another type (the message names its key).
    """
    flat: dict[str, Scalar] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif value is None or isinstance(value, str):
            flat[name] = value
        elif isinstance(value, numbers.Integral):
            flat[name] = int(value)
        elif isinstance(value, numbers.Real):
            number = float(value)
            flat[name] = number if math.isfinite(number) else None
        else:
            raise TypeError(f"metric {name!r} is a {type(value).__name__}; log numbers, strings or mappings")
    return flat


def read_metrics(path: str | os.PathLike[str], phase: str | None = None) -> list[MetricRecord]:
    """The records of a run directory's ``metrics.jsonl`` (or of that file itself), in file order.

    Args:
        path: a run directory or a metrics JSONL file; a missing file reads as no records.
        phase: keep only this phase's records.

    Raises:
        ValueError: a line that is not a metrics record (naming the file and line); a last line torn by a
            killed writer is skipped instead.
    """
    file = Path(path)
    file = file / METRICS_FILE if file.is_dir() else file
    if not file.is_file():
        return []
    records = []
    lines = file.read_text(encoding="utf-8").split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            record = MetricRecord(str(raw["phase"]), int(raw["step"]), float(raw["time"]),
                                  float(raw["elapsed"]), dict(raw["metrics"]))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            if lineno == len(lines):  # no newline after it: the writer died mid-line
                break
            raise ValueError(f"{file}:{lineno}: not a metrics record: {exc}") from exc
        if phase is None or record.phase == phase:
            records.append(record)
    return records


# ---- the run directory ------------------------------------------------------------------------------
class RunDir:
    """A training run's directory: config, metrics, trajectories, checkpoints, state, and the records
    copied to the trackers of ``report_to`` (TensorBoard by default; see :mod:`agentrl.trackers`).

    Opening a directory that exists continues it (its state and logs are kept); use
    :meth:`start_phase` with the checkpoint's step to resume a phase. Per phase::

        run.start_phase("rl", total=100, step=resumed_step)   # truncates records past resumed_step
        run.log("rl", step, metrics)                           # each step
        run.finish_phase("rl")

    Attributes:
        path: the directory.
        metrics_path / trajectories_path / config_path / state_path / tensorboard_dir: its files.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, tensorboard: bool = True, tracking: TrackerSettings | None = None
    ):
        """Create ``path`` (and parents) if missing, or open it. ``tracking``: the trackers (None: TensorBoard
        alone; ``tensorboard=False`` drops it), started at the first :meth:`start_phase` with the config of
        :meth:`write_config`.

        Raises:
            ConfigError: an unknown tracker name.
        """
        settings = tracking or TrackerSettings()
        self.tracking = replace(settings, report_to=tuple(
            n for n in check_report_to(settings.report_to) if tensorboard or n != "tensorboard"))  # fmt: skip
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / METRICS_FILE
        self.trajectories_path = self.path / TRAJECTORIES_FILE
        self.config_path = self.path / CONFIG_FILE
        self.state_path = self.path / STATE_FILE
        self.tensorboard_dir = self.path / TENSORBOARD_DIR
        self._trackers: list[Tracker] | None = None
        self._config: dict[str, Any] = {}
        self._metrics_file: IO[str] | None = None
        self._sessions: dict[str, tuple[float, float]] = {}  # phase -> (seconds before, session start)
        self._state: dict[str, Any] = {"phases": {}}
        if self.state_path.is_file():
            self._state = _read_state(self.state_path)
        for file in (self.metrics_path, self.trajectories_path):
            _drop_torn_tail(file)

    # -- config and state --
    def write_config(self, config: Any) -> Path:
        """Write ``config`` (a pydantic model or a mapping) to ``config.yaml`` atomically.

        Paths, tuples and other non-JSON values are written as JSON would see them (``str``, lists).
        """
        import yaml

        data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        data = json.loads(json.dumps(data, default=str))
        self._config = data
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return self.config_path

    def read_config(self) -> dict[str, Any]:
        """The config written by :meth:`write_config`, or ``{}`` when none was.

        Raises:
            ConfigError: ``config.yaml`` is not UTF-8, not YAML or not a mapping (naming the file and the fix).
        """
        return _read_config(self.config_path)

    @property
    def phases(self) -> dict[str, PhaseState]:
        """Every phase started so far, in the order they first started."""
        return {name: PhaseState(**entry) for name, entry in self._state["phases"].items()}

    def is_finished(self, phase: str) -> bool:
        """Whether ``phase`` ran to :meth:`finish_phase` (a resumed run skips it)."""
        return self._state["phases"].get(phase, {}).get("status") == "finished"

    def checkpoint_dir(self, phase: str) -> Path:
        """``checkpoints/<phase>/`` (created): pass it as the phase's learner ``output_dir``."""
        path = self.path / CHECKPOINTS_DIR / _check_phase(phase)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def latest_checkpoint(self, phase: str, echo: Callable[[str], None] | None = None) -> tuple[Path, int] | None:
        """The phase's newest whole learner checkpoint and its step, or None (imports torch).

        A newer one whose files are cut short or unreadable (a killed write, a full disk) is skipped, and
        ``echo`` (default: a line on stderr) says which and why.
        """
        from agentrl.learners import checkpoints

        say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        found = checkpoints.checkpoint_dirs(self.path / CHECKPOINTS_DIR / _check_phase(phase))
        skipped: list[str] = []
        for path in reversed(found):
            problem = checkpoints.checkpoint_problem(path)
            if problem is not None:
                skipped.append(f"{path} ({problem})")
                continue
            if skipped:
                say(f"agentrl: skipped the damaged checkpoint {'; '.join(skipped)}: resuming from {path}")
            summary = json.loads((path / checkpoints.STATE_JSON).read_text(encoding="utf-8"))
            return path, int(summary["step"])
        if skipped:
            say(f"agentrl: no checkpoint of {phase} can be resumed from: {'; '.join(skipped)}; the phase starts "
                "again from step 0")  # fmt: skip
        return None

    # -- phases --
    def start_phase(self, phase: str, *, total: int | None = None, step: int = 0) -> None:
        """Begin ``phase``, or resume it from ``step``.

        Records of the phase with a step above ``step`` are removed from ``metrics.jsonl`` and
        ``trajectories.jsonl``, and TensorBoard hides its events from ``step + 1`` on; its run time continues
        from its last kept record. ``step=0`` starts the phase afresh: all its earlier records go (an eval
        phase logged at step 0 included).

        Args:
            phase: letters, digits, ``_ . -`` (it names directories).
            total: the steps it plans (for progress and the report).
            step: the step it resumes from (the learner checkpoint's step), or 0.

        Raises:
            ConfigError: a bad phase name or a negative step.
        """
        _check_phase(phase)
        if step < 0:
            raise ConfigError(
                f"start_phase({phase!r}): step must be >= 0 (the resumed checkpoint's), got {step}"
            )
        had_records = self._truncate(phase, step if step > 0 else -1)
        kept = read_metrics(self.metrics_path, phase)
        seconds = kept[-1].elapsed if kept else 0.0
        self._sessions[phase] = (seconds, time.monotonic())
        entry = self._state["phases"].setdefault(phase, {})
        entry.update(status="running", step=step, total=total if total is not None else entry.get("total"),
                     seconds=seconds)  # fmt: skip
        self._save_state()
        for tracker in self._open_trackers():
            tracker.start_phase(phase, step, had_records)

    def finish_phase(self, phase: str) -> None:
        """Mark ``phase`` finished in ``state.json`` with its run time.

        Raises:
            ConfigError: the phase was not started in this process.
        """
        seconds = self._elapsed(phase)
        self._state["phases"][phase].update(status="finished", seconds=seconds)
        self._save_state()
        for tracker in self._trackers or ():
            tracker.finish_phase(phase)

    # -- logging --
    def log(self, phase: str, step: int, metrics: Mapping[str, Any]) -> MetricRecord:
        """Append one record to ``metrics.jsonl`` (flushed) and its numbers to the trackers.

        Args:
            phase: a phase started with :meth:`start_phase`.
            step: the phase's step.
            metrics: numbers, strings or nested mappings (see :func:`flatten_metrics`); a ``step`` entry is
                dropped (the record's step is the step).

        Returns:
            The record as written.

        Raises:
            ConfigError: the phase was not started.
            TypeError: a value that is no number, string or mapping.
        """
        flat = flatten_metrics(metrics)
        flat.pop("step", None)
        record = MetricRecord(phase, int(step), time.time(), self._elapsed(phase), flat)
        line = escape_surrogates(json.dumps(  # a string metric with a lone surrogate still writes as UTF-8
            {"phase": record.phase, "step": record.step, "time": round(record.time, 3),
             "elapsed": round(record.elapsed, 3), "metrics": flat},
            allow_nan=False, ensure_ascii=False,
        ))  # fmt: skip
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # kept open: a line per step
        self._metrics_file.write(line + "\n")
        self._metrics_file.flush()
        numbers = {name: value for name, value in flat.items() if isinstance(value, int | float)}
        for tracker in self._open_trackers():
            tracker.log(phase, record.step, numbers, record.time)
        self._state["phases"][phase].update(step=record.step, seconds=record.elapsed)
        self._save_state(durable=False)
        return record

    def add_trajectories(self, phase: str, step: int, trajectories: Iterable[Trajectory]) -> int:
        """Append ``trajectories`` to ``trajectories.jsonl`` with ``meta["phase"]`` and ``meta["step"]`` set.

        Returns:
            How many were written.
        """
        from agentrl.data.trajectory import write_jsonl

        tags = {"phase": _check_phase(phase), "step": int(step)}
        return write_jsonl(self.trajectories_path, (replace(t, meta={**t.meta, **tags}) for t in trajectories),
                           append=True)  # fmt: skip

    def close(self) -> None:
        """Flush and close the files and end the trackers' runs (idempotent); the state stays as last written."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        for tracker in self._trackers or ():
            tracker.close()
        self._trackers = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --
    def _elapsed(self, phase: str) -> float:
        if phase not in self._sessions:
            raise ConfigError(f"phase {phase!r} was not started: call run.start_phase({phase!r}) first")
        before, started = self._sessions[phase]
        return before + time.monotonic() - started

    def _open_trackers(self) -> list[Tracker]:
        if self._trackers is None:
            self._trackers = open_trackers(self.tracking, self.path, self._config or self.read_config())
        return self._trackers

    def _save_state(self, durable: bool = True) -> None:
        atomic_write_text(self.state_path, json.dumps(self._state, indent=2) + "\n", durable=durable)

    def _truncate(self, phase: str, step: int) -> bool:
        """Drop the phase's lines with a step above ``step`` from both logs; whether it had any records."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

        # Both files are read and checked before either is rewritten: a bad line in the second must not
        # leave the first already cut.
        metrics = _kept_lines(self.metrics_path, _metrics_key, phase, step)
        trajectories = _kept_lines(self.trajectories_path, _trajectory_key, phase, step)
        for path, (kept, _, dropped) in ((self.metrics_path, metrics), (self.trajectories_path, trajectories)):
            if dropped:
                atomic_write_text(path, "".join(kept))
        return metrics[1]


# ---- files ------------------------------------------------------------------------------------------
def _check_phase(phase: str) -> str:
    if not _PHASE_RE.match(phase):
        raise ConfigError(
            f"phase name {phase!r} must be letters, digits, '_', '.' or '-' (it names directories), e.g. 'rl'"
        )
    return phase


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Replace ``path`` by a file holding ``text``: readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the run's files from the other users of a machine
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left without its newline by a killed writer, so appending starts a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        position = end
        while position > 0:  # back to the last newline, a block at a time (trajectory files are large)
            start = max(0, position - 65536)
            f.seek(start)
            block = f.read(position - start)
            if (at := block.rfind(b"\n")) >= 0:
                f.truncate(start + at + 1)
                return
            position = start
        f.truncate(0)


def _kept_lines(
    path: Path, key: Callable[[dict[str, Any]], tuple[str, int]], phase: str, step: int
) -> tuple[list[str], bool, bool]:
    """The lines of a JSONL file without the records of ``phase`` past ``step``.

    Returns:
        The lines kept, whether it held any record of ``phase``, whether any was dropped.

    Raises:
        ConfigError: a line that is not a record of the run (naming the file, the line and the fix).
    """
    if not path.is_file():
        return [], False, False
    kept, had, dropped = [], False, False
    for lineno, line in _lines(path):
        if not line.endswith("\n"):
            continue  # torn by a kill
        try:
            of_phase, at = key(json.loads(line))
            at = int(at)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _bad_line(path, lineno, exc) from None
        if of_phase == phase:
            had = True
            if at > step:
                dropped = True
                continue
        kept.append(line)
    return kept, had, dropped


def _metrics_key(raw: dict[str, Any]) -> tuple[str, int]:
    """A metrics line's phase and step, checked as :func:`read_metrics` reads it."""
    float(raw["time"]), float(raw["elapsed"]), dict(raw["metrics"])
    return str(raw["phase"]), int(raw["step"])


def _trajectory_key(raw: dict[str, Any]) -> tuple[str, int]:
    meta = raw.get("meta") or {}
    return meta.get("phase", ""), meta.get("step", 0)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): {_RESTORE}") from None


_RESTORE = "restore it from a copy, or delete or fix the damaged part, then rerun --resume"


def _bad_line(path: Path, lineno: int, exc: Exception) -> ConfigError:
    return ConfigError(f"{path}:{lineno} is not a record of this run ({type(exc).__name__}: {exc}); delete or fix "
                       "that line (or restore the file from a copy), then rerun --resume")  # fmt: skip


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("phases"), dict):
            raise ValueError("no 'phases' mapping")
        for name, entry in state["phases"].items():
            PhaseState(**entry)  # a TypeError names a missing or unknown field
            _check_phase(name)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: {exc}); {_RESTORE}, or start the run "
                          "again in a new --output-dir") from None  # fmt: skip
    return state


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    from agentrl import _yaml

    if not path.is_file():
        return {}
    try:
        data = _yaml.load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"the top level is a {type(data).__name__}, not a mapping")
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        what = _yaml.describe(exc) if isinstance(exc, yaml.YAMLError) else str(exc)
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: {what}); {_RESTORE}") from None
    return data


def check_run_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a run directory for ``--resume`` without changing anything in it: it is a directory whose
    ``config.yaml`` and ``state.json`` parse and whose ``metrics.jsonl`` and ``trajectories.jsonl`` lines
    are records (a last line torn by a kill is allowed).

    Returns:
        Its config (``config.yaml`` as a mapping).

    Raises:
        ConfigError: naming the path, the damage and the fix.
    """
    run = Path(path)
    if not run.is_dir():
        what = "is a file" if run.exists() else "does not exist"
        raise ConfigError(f"--resume {run} {what}: pass the run directory of an earlier `agentrl train` (its "
                          "--output-dir)")  # fmt: skip
    config = _read_config(run / CONFIG_FILE)
    if not config:
        raise ConfigError(f"{run} has no config.yaml: is it a run directory written by agentrl train?")
    if (run / STATE_FILE).is_file():
        _read_state(run / STATE_FILE)
    _kept_lines(run / METRICS_FILE, _metrics_key, "", 0)
    _kept_lines(run / TRAJECTORIES_FILE, _trajectory_key, "", 0)
    return config


def check_output_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Check that ``path`` is, or can be made, a directory this process can write, creating nothing.

    Raises:
        ConfigError: ``path`` (or a parent) is a file, or nothing can be created there (read-only,
            permissions), naming ``flag`` and the fix.
    """
    target = Path(path)
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == target else f"is inside {probe}, which is a file"
        raise ConfigError(f"{flag} {target} {where}, not a directory: pass a directory path (one that does not "
                          "exist yet is created)")  # fmt: skip
    try:  # os.access says yes to root on a directory that still refuses (sysfs); trying is the real test
        os.rmdir(tempfile.mkdtemp(prefix=".agentrl-write-check-", dir=probe))
    except OSError as exc:
        raise ConfigError(f"{flag} {target}: cannot write in {probe} ({exc.strerror}); pass a directory you can "
                          "write to") from None  # fmt: skip
