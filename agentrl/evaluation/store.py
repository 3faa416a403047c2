"""An eval run's output directory: its identity, its episodes (appended one per line as they finish), a lock.

::

    <out>/
      run.json          the settings that decide the episodes (binding once there are episodes), and the
                        latest run's whole config (what ``--report-only`` rescores with)
      episodes.jsonl    one :class:`~agentrl.data.trajectory.Trajectory` per line, ``meta`` naming the task
                        and sample; readable by ``agentrl.data.trajectory.read_jsonl`` and the buffer
      results.json      metrics and config (written by the report)
      report.html       plots/*.png, transcripts/*.html

Durability: each episode's line is flushed when it finishes, so a killed run keeps every finished episode;
a line torn by the kill is dropped (and cut from the file) when the directory is opened again. Two runs
writing one directory at once are refused (an exclusive lock on ``.lock``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError

__all__ = [
    "EPISODES_FILE",
    "RUN_FILE",
    "EpisodeStore",
    "check_identity",
    "episode_key",
    "read_run_file",
    "write_run_file",
]

EPISODES_FILE = "episodes.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"

Key = tuple[int, int]
"""(task index, sample index)."""


def episode_key(trajectory: Trajectory) -> Key:
    """The (task index, sample index) a harness episode records in its ``meta``."""
    return int(trajectory.meta["task_index"]), int(trajectory.meta["sample_index"])


class EpisodeStore:
    """The episodes of one output directory: load what is there, append what finishes.

    Use as a context manager (it holds the directory's lock). A (task, sample) recorded twice (played again
    with ``--retry-errors``) counts once: its latest record.

    Raises:
        ConfigError: another process holds the directory, or ``episodes.jsonl`` has a bad line that is not
            a torn last line.
    """

    def __init__(self, out: Path, echo: Any = print):
        self.out, self.echo = Path(out), echo
        self.path = self.out / EPISODES_FILE
        self.episodes: dict[Key, Trajectory] = {}
        self._lock: IO[str] | None = None
        self._file: IO[str] | None = None

    def __enter__(self) -> EpisodeStore:
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK_FILE, "w")  # held until __exit__
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(
                f"another agentrl eval is writing to {self.out}; wait for it, or pass another --out"
            ) from None
        self.episodes = dict(self._load())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def append(self, trajectory: Trajectory) -> None:
        """Write one finished episode and flush it (a kill after this keeps it)."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # closed in __exit__
        self._file.write(trajectory.to_json() + "\n")
        self._file.flush()
        self.episodes[episode_key(trajectory)] = trajectory

    def _load(self) -> Iterator[tuple[Key, Trajectory]]:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end, lineno = 0, 0
        for lineno, line in enumerate(data.splitlines(keepends=True), 1):
            try:
                trajectory = Trajectory.from_json(line.decode("utf-8"))
                key = episode_key(trajectory)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                if good_end + len(line) == len(data) and not line.endswith(b"\n"):
                    self.echo(f"dropping a torn last line of {self.path} (a run was killed while writing it)")
                    with open(self.path, "r+b") as f:
                        f.truncate(good_end)
                    return
                raise ConfigError(
                    f"{self.path}:{lineno} is not an episode record ({type(exc).__name__}: {exc}); delete "
                    "that line to resume, or pass another --out"
                ) from exc
            good_end += len(line)
            yield key, trajectory
        if data and not data.endswith(b"\n"):  # a whole record without its newline: finish the line
            with open(self.path, "ab") as f:
                f.write(b"\n")


def read_run_file(out: Path) -> dict[str, Any] | None:
    """``run.json`` of an output directory, or None when there is none yet."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}); delete it only if {out} holds no episodes") from exc
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        raise ConfigError(f"{path} has no 'identity'; is {out} the output directory of agentrl eval?")
    return data


def check_identity(out: Path, identity: Mapping[str, Any]) -> None:
    """Refuse to resume a directory whose episodes were sampled with other settings.

    Raises:
        ConfigError: naming each setting that differs, its old and new value, and the two ways out.
    """
    existing = read_run_file(out)
    if existing is None:
        return
    old = existing["identity"]
    new = json.loads(json.dumps(dict(identity)))  # compare as JSON sees them (tuples become lists)
    changed = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    if changed:
        details = "; ".join(f"{name}: {old.get(name)!r} there, {new.get(name)!r} now" for name in changed)
        raise ConfigError(
            f"{out} holds episodes sampled with other settings ({details}). Rerun with the same settings to "
            "resume it, or pass another --out for a new evaluation."
        )


def write_run_file(
    out: Path, identity: Mapping[str, Any], config: Mapping[str, Any], keep_identity: bool
) -> None:
    """Record the identity and the latest run's whole config, atomically.

    Args:
        keep_identity: keep the identity already recorded (the directory holds episodes sampled under it).
    """
    existing = (read_run_file(out) or {}) if keep_identity else {}
    data = {"identity": existing.get("identity", dict(identity)), "config": dict(config)}
    path = Path(out) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
