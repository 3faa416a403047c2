"""Experiment trackers a run directory reports to, chosen by name: ``tensorboard``, ``wandb``, ``mlflow``,
``trackio`` (or one a user registers with :func:`register_tracker`).

``metrics.jsonl`` is always written (it is what ``--resume`` and the HTML report read); the trackers are
extra copies of the same records. Every command that logs (``agentrl train``, ``sft``, ``dpo``, ``eval``
``--out``) takes the one setting ``tracking.report_to`` (``--report-to`` on the command line). A tracker's
package is imported only when a run names it, so ``import agentrl`` never pays for it.

Names and steps: a record of phase ``rl`` at step 7 with ``{"loss": 0.3}`` becomes the metric ``rl/loss``
at step 7 everywhere. W&B needs one increasing step per run, so there each phase gets its own step metric
(``rl/step``, set with ``define_metric``) and phases that restart their count do not collide. MLflow
forbids some characters in metric names (``pass@1``): they become ``_``.

Offline use, all tested in CI:

- ``wandb``: ``tracking.options.wandb.mode: offline`` (or ``WANDB_MODE=offline``) writes the run under
  ``<run dir>/wandb/``; ``wandb sync`` uploads it later.
- ``mlflow``: without ``tracking_uri`` (option or ``MLFLOW_TRACKING_URI``) a file store in
  ``<run dir>/mlruns`` (``mlflow ui --backend-store-uri <run dir>/mlruns`` shows it; MLflow 3 wants
  ``MLFLOW_ALLOW_FILE_STORE=true`` for it, which is then set unless already set).
- ``trackio``: local by default (its SQLite database under ``TRACKIO_DIR``); ``space_id`` publishes it.

A resumed run continues the same W&B / MLflow / trackio run: their run ids are kept in
``<run dir>/trackers.json``. Records a resume truncates (steps past the checkpoint) are hidden by
TensorBoard; the other trackers cannot delete points, so they show the re-logged steps as well.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError

__all__ = [
    "TRACKERS",
    "Tracker",
    "TrackerRun",
    "TrackerSettings",
    "check_report_to",
    "open_trackers",
    "register_tracker",
]

IDS_FILE = "trackers.json"
INSTALL_HINT = "pip install 'agentrl[trackers]'"


@dataclass(frozen=True)
class TrackerSettings:
    """Where a run reports besides ``metrics.jsonl``.

    Attributes:
        report_to: tracker names, e.g. ``("tensorboard", "wandb")``; empty: ``metrics.jsonl`` only.
        project: the W&B / trackio project and the MLflow experiment; None: ``"agentrl"``.
        name: the run's name in the trackers; None: the run directory's name.
        options: per tracker, keyword arguments of its own start call, e.g.
            ``{"wandb": {"mode": "offline", "entity": "me"}, "mlflow": {"tracking_uri": "http://..."}}``.
    """

    report_to: tuple[str, ...] = ("tensorboard",)
    project: str | None = None
    name: str | None = None
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is opened with: the run directory, names, the run's config and its own options."""

    path: Path
    project: str
    name: str
    config: Mapping[str, Any]
    options: Mapping[str, Any]

    def stored_id(self, tracker: str) -> str | None:
        """The id this tracker's run had in an earlier session of the run directory (for resuming)."""
        return _read_ids(self.path).get(tracker)

    def store_id(self, tracker: str, run_id: str) -> None:
        from agentrl.tracking import atomic_write_text

        ids = {**_read_ids(self.path), tracker: run_id}
        atomic_write_text(self.path / IDS_FILE, json.dumps(ids, indent=2) + "\n")


class Tracker:
    """One tracker's side of a run directory; :class:`~agentrl.tracking.RunDir` calls these in order.

    ``metrics`` hold numbers only (ints and finite floats; NaN, strings and None are left out upstream).
    """

    def start_phase(self, phase: str, step: int, truncated: bool) -> None:
        """A phase starts, or resumes from ``step`` (``truncated``: records past it were removed)."""

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        raise NotImplementedError

    def finish_phase(self, phase: str) -> None:
        """The phase finished."""

    def close(self) -> None:
        """Flush and end the tracker's run (called once)."""


TRACKERS: dict[str, Callable[[TrackerRun], Tracker]] = {}
"""Tracker name -> factory ``(TrackerRun) -> Tracker``; :func:`register_tracker` adds one."""


def register_tracker(name: str, factory: Callable[[TrackerRun], Tracker]) -> None:
    """Make ``name`` usable in ``tracking.report_to`` (replacing a tracker of that name)."""
    TRACKERS[name] = factory


