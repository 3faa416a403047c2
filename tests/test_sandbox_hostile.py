"""Hostile programs against every sandbox backend (local and docker): each is contained, and leaves nothing behind.

Each test runs once per backend (the ``backend`` fixture in conftest.py). The checks live in
:func:`test_sandbox_local.hostile`: after ``exec`` returns only the fork-server is left in the sandbox's pid
namespace, the next program still runs, and after ``close`` the namespace is empty and no process of the
sandbox uid remains. Assertions are on containment, never on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import signal
import socket
import textwrap
import threading
from pathlib import Path

import pytest
from test_sandbox_local import BWRAP, MiB, hostile, no_leaks, run

from agentrl.sandbox import SandboxFileError, SandboxLimits

pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is missing: apt-get install bubblewrap")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield from no_leaks()


def bridge_gateway() -> str:
    from agentrl_sandboxes.docker import docker_client

    client = docker_client()
    try:
        config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
        return config.get("Gateway") or str(ipaddress.ip_network(config["Subnet"])[1])  # docker0's address
    finally:
        client.close()


def test_process_cap_stops_a_fork_bomb(backend):
    program = textwrap.dedent("""
        import os, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(100)
                    os._exit(0)
                n += 1
        except OSError as exc:
            print(n, exc.errno)
    """)
    result, _ = run(hostile(backend, program, SandboxLimits(processes=16)))
    count, err = map(int, result.stdout.split())
    assert err == errno.EAGAIN and count <= 16


@pytest.mark.slow
def test_endless_fork_bomb_times_out_and_dies(backend):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result, _ = run(hostile(backend, program, SandboxLimits(processes=32), timeout=2))
    assert result.timed_out and result.signal == signal.SIGKILL


def test_thread_bomb_is_capped(backend):
    program = textwrap.dedent("""
        import threading, time
        threads = []
        try:
            while True:
                t = threading.Thread(target=time.sleep, args=(100,), daemon=True)
                t.start()
                threads.append(t)
        except (RuntimeError, MemoryError) as exc:
            print(len(threads))
            import os; os._exit(0)
    """)
    result, _ = run(hostile(backend, program, SandboxLimits(processes=16)))
    assert int(result.stdout) <= 16


def test_memory_bomb_in_one_process_is_refused(backend):
    program = "blocks = []\nwhile True:\n    blocks.append(b'x' * (16 * 1024 * 1024))\n"
    result, _ = run(hostile(backend, program, SandboxLimits(memory=256 * MiB)))
    assert result.exit_code == 1 and "MemoryError" in result.stderr


@pytest.mark.slow
def test_memory_bomb_in_many_processes_is_capped(backend):
    program = textwrap.dedent("""
        import os
        pids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                try:
                    block = b'x' * (200 * 1024 * 1024)
                    import time; time.sleep(1)
                finally:
                    os._exit(0)
            pids.append(pid)
        for p in pids:
            os.waitpid(p, 0)
    """)

    limits = SandboxLimits(memory=256 * MiB, disk=1 * MiB, shm=1 * MiB, processes=16, wall_time=20)
    result, _ = run(hostile(backend, program, limits))
    assert result.oom and result.limit == "memory", result  # with or without a cgroup (test_sandbox_memory.py)


def test_infinite_loop_hits_the_deadline(backend):
    result, _ = run(hostile(backend, "while True:\n    pass\n", timeout=1))
    assert result.timed_out and result.signal == signal.SIGKILL and result.wall_time >= 1


def test_cpu_time_limit(backend):
    result, _ = run(hostile(backend, "while True:\n    pass\n", SandboxLimits(cpu_time=1, wall_time=30)))
    # SIGXCPU comes from the kernel's CPU clock, which rusage can trail under load: the signal decides.
    assert result.timed_out and result.limit == "cpu_time" and result.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert 0.5 <= result.cpu_time < 10 and not result.oom


def test_sleep_past_timeout_and_ignoring_sigterm(backend):
    program = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(100)\n"
    result, _ = run(hostile(backend, program, timeout=1))
    assert result.timed_out and result.stdout == "up\n"  # output before the deadline is kept


def test_setsid_daemon_does_not_outlive_its_program(backend):
    program = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    open('/tmp/daemon', 'a').write('x')
                    time.sleep(0.05)
            os._exit(0)
        time.sleep(0.3)
        print('parent done')
    """)

    async def check(sb, result):
        await asyncio.sleep(0.3)
        r = await sb.exec("import os\nprint(os.path.exists('/tmp/daemon'), "
                          "[p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())])")
        assert r.stdout == "False []\n", r.stdout

    result, _ = run(hostile(backend, program, after=check))
    assert result.stdout == "parent done\n" and not result.timed_out


