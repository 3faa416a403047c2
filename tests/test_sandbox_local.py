"""The local sandbox (bubblewrap + fork-server), for real: behaviour and lifecycle (cancel, close, restarts).

The hostile-program suite is ``test_sandbox_hostile.py``; it shares :func:`hostile` and the leak checks here.
Assertions are on containment and cleanup, never on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from agentrl_sandboxes.local import LocalSandbox

from agentrl.errors import ConfigError
from agentrl.sandbox import (
    SandboxClosedError,
    SandboxFileError,
    SandboxLimits,
    SandboxUnavailableError,
    open_sandbox,
)

BWRAP = LocalSandbox().bwrap
pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is missing: apt-get install bubblewrap")
MiB = 1024 * 1024
SANDBOX_UID = 65534 if os.geteuid() == 0 else os.getuid()


def run(coro):
    return asyncio.run(coro)


def sandbox_uid_pids() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{name}/status").read_text()
                uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
                if int(uid) == SANDBOX_UID and int(name) != os.getpid() and alive(int(name)):
                    found.add(int(name))
    return found


def alive(pid: int) -> bool:
    """Running (not a zombie: a container whose init never reaps may keep those around)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def in_namespace(ns: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") == ns and alive(int(name)):
                    found.append(int(name))
    return found


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def no_leaks():
    """Fixture body: no process of the sandbox uid that the test started may still run afterwards."""
    before = sandbox_uid_pids()
    yield
    assert wait_until(lambda: not (sandbox_uid_pids() - before)), f"leaked: {sandbox_uid_pids() - before}"


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield from no_leaks()


def assert_only_supervisors(sb) -> None:
    assert set(sb.host_pids()) == set(sb.supervisor_pids), "a process outlived its program"


async def hostile(backend, program, limits=None, *, timeout=None, after=None, **options):
    """Run ``program``, check the sandbox is clean and alive, close it, check its namespace is gone."""
    async with open_sandbox(backend, limits or SandboxLimits(wall_time=10), **options) as sb:
        ns = os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid")
        result = await sb.exec(program, timeout=timeout)
        assert_only_supervisors(sb)
        if after is not None:
            await after(sb, result)
        probe = await sb.exec("print('alive')")
        assert probe.stdout == "alive\n", probe
        starts = sb.starts
    assert wait_until(lambda: not in_namespace(ns))
    return result, starts


# ---- behaviour ---------------------------------------------------------------------------------------------


def test_exec_stdin_stdout_stderr_exit_code():
    async def main():
        async with LocalSandbox() as sb:
            r = await sb.exec("import sys\nname = input()\nprint('hi', name)\nprint('warn', file=sys.stderr)\n"
                              "sys.exit(3)", stdin="bob\n")
            assert (r.exit_code, r.signal, r.stdout, r.stderr) == (3, None, "hi bob\n", "warn\n")
            assert not r.timed_out and not r.output_truncated and r.cpu_time >= 0 and r.peak_memory
            r = await sb.exec("raise ValueError('boom')")
            assert r.exit_code == 1 and "ValueError: boom" in r.stderr and "raise ValueError" in r.stderr
            assert "run_source" not in r.stderr
            r = await sb.exec("def f(:\n")
            assert r.exit_code == 1 and "SyntaxError" in r.stderr
            r = await sb.exec(["sh", "-c", "echo $HOME; kill -9 $$"])
            assert r.stdout == "/tmp\n" and r.signal == signal.SIGKILL and r.exit_code is None
            r = await sb.exec(["no-such-program"])
            assert r.exit_code == 127 and "no-such-program" in r.stderr
            assert (await sb.exec("print('ü' * 3, end='')")).stdout == "üüü"

    run(main())


def test_files_in_and_out():
    async def main():
        async with LocalSandbox() as sb:
            r = await sb.exec("import helper; print(str(helper.X) + open('data/in.txt').read())",
                              files={"helper.py": "X = 41\n", "data/in.txt": "1"})
            assert r.stdout == "411\n", r.stderr
            await sb.write_file("run.sh", "#!/bin/sh\necho ran > out.txt\n", executable=True)
            r = await sb.exec(["./run.sh"])
            assert r.exit_code == 0, r.stderr
            assert await sb.read_file("out.txt") == b"ran\n"
            assert await sb.read_file("/tmp/out.txt") == b"ran\n"
            r = await sb.exec("import os; print(sorted(os.listdir('.')))")
            assert r.stdout == "[]\n"  # wiped: nothing persists into the next program
            with pytest.raises(SandboxFileError, match="outside the work dir"):
                await sb.write_file("../etc/x", "no")
            with pytest.raises(SandboxFileError, match="FileNotFoundError"):
                await sb.read_file("missing.txt")
            big = os.urandom(3 * MiB)
            r = await sb.exec("import sys, hashlib\nprint(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())\n"
                              "open('copy.bin', 'wb').write(open('big.bin', 'rb').read())",
                              stdin=big, files={"big.bin": big})
            assert r.stdout == hashlib.sha256(big).hexdigest() + "\n", r.stderr
            assert await sb.read_file("copy.bin") == big
            with pytest.raises(SandboxFileError, match="could not stage"):
                await sb.exec("pass", files={"../../etc/x": "no"})
            with pytest.raises(ConfigError):
                await sb.exec("pass", timeout=0)

    run(main())


def test_keep_workdir_keeps_files_but_not_processes():
    async def main():
        async with LocalSandbox(keep_workdir=True) as sb:
            await sb.exec("open('state', 'w').write('1')")
            r = await sb.exec("print(open('state').read())")
            assert r.stdout == "1\n"
            assert_only_supervisors(sb)

    run(main())


def test_missing_bubblewrap_says_how_to_install():
    async def main():
        async with LocalSandbox(bwrap="/nonexistent/bwrap"):
            pass

    with pytest.raises(SandboxUnavailableError, match=r"apt-get install bubblewrap.*unsafe_no_bwrap"):
        run(main())


def test_closed_sandbox_refuses_work_and_close_is_idempotent():
    async def main():
        sb = LocalSandbox()
        await sb.start()
        ns = os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid")
        await sb.close()
        await sb.close()
        assert not in_namespace(ns)
        with pytest.raises(SandboxClosedError):
            await sb.exec("pass")

    run(main())


def test_cancelled_exec_kills_everything_and_the_sandbox_recovers():
    async def main():
        async with LocalSandbox() as sb:
            ns = os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid")
            task = asyncio.ensure_future(sb.exec("import os, time\nos.fork()\ntime.sleep(100)", timeout=60))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not in_namespace(ns)
            r = await sb.exec("print('back')")
            assert r.stdout == "back\n" and sb.starts == 2

    run(main())


def test_cancelling_the_owner_closes_the_sandbox():
    namespaces = []

    async def owner():
        async with LocalSandbox() as sb:
            namespaces.append(os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid"))
            await sb.exec("import time; time.sleep(100)", timeout=60)

    async def main():
        task = asyncio.ensure_future(owner())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert namespaces and not in_namespace(namespaces[0])


def test_fork_server_restarts_when_killed():
    async def main():
        async with LocalSandbox() as sb:
            os.kill(sb.supervisor_pids[0], signal.SIGKILL)
            time.sleep(0.2)  # blocking: the event loop has not seen the exit when exec starts
            r = await sb.exec("print('ok')")
            assert r.stdout == "ok\n" and not r.sandbox_restarted and sb.starts == 2

    run(main())


def test_sigkill_of_the_owner_leaves_nothing_running():
    owner = textwrap.dedent("""
        import asyncio, os, sys
        from agentrl_sandboxes.local import LocalSandbox
        async def main():
            async with LocalSandbox() as sb:
                print(os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid"), flush=True)
                await sb.exec("import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(100)", timeout=60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    try:
        ns = proc.stdout.readline().strip()
        assert ns.startswith("pid:"), ns
        assert wait_until(lambda: len(in_namespace(ns)) == 3)  # fork-server, program, daemon
        proc.kill()
    finally:
        proc.wait()
        proc.stdout.close()
    assert wait_until(lambda: not in_namespace(ns))


@pytest.mark.slow
def test_host_deadline_kills_a_sandbox_whose_fork_server_hangs():
    async def main():
        async with LocalSandbox(grace=1.0) as sb:
            ns = os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid")
            task = asyncio.ensure_future(sb.exec("import time; time.sleep(100)", timeout=1))
            await asyncio.sleep(0.3)
            os.kill(sb.supervisor_pids[0], signal.SIGSTOP)  # it can no longer enforce the deadline itself
            r = await task
            assert r.timed_out and r.sandbox_restarted and not in_namespace(ns)
            assert (await sb.exec("print('fresh')")).stdout == "fresh\n"

    run(main())


def test_concurrent_sandboxes_have_their_own_process_caps():
    program = textwrap.dedent("""
        import os, time
        n = 0
        try:
            while n < 40:
                if os.fork() == 0:
                    time.sleep(100)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        time.sleep(1)
        print(n)
    """)

    async def main():
        limits = SandboxLimits(processes=16)
        async with LocalSandbox(limits) as a, LocalSandbox(limits) as b:
            ra, rb = await asyncio.gather(a.exec(program), b.exec(program))
        assert 12 <= int(ra.stdout) <= 16 and 12 <= int(rb.stdout) <= 16, (ra, rb)

    run(main())


def test_unsafe_mode_still_kills_daemons_and_blocks_sockets():
    program = textwrap.dedent("""
        import os, socket, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(100)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            print("blocked", exc.errno)
    """)

    async def main():
        async with LocalSandbox(unsafe_no_bwrap=True) as sb:
            r = await sb.exec(program)
            assert r.stdout == f"blocked {errno.EAFNOSUPPORT}\n", r.stderr
            assert set(sb.host_pids()) == set(sb.supervisor_pids)

    run(main())


def test_exit_limit_names_the_limit_that_ended_a_program():
    from agentrl_sandboxes._base import exit_limit

    def reply(**fields):
        return {"signal": None, "exit_code": 0, "cpu": 0.0, "limit": None, "full": [], **fields}

    # Under load rusage can trail the kernel's CPU clock: SIGXCPU is the CPU limit whatever rusage says.
    assert exit_limit(reply(signal=signal.SIGXCPU, exit_code=None, cpu=0.31), 1.0, False) == "cpu_time"
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None, cpu=2.0), 1.0, False) == "cpu_time"
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None, cpu=0.1), 1.0, False) is None
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None, limit="memory"), 1.0, False) == "memory"
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None, limit="wall_time"), 1.0, False) == "wall_time"
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None, limit="wall_time"), 1.0, True) == "memory"
    assert exit_limit(reply(signal=signal.SIGKILL, exit_code=None), 1.0, True) == "memory"  # a cgroup OOM kill
    assert exit_limit(reply(exit_code=1, full=["disk"]), 1.0, False) == "disk"
    assert exit_limit(reply(exit_code=0, full=["disk"]), 1.0, False) is None  # filled it and succeeded