def check_report_to(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked against the registry, duplicates dropped; imports no tracker.

    Raises:
        ConfigError: an unknown name, with the closest known one and the list.
    """
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"tracking.report_to: unknown tracker {name!r}{hint}; choose from {sorted(TRACKERS)}, "
                              "or register one with agentrl.trackers.register_tracker")  # fmt: skip
        if name not in out:
            out.append(name)
    return tuple(out)


def open_trackers(settings: TrackerSettings, path: Path, config: Mapping[str, Any]) -> list[Tracker]:
    """Start each tracker of ``settings.report_to`` for the run directory ``path``.

    Raises:
        ConfigError: an unknown tracker, or one whose package is not installed (naming the install).
    """
    names = check_report_to(settings.report_to)
    unknown = sorted(set(settings.options) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"tracking.options: {unknown} name no tracker; use tracker names ({sorted(TRACKERS)})")
    opened: list[Tracker] = []
    try:
        for name in names:
            run = TrackerRun(path, settings.project or "agentrl", settings.name or path.resolve().name,
                             config, dict(settings.options.get(name, {})))  # fmt: skip
            opened.append(TRACKERS[name](run))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


def _read_ids(path: Path) -> dict[str, str]:
    try:
        ids = json.loads((path / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def _require(module: str, tracker: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"tracking.report_to names {tracker!r}, but {module} cannot be imported ({exc}); "
                          f"install it with {INSTALL_HINT} or drop {tracker!r}") from None  # fmt: skip


# ---- TensorBoard ------------------------------------------------------------------------------------
class TensorBoardTracker(Tracker):
    """Event files in ``<run dir>/tensorboard/<phase>/``, tags ``<phase>/<metric>``; a resumed phase hides
    its events past the checkpoint's step (``purge_step``)."""

    def __init__(self, run: TrackerRun):
        self.root = run.path / "tensorboard"
        self._writers: dict[str, Any] = {}

    def start_phase(self, phase: str, step: int, truncated: bool) -> None:
        self._close(phase)
        if truncated:
            _wait_past_event_files(self.root / phase)
        self._writer(phase, purge_step=(step + 1 if step > 0 else 0) if truncated else None)

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        writer = self._writer(phase)
        for name, value in metrics.items():
            writer.add_scalar(f"{phase}/{name}", value, step, walltime=walltime)
        writer.flush()

    def finish_phase(self, phase: str) -> None:
        self._close(phase)

    def close(self) -> None:
        for phase in list(self._writers):
            self._close(phase)

    def _writer(self, phase: str, purge_step: int | None = None) -> Any:
        if phase not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[phase] = SummaryWriter(str(self.root / phase), purge_step=purge_step)
        return self._writers[phase]

    def _close(self, phase: str) -> None:
        writer = self._writers.pop(phase, None)
        if writer is not None:
            writer.close()


def _wait_past_event_files(directory: Path) -> None:
    """Wait, if need be, until the clock's second is past every event file's in ``directory``.

    TensorBoard reads a directory's event files in name order, and a name is ``<second>.<host>.<pid>.<n>``
    with ``n`` a counter that goes 9, 10: a file written in the same second could sort before the older
    one, and its purge (hiding the truncated steps) would come first and hide nothing.
    """
    import time

    seconds = [int(part) for f in directory.glob("events.out.tfevents.*")
               if (part := f.name.split(".")[3]).isdigit()]  # fmt: skip
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


# ---- Weights & Biases -------------------------------------------------------------------------------
class WandbTracker(Tracker):
    """A W&B run (``wandb.init`` with ``dir=<run dir>``, the run's config, ``resume="allow"`` on its id)."""

    def __init__(self, run: TrackerRun):
        wandb = _require("wandb", "wandb")
        run_id = run.stored_id("wandb") or run.options.get("id") or secrets.token_hex(4)
        kwargs = {"project": run.project, "name": run.name, "dir": str(run.path), "config": dict(run.config),
                  "resume": "allow", "reinit": "create_new", **run.options, "id": run_id}  # fmt: skip
        self.run = wandb.init(**kwargs)
        run.store_id("wandb", run_id)
        self._phases: set[str] = set()

    def start_phase(self, phase: str, step: int, truncated: bool) -> None:
        if phase not in self._phases:
            self.run.define_metric(f"{phase}/step", hidden=True)
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._phases.add(phase)

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        self.start_phase(phase, step, False)
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def close(self) -> None:
        self.run.finish()


# ---- MLflow -------------------------------------------------------------------------------------------
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``project`` through ``MlflowClient`` (no global active run): the config
    as params, metrics with their step; a file store in ``<run dir>/mlruns`` unless a tracking URI is set."""

    def __init__(self, run: TrackerRun):
        mlflow = _require("mlflow", "mlflow")
        from mlflow.entities import Param

        options = dict(run.options)
        unknown = sorted(set(options) - {"tracking_uri", "tags"})
        if unknown:
            raise ConfigError(f"tracking.options.mlflow: unknown {unknown}; it takes tracking_uri and tags")
        uri = options.pop("tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # MLflow 3 keeps its file store but asks for an opt-in; a run directory holds its run
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run.path / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run.stored_id("mlflow")
        if self.run_id is None:
            found = self.client.get_experiment_by_name(run.project)
            experiment = found.experiment_id if found else self.client.create_experiment(run.project)
            self.run_id = self.client.create_run(experiment, run_name=run.name, tags=options.get("tags")).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flat_params(run.config).items()]
            for at in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[at : at + 100])
            run.store_id("mlflow", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        from mlflow.entities import Metric

        stamp = int(walltime * 1000)
        batch = [Metric(_MLFLOW_BAD.sub("_", f"{phase}/{k}"), float(v), stamp, step) for k, v in metrics.items()]
        for at in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[at : at + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[_MLFLOW_BAD.sub("_", f"{prefix}{key}")] = value
    return out


# ---- trackio ------------------------------------------------------------------------------------------
class TrackioTracker(Tracker):
    """A trackio run (local SQLite by default; ``space_id`` in its options publishes it to a Space)."""

    def __init__(self, run: TrackerRun):
        self.trackio = _require("trackio", "trackio")
        name = run.stored_id("trackio") or run.name
        kwargs = {"project": run.project, "name": name, "config": dict(run.config), "resume": "allow",
                  **run.options}  # fmt: skip
        self.run = self.trackio.init(**kwargs)
        run.store_id("trackio", name)

    def log(self, phase: str, step: int, metrics: Mapping[str, float | int], walltime: float) -> None:
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def close(self) -> None:
        self.run.finish()


register_tracker("tensorboard", TensorBoardTracker)
register_tracker("wandb", WandbTracker)
register_tracker("mlflow", MLflowTracker)
register_tracker("trackio", TrackioTracker)