def test_child_holding_stdout_open_does_not_hang_exec(backend):
    program = "import subprocess\nsubprocess.Popen(['sleep', '100'])\nprint('bye')\n"
    result, _ = run(hostile(backend, program, timeout=30))
    assert result.stdout == "bye\n" and not result.timed_out and result.wall_time < 20


def test_output_flood_is_capped_and_drained(backend):
    program = textwrap.dedent("""
        import os
        chunk = b'y' * 65536
        for _ in range(800):
            os.write(1, chunk)
            os.write(2, chunk)
        print('finished')
    """)
    result, _ = run(hostile(backend, program, SandboxLimits(output_bytes=64 * 1024), timeout=60))
    assert result.exit_code == 0 and result.stdout_truncated and result.stderr_truncated
    assert len(result.stdout) == 64 * 1024 and len(result.stderr) == 64 * 1024


def test_nothing_outside_the_work_dir_is_writable(backend):
    program = textwrap.dedent("""
        import os
        ok = []
        for path in ['/usr/agentrl-probe', '/agentrl-probe', '/dev/agentrl-probe', '/proc/agentrl-probe',
                     '/etc/agentrl-probe', '/home/agentrl-probe', '/bin/agentrl-probe', '/proc/sys/kernel/hostname',
                     '/proc/sys/vm/drop_caches', '/proc/1/oom_score_adj']:
            try:
                open(path, 'w').write('1')
                ok.append(path)
            except OSError:
                pass
        open('/tmp/fine', 'w').write('1')
        open('/dev/shm/fine', 'w').write('1')
        print(ok)
    """)
    result, _ = run(hostile(backend, program))
    assert result.stdout == "[]\n", result
    assert not Path("/usr/agentrl-probe").exists() and not Path("/agentrl-probe").exists()


def test_host_secrets_and_environment_are_invisible(backend, monkeypatch):
    monkeypatch.setenv("AGENTRL_TEST_SECRET", "hunter2")
    program = textwrap.dedent("""
        import os
        seen = [dict(os.environ)]
        for path in ['/etc/shadow', '/etc/passwd', '/root/.bashrc', '/proc/1/environ',
                     '/var/run/docker.sock', '/run/docker.sock', '/home']:
            try:
                seen.append(open(path, 'rb').read()[:100])
            except OSError as exc:
                seen.append(type(exc).__name__)
        print(seen)
    """)
    result, _ = run(hostile(backend, program))
    environment, *reads = eval(result.stdout)  # what the program printed: a dict, then bytes or error names
    assert "hunter2" not in result.stdout and "AGENTRL_TEST_SECRET" not in environment
    failed = dict(zip(['/etc/shadow', '/etc/passwd', '/root/.bashrc', '/proc/1/environ', '/var/run/docker.sock',
                       '/run/docker.sock', '/home'], reads, strict=True))
    if backend == "docker":  # the image's own /etc/passwd (Debian's base-passwd), not the host's secrets
        assert failed.pop("/etc/passwd").startswith(b"root:x:0:0:")
    assert all(isinstance(v, str) for v in failed.values()), failed  # every other read failed


def test_no_network_not_even_host_loopback(backend):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    program = textwrap.dedent(f"""
        import socket
        results = []
        for family, addr in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET, ('1.1.1.1', 53)),
                             (socket.AF_INET6, ('::1', {port})), (socket.AF_NETLINK, None), (socket.AF_PACKET, None)]:
            try:
                s = socket.socket(family, socket.SOCK_STREAM if addr else socket.SOCK_RAW)
                s.settimeout(2)
                s.connect(addr)
                results.append('connected')
            except OSError as exc:
                results.append(exc.errno)
        print(results)
    """)
    try:
        result, _ = run(hostile(backend, program))
    finally:
        server.close()
    assert result.stdout == f"{[errno.EAFNOSUPPORT] * 5}\n", result


