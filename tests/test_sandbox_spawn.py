"""What starting a sandbox costs the host: one fork-server per sandbox, and an env opens one or two per episode.

A training process holds gigabytes; starting a child that changes its ids makes Python ``fork`` (copying the
page tables of all of it) where it could ``vfork``. These tests check the cheaper paths keep what the old ones
guaranteed: the sandbox's host processes still run unprivileged, the process tree is the same, backends are
still found, and stale cgroups are still reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from agentrl_sandboxes import _cgroups, _process
from agentrl_sandboxes.local import LocalSandbox

import agentrl.sandbox as sandbox_api
from agentrl.sandbox import SandboxLimits, has_sandbox, list_sandboxes, open_sandbox

BWRAP = LocalSandbox().bwrap


def _ids(pid: int) -> tuple[list[int], list[int], str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in status}
    return [int(x) for x in field["Uid"]], [int(x) for x in field["Gid"]], " ".join(field["Groups"])


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is missing: apt-get install bubblewrap")
@pytest.mark.skipif(os.geteuid() != 0, reason="only a root host drops to uid 65534 before starting bubblewrap")
def test_a_root_host_still_starts_the_sandbox_as_65534_with_no_groups():
    async def main():
        async with open_sandbox("local", SandboxLimits(wall_time=5)) as sb:
            result = await sb.exec("print('ok')")
            assert result.stdout == "ok\n"
            server = sb._server
            for pid in (server.proc.pid, *server.supervisors):  # bubblewrap, and the fork-server it started
                uids, gids, groups = _ids(pid)
                assert uids == [65534] * 4 and gids == [65534] * 4 and groups == "", (pid, uids, gids, groups)

    asyncio.run(main())


def test_ids_are_dropped_by_setpriv_so_the_child_can_be_vforked(monkeypatch):
    monkeypatch.setattr(_process, "_setpriv", lambda: "/usr/bin/setpriv")
    argv_of, ids = _process._privileges_dropped_by_exec(lambda fd: ["bwrap", f"--seccomp={fd}"],
                                                        {"user": 65534, "group": 65533, "extra_groups": []})
    assert ids == {}  # nothing left for the fork: Python may vfork
    assert argv_of(7) == ["/usr/bin/setpriv", "--reuid=65534", "--regid=65533", "--clear-groups", "--",
                          "bwrap", "--seccomp=7"]
    monkeypatch.setattr(_process, "_setpriv", lambda: None)  # no util-linux: the fork drops them, as before
    argv_of, ids = _process._privileges_dropped_by_exec(lambda fd: ["bwrap"], {"user": 1, "group": 2, "extra_groups": []})
    assert ids == {"user": 1, "group": 2, "extra_groups": []} and argv_of(3) == ["bwrap"]
    assert _process._privileges_dropped_by_exec(lambda fd: ["bwrap"], {})[1] == {}  # not root: nothing to drop


def test_descendants_from_children_lists_match_a_scan_of_proc(monkeypatch):
    tree = subprocess.Popen(["sh", "-c", "sleep 30 & (sleep 30 & sleep 30) & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(_process.descendants(tree.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        fast = _process.descendants(tree.pid)
        monkeypatch.setattr(_process, "_children_files", lambda: False)
        assert _process.descendants(tree.pid) == fast
        assert len(fast) >= 3  # a sleep, the subshell and its sleeps (a shell may exec its last command)
        assert all(_process._parents()[pid] in (tree.pid, *fast) for pid in fast)
    finally:
        for pid in _process.descendants(tree.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tree.kill()
        tree.wait()


def test_entry_points_are_read_once_and_again_for_a_name_not_found(monkeypatch):
    import importlib.metadata

    reads = []

    original = importlib.metadata.entry_points

    def counting(**kwargs):
        reads.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting)
    monkeypatch.setattr(sandbox_api, "_ENTRY_POINTS", None)
    for _ in range(50):
        assert "local" in list_sandboxes() and has_sandbox("local")
        sandbox_api.sandbox_class("local")
    assert len(reads) == 1
    monkeypatch.setattr(sandbox_api, "_ENTRY_POINTS", {})  # as if the package was installed after the first read
    assert has_sandbox("local") and len(reads) == 2
    assert not has_sandbox("no-such-backend") and len(reads) == 3  # a miss re-reads before saying no


def _cgroup_parent() -> Path | None:
    parents = _cgroups._parents() if os.geteuid() == 0 else []
    for parent in parents:
        probe = parent / f"agentrl-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
            return parent
        except OSError:
            continue
    return None


@pytest.mark.skipif(_cgroup_parent() is None, reason="no writable cgroup hierarchy (needs root and cgroupfs)")
def test_groups_of_dead_owners_are_reaped_once_per_interval(monkeypatch):
    parent = _cgroup_parent()
    assert parent is not None
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process holds now (reused pids only delay a reap to a later run)
    monkeypatch.setattr(_cgroups, "_last_reap", float("-inf"))
    created = []
    try:
        stale = parent / f"agentrl-{dead.pid}-0"
        stale.mkdir()
        created.append(_cgroups.create_cgroup(f"agentrl-{os.getpid()}-900001", memory=256 << 20, processes=64, cpus=1))
        assert not stale.exists()  # the first group of a process reaps what dead owners left
        stale.mkdir()
        created.append(_cgroups.create_cgroup(f"agentrl-{os.getpid()}-900002", memory=256 << 20, processes=64, cpus=1))
        assert stale.exists()  # within REAP_INTERVAL: not listed again
        monkeypatch.setattr(_cgroups, "_last_reap", time.monotonic() - _cgroups.REAP_INTERVAL)
        created.append(_cgroups.create_cgroup(f"agentrl-{os.getpid()}-900003", memory=256 << 20, processes=64, cpus=1))
        assert not stale.exists()
    finally:
        for group in created:
            if group is not None:
                group.remove()
        if (parent / f"agentrl-{dead.pid}-0").exists():
            (parent / f"agentrl-{dead.pid}-0").rmdir()
