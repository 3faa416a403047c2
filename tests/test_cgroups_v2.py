"""The cgroup v2 branch of :mod:`agentrl_sandboxes._cgroups`, on a directory laid out like a delegated v2 tree.

Why not the kernel's: this machine class binds the memory controller to a v1 hierarchy (its process manager
makes a v1 memory group per command, so the controller cannot move to the unified tree), and a user-mode
kernel cannot run on its CPUs (AMX state breaks UML's ptrace register transfer). ``test_sandbox_memory.py``
runs the real thing on whatever the machine offers, v2 included where a machine delegates ``memory`` and
``pids`` to our group. What this file checks is the part that differs between versions: which files are
written, with what, and when the v2 tree is declined.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentrl_sandboxes import _cgroups

MiB = 1 << 20


@pytest.fixture
def unified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A v2-only machine: one unified hierarchy, this process in ``/job``, nothing mounted for v1."""
    parent = tmp_path / "job"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")
    monkeypatch.setattr(_cgroups, "_mounts", lambda: {"unified": tmp_path})
    monkeypatch.setattr(_cgroups, "_own_paths", lambda: {"unified": "/job"})
    return parent


def test_a_delegated_tree_gets_memory_pids_and_cpu_limits_and_no_swap(unified: Path):
    group = _cgroups.create_cgroup("agentrl-1-1", memory=512 * MiB, processes=64, cpus=1.5)
    assert group is not None and group.version == 2
    directory = unified / "agentrl-1-1"
    assert set(group.dirs.values()) == {directory}  # one directory for every controller
    assert (directory / "memory.max").read_text() == str(512 * MiB)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "64"
    assert (directory / "cpu.max").read_text() == "150000 100000"


def test_without_memory_and_pids_delegated_the_tree_is_declined(unified: Path):
    (unified / "cgroup.subtree_control").write_text("cpu memory\n")  # pids not delegated to our children
    assert _cgroups.create_cgroup("agentrl-1-2", memory=512 * MiB, processes=64, cpus=1) is None
    assert not (unified / "agentrl-1-2").exists()


def test_the_v2_files_the_fork_server_reads_and_writes(unified: Path):
    group = _cgroups.create_cgroup("agentrl-1-3", memory=256 * MiB, processes=64, cpus=1)
    assert group is not None
    directory = unified / "agentrl-1-3"
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert group.oom_kills() == 2  # from memory.events, not v1's memory.oom_control
    assert group.open_memory_join() is None  # one hierarchy: a program joins memory with every controller
    limit = group.open_memory_limit()
    assert limit is not None
    try:
        os.write(limit, str(300 * MiB).encode())
    finally:
        os.close(limit)
    assert (directory / "memory.max").read_text() == str(300 * MiB)  # the fork-server's moving cap
    (directory / "cgroup.procs").write_text("")
    group.kill()
    assert (directory / "cgroup.kill").read_text() == "1"  # v2 kills the whole group in one write