def test_network_is_available_when_asked(backend):
    # A container on docker's bridge reaches the host at the bridge's gateway, not at the host's loopback.
    host = "127.0.0.1" if backend == "local" else bridge_gateway()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    port = server.getsockname()[1]

    def serve():
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.sendall(b"hello")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    program = f"import socket\ns = socket.create_connection(('{host}', {port}), timeout=5)\nprint(s.recv(5))\n"
    try:
        result, _ = run(hostile(backend, program, SandboxLimits(network=True)))
    finally:
        server.close()
    assert result.stdout == "b'hello'\n", result


def test_the_program_cannot_kill_the_sandbox(backend):
    program = textwrap.dedent("""
        import ctypes, fcntl, os, signal
        libc = ctypes.CDLL(None, use_errno=True)
        results = []
        for pid in (-1, 1, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
                results.append('killed %d' % pid)
            except OSError as exc:
                results.append(exc.errno)
        for call in (lambda: os.killpg(1, signal.SIGKILL), lambda: os.pidfd_open(1),
                     lambda: fcntl.fcntl(os.pipe()[0], fcntl.F_SETOWN, os.getppid())):
            try:
                call()
                results.append('allowed')
            except OSError as exc:
                results.append(exc.errno)
        fd = os.open('/proc/%d' % os.getppid(), os.O_RDONLY | os.O_DIRECTORY)
        results.append(libc.syscall(424, fd, 9, None, 0) == -1 and ctypes.get_errno())
        print(results)
    """)
    result, starts = run(hostile(backend, program))
    assert result.stdout == f"{[errno.EPERM] * 7}\n", result
    assert starts == 1 and not result.sandbox_restarted


def test_filling_tmp_and_shm_hits_their_size(backend):
    program = textwrap.dedent("""
        import errno
        for path in ('/tmp/fill', '/dev/shm/fill'):
            try:
                with open(path, 'wb') as f:
                    while True:
                        f.write(b'z' * 65536)
            except OSError as exc:
                print(path, exc.errno == errno.ENOSPC)
    """)
    result, _ = run(hostile(backend, program, SandboxLimits(disk=2 * MiB, shm=1 * MiB)))
    assert result.stdout == "/tmp/fill True\n/dev/shm/fill True\n", result


def test_file_size_limit(backend):
    program = "try:\n    open('big', 'wb').write(b'a' * 3_000_000)\nexcept OSError as exc:\n    print(exc.errno)\n"
    result, _ = run(hostile(backend, program, SandboxLimits(file_size=1 * MiB)))
    assert result.stdout == f"{errno.EFBIG}\n", result


def test_rlimits_cannot_be_raised(backend):
    program = textwrap.dedent("""
        import resource
        out = []
        for name in ('RLIMIT_NPROC', 'RLIMIT_AS', 'RLIMIT_NOFILE', 'RLIMIT_CPU', 'RLIMIT_FSIZE'):
            limit = getattr(resource, name)
            try:
                resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                out.append(name)
            except (ValueError, OSError):
                pass
        print(out)
    """)
    result, _ = run(hostile(backend, program))
    assert result.stdout == "[]\n", result


def test_fd_exhaustion_is_capped(backend):
    program = "import os\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/dev/null', os.O_RDONLY))\n" \
              "except OSError as exc:\n    print(len(fds), exc.errno)\n"
    result, _ = run(hostile(backend, program, SandboxLimits(open_files=64)))
    count, err = map(int, result.stdout.split())
    assert err == errno.EMFILE and count <= 64


