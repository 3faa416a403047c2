"""Per-sandbox cgroups, where the machine offers them: a total memory cap (no swap), a process cap, a CPU quota.

Nothing is assumed: the controllers are read from ``/proc/self/mountinfo`` and ``/proc/self/cgroup``, and the
sandbox's group is created *below the cgroup this process is in* (so a container's own limits still apply).
cgroup v1 (one hierarchy per controller) and v2 (one unified hierarchy, used only where ``memory`` and
``pids`` are delegated to our group's children) are both handled; any failure (not root, read-only, no
controllers) simply means no cgroup, and the sandbox relies on its rlimits and pid namespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path

__all__ = ["Cgroup", "cgroup_of", "create_cgroup", "reap_stale_cgroups", "reap_stale_cgroups_everywhere"]

log = logging.getLogger(__name__)
_CONTROLLERS = ("memory", "pids", "cpu")
_NAME = re.compile(r"^agentrl-(\d+)-\d+$")  # agentrl-<owner pid>-<counter>
REAP_INTERVAL = 30.0
"""Seconds between two reaps of stale groups by :func:`create_cgroup`."""
_last_reap = float("-inf")


def _mounts() -> dict[str, Path]:
    """Mount point by controller name (``"unified"`` for the v2 hierarchy)."""
    found: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, extra = left.split(), right.split()
            if len(fields) < 5 or len(extra) < 3 or fields[3] != "/":
                continue  # only whole hierarchies: a bind of a sub-tree would put our path elsewhere
            if extra[0] == "cgroup2":
                found.setdefault("unified", Path(fields[4]))
            elif extra[0] == "cgroup":
                for option in extra[2].split(","):
                    if option in _CONTROLLERS:
                        found.setdefault(option, Path(fields[4]))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path by controller (``"unified"`` for v2)."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else ["unified"]:
                paths[name] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    """The sandbox's cgroup: one directory per v1 controller, or a single v2 directory.

    Attributes:
        version: 1 or 2.
        dirs: the directory of each controller (all the same directory under v2).
    """

    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version, self.dirs = version, dirs

    def add(self, pid: int, *, memory: bool = True) -> None:
        """Move a process (before it forks anything) into every controller's group (but ``memory``'s, when
        False and the memory controller has a group of its own: cgroup v1)."""
        skip = self.dirs.get("memory") if not memory and self.version == 1 else None
        for directory in set(self.dirs.values()) - {skip}:
            _write(directory / "cgroup.procs", str(pid))

    def open_memory_events(self) -> int | None:
        """A read-only descriptor of the file with the group's ``oom_kill`` count, for the fork-server's watch."""
        directory = self.dirs.get("memory")
        if directory is None:
            return None
        try:
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            return os.open(directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def open_memory_join(self) -> int | None:
        """A write-only descriptor of the memory group's ``cgroup.procs`` (cgroup v1 only, where memory has a
        hierarchy of its own), through which each program moves itself in; None elsewhere."""
        directory = self.dirs.get("memory")
        if directory is None or self.version != 1:
            return None
        try:
            return os.open(directory / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer has ended in this group so far, where the kernel counts them."""
        directory = self.dirs.get("memory")
        if directory is None:
            return None
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (directory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            return None
        return None

    def open_memory_limit(self) -> int | None:
        """A write-only descriptor of the group's memory limit file, for the fork-server to move it, or None.

        Opened here (as root, or a user the group is delegated to): the kernel checks permission when a
        cgroup file is opened, so the fork-server, unprivileged in its namespaces, can write through it and
        nothing else. It closes it in every program before the program runs.
        """
        directory = self.dirs.get("memory")
        if directory is None:
            return None
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        try:
            return os.open(directory / name, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in set(self.dirs.values()):
            with contextlib.suppress(OSError, ValueError):
                found |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
        return found

    def kill(self) -> None:
        """SIGKILL every process in the group (``cgroup.kill`` under v2, a scan-and-kill loop under v1)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs["memory"] / "cgroup.kill", "1")
                return
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def remove(self, timeout: float = 2.0) -> bool:
        """Delete the group's directories once empty; False (and a log line) when one stays busy."""
        deadline = time.monotonic() + timeout
        pending = set(self.dirs.values())
        while pending:
            for directory in list(pending):
                try:
                    directory.rmdir()
                    pending.discard(directory)
                except FileNotFoundError:
                    pending.discard(directory)
                except OSError:
                    pass
            if pending:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s is still busy; it will be left behind", sorted(map(str, pending)))
                    return False
                time.sleep(0.01)
        return True


def _configure(control: str, directory: Path, version: int, memory: int, processes: int, cpus: float) -> None:
    quota, period = int(cpus * 100_000), 100_000
    if version == 1:
        if control == "memory":
            _write(directory / "memory.limit_in_bytes", str(memory))
            with contextlib.suppress(OSError):  # present only where swap accounting is on
                _write(directory / "memory.memsw.limit_in_bytes", str(memory))
        elif control == "pids":
            _write(directory / "pids.max", str(processes))
        elif control == "cpu":
            _write(directory / "cpu.cfs_period_us", str(period))
            _write(directory / "cpu.cfs_quota_us", str(quota))
    elif control == "memory":
        _write(directory / "memory.max", str(memory))
        with contextlib.suppress(OSError):
            _write(directory / "memory.swap.max", "0")
    elif control == "pids":
        _write(directory / "pids.max", str(processes))
    elif control == "cpu":
        _write(directory / "cpu.max", f"{quota} {period}")


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_cgroups(parents: list[Path]) -> list[str]:
    """Kill what is left in, and remove, groups whose owner process is gone (a crash or SIGKILL of the owner).

    Returns:
        The directories removed.
    """
    removed = []
    for parent in parents:
        with contextlib.suppress(OSError):
            for entry in parent.iterdir():
                match = _NAME.match(entry.name)
                if match and entry.is_dir() and not _owner_alive(int(match.group(1))):
                    group = Cgroup(1, {"any": entry})  # v1-style kill: scan cgroup.procs (also in v2)
                    group.kill()
                    if group.remove(timeout=0.5):
                        removed.append(str(entry))
    return removed


def _parents() -> list[Path]:
    """The directories our groups are created in: under this process's own group, per controller."""
    mounts, own = _mounts(), _own_paths()
    return [mounts[c] / own[c].lstrip("/") for c in (*_CONTROLLERS, "unified") if c in mounts and c in own]


def reap_stale_cgroups_everywhere() -> list[str]:
    """:func:`reap_stale_cgroups` over every controller this process can use; [] where none is readable."""
    try:
        return reap_stale_cgroups(_parents())
    except OSError:
        return []


def cgroup_of(pid: int) -> Cgroup | None:
    """The cgroup a running process is in (e.g. a container's), for reading its counters; None if unknown."""
    try:
        mounts = _mounts()
        entries = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1: dict[str, Path] = {}
    unified = None
    for line in entries:
        _, controllers, path = line.split(":", 2)
        if not controllers:
            unified = mounts["unified"] / path.lstrip("/") if "unified" in mounts else None
        for control in controllers.split(",") if controllers else ():
            if control in _CONTROLLERS and control in mounts:
                v1[control] = mounts[control] / path.lstrip("/")
    if "memory" in v1:
        return Cgroup(1, v1)
    return Cgroup(2, {"memory": unified, "pids": unified}) if unified is not None else None


def create_cgroup(name: str, *, memory: int, processes: int, cpus: float) -> Cgroup | None:
    """Create and configure the group ``name`` (``agentrl-<pid>-<n>``); None where no controller is usable.

    Groups left behind by owners that died are reaped first, at most once per :data:`REAP_INTERVAL` seconds
    (a reap lists every group, ours included: per sandbox it would cost what a whole run's crashes leave).
    """
    global _last_reap
    try:
        mounts, own = _mounts(), _own_paths()
        if time.monotonic() - _last_reap >= REAP_INTERVAL:
            reap_stale_cgroups(_parents())
            _last_reap = time.monotonic()
    except OSError:
        return None
    v1 = [c for c in _CONTROLLERS if c in mounts and c in own]
    if v1:
        dirs: dict[str, Path] = {}
        for control in v1:
            directory = mounts[control] / own[control].lstrip("/") / name
            try:
                directory.mkdir()
                dirs[control] = directory
                _configure(control, directory, 1, memory, processes, cpus)
            except OSError as exc:
                log.debug("cgroup v1 %s unavailable: %s", control, exc)
                dirs.pop(control, None)
                with contextlib.suppress(OSError):
                    directory.rmdir()
        return Cgroup(1, dirs) if "memory" in dirs or "pids" in dirs else None
    if "unified" in mounts and "unified" in own:
        parent = mounts["unified"] / own["unified"].lstrip("/")
        try:
            delegated = (parent / "cgroup.subtree_control").read_text().split()
            if not {"memory", "pids"} <= set(delegated):
                return None
            directory = parent / name
            directory.mkdir()
        except OSError:
            return None
        try:
            for control in ("memory", "pids", "cpu"):
                if control in delegated:
                    _configure(control, directory, 2, memory, processes, cpus)
        except OSError as exc:
            log.debug("cgroup v2 unavailable: %s", exc)
            with contextlib.suppress(OSError):
                directory.rmdir()
            return None
        return Cgroup(2, {c: directory for c in ("memory", "pids", "cpu") if c in delegated})
    return None