def test_kernel_attack_surface_is_refused(backend):
    program = textwrap.dedent("""
        import ctypes, errno, fcntl, os, termios
        libc = ctypes.CDLL(None, use_errno=True)
        def call(*args):
            return ctypes.get_errno() if libc.syscall(*args) == -1 else 'allowed'
        params = ctypes.create_string_buffer(120)
        out = {
            'ptrace_traceme': call(101, 0, 0, 0, 0),
            'ptrace_attach_1': call(101, 16, 1, 0, 0),
            'io_uring_setup': call(425, 8, params),
            'unshare_user': call(272, 0x10000000),
            'unshare_net': call(272, 0x40000000),
            'clone_newns': call(56, 0x00020000 | 17, 0, 0, 0, 0),
            'mount': call(165, b'none', b'/tmp', b'tmpfs', 0, 0),
            'bpf': call(321, 0, 0, 0),
            'keyctl': call(250, 0, 0, 0, 0, 0),
            'perf_event_open': call(298, 0, 0, -1, -1, 0),
            'setns': call(308, 0, 0),
        }
        try:
            fcntl.ioctl(0, termios.TIOCSTI, b'x')
            out['tiocsti'] = 'allowed'
        except OSError as exc:
            out['tiocsti'] = exc.errno
        for path in ('/proc/1/mem', '/proc/1/fd/3', '/proc/1/maps', '/proc/1/environ'):
            try:
                open(path, 'rb').read(1)
                out[path] = 'allowed'
            except OSError as exc:
                out[path] = exc.errno
        print(out)
    """)
    result, _ = run(hostile(backend, program))
    assert "allowed" not in result.stdout and "EPERM" not in result.stdout, result
    values = eval(result.stdout)  # a dict of errno values printed by the program
    assert all(v == errno.EPERM for k, v in values.items() if not k.startswith("/proc")), values
    assert all(v in (errno.EACCES, errno.EPERM, errno.ENOENT) for k, v in values.items() if k.startswith("/proc"))


def test_nested_namespaces_and_proc_snooping(backend):
    program = textwrap.dedent("""
        import os, subprocess
        r = subprocess.run(['unshare', '-r', 'true'], capture_output=True)
        print(r.returncode != 0, sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
    """)
    result, _ = run(hostile(backend, program))
    ok, pids = result.stdout.split(" ", 1)
    assert ok == "True" and max(eval(pids)) < 10, result  # only the sandbox's own few processes are visible


def test_symlink_hardlink_and_fifo_escapes_through_returned_files(backend):
    program = textwrap.dedent("""
        import os
        os.symlink('/usr/bin/python3', 'link')
        os.symlink('/proc/1/environ', 'proclink')
        os.mkdir('d'); os.symlink('/proc/self', 'd/self')
        os.mkfifo('fifo')
        try:
            os.link('/usr/bin/python3', 'hard')
        except OSError as exc:
            print('hardlink', exc.errno)
    """)

    async def check(sb, result):
        for path in ("link", "proclink", "d/self/environ", "fifo", "../etc/passwd", "/usr/bin/python3"):
            with pytest.raises(SandboxFileError):
                await sb.read_file(path)
        with pytest.raises(SandboxFileError):
            await sb.write_file("link", "overwrite")

    result, _ = run(hostile(backend, program, after=check))
    assert result.stdout == f"hardlink {errno.EXDEV}\n", result


def test_nothing_persists_into_the_next_program(backend):
    program = textwrap.dedent("""
        import os
        open('/tmp/left', 'w').write('1')
        open('/dev/shm/left', 'w').write('1')
        os.makedirs('/tmp/a/b/c'); os.chmod('/tmp/a/b', 0)
        if os.fork() == 0:
            os.setsid()
            import time; time.sleep(100)
    """)

    async def check(sb, result):
        r = await sb.exec("import os; print(os.listdir('/tmp'), os.listdir('/dev/shm'))")
        assert r.stdout == "[] []\n", r

    run(hostile(backend, program, after=check))


def test_undeletable_work_dir_is_replaced_and_staged_files_survive(backend):
    program = textwrap.dedent("""
        import os
        os.chdir('/tmp')
        for _ in range(400):  # deeper than PATH_MAX (4096 bytes) allows to name
            os.mkdir('d' * 20)
            os.chdir('d' * 20)
    """)

    async def check(sb, result):
        assert result.exit_code == 0, result
        await sb.write_file("input.txt", "kept")
        r = await sb.exec("import os; print(sorted(os.listdir('.')), open('input.txt').read())")
        assert r.stdout == "['input.txt'] kept\n", r
        assert sb.starts == 2

    run(hostile(backend, program, after=check))


@pytest.mark.slow
def test_spinning_on_all_cores_is_killed(backend):
    program = "import os\nfor _ in range(3):\n    os.fork()\nwhile True:\n    pass\n"
    result, _ = run(hostile(backend, program, timeout=2))
    assert result.timed_out
