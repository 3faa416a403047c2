"""The docker sandbox for real (a running engine, the locally built image): flags, lifecycle, leaks and gc.

The hostile-program suite runs against this backend too (``test_sandbox_hostile.py``, ``backend`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from test_sandbox_local import in_namespace, no_leaks, run, wait_until

from agentrl.sandbox import SandboxClosedError, SandboxLimits, SandboxUnavailableError, open_sandbox

pytestmark = pytest.mark.docker
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def engine(docker_image):
    yield from no_leaks()


def ours(**filters):
    from agentrl_sandboxes.docker import docker_client

    client = docker_client()
    try:
        return client.api.containers(all=True, filters={"label": "agentrl.sandbox", **filters})
    finally:
        client.close()


def inspect(container_id):
    from agentrl_sandboxes.docker import docker_client

    client = docker_client()
    try:
        return client.api.inspect_container(container_id)
    finally:
        client.close()


def test_container_flags_and_labels():
    async def body():
        limits = SandboxLimits(memory=128 * MiB, disk=8 * MiB, shm=2 * MiB, processes=20, cpus=0.5)
        async with open_sandbox("docker", limits) as sb:
            return inspect(sb.container_id), sb.container_id

    info, container_id = run(body())
    host, config = info["HostConfig"], info["Config"]
    assert host["NetworkMode"] == "none" and config["NetworkDisabled"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and not host["Privileged"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    profile = json.loads(next(o for o in host["SecurityOpt"] if o.startswith("seccomp="))[len("seccomp="):])
    denied = {name for rule in profile["syscalls"] for name in rule["names"]}
    assert {"io_uring_setup", "io_uring_enter", "ptrace", "unshare", "setns", "mount", "bpf", "keyctl"} <= denied
    assert host["ReadonlyRootfs"] and host["LogConfig"]["Type"] == "none" and host["AutoRemove"]
    assert not host["Init"] and not host["Binds"] and not info["Mounts"]  # no volume, no docker socket
    assert host["PidsLimit"] == 22 and host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"]  # no swap
    assert host["Tmpfs"]["/tmp"].startswith("rw,exec,nosuid,nodev,size=8388608") and host["ShmSize"] == 2 * MiB
    assert config["User"] == "65534:65534" and not [e for e in config["Env"] or [] if not e.startswith("PATH=")]
    labels = config["Labels"]
    assert labels["agentrl.sandbox"] == "docker" and labels["agentrl.owner"].split(":")[1] == str(os.getpid())
    assert wait_until(lambda: not ours(id=container_id)), "the container outlived close()"


def test_exec_files_and_keep_workdir():
    async def body():
        async with open_sandbox("docker", SandboxLimits(wall_time=10)) as sb:
            r = await sb.exec("import os, sys\nprint(input(), os.getuid(), os.getcwd())\nsys.exit(3)", stdin="hi\n")
            assert (r.stdout, r.exit_code) == ("hi 65534 /tmp\n", 3)
            r = await sb.exec(["sh", "-c", "cat data.txt; echo err >&2"], files={"data.txt": "payload"})
            assert (r.stdout, r.stderr, r.exit_code) == ("payload", "err\n", 0)
            await sb.write_file("bin/run.sh", "#!/bin/sh\necho ran\n", executable=True)
            r = await sb.exec(["./bin/run.sh"])
            assert r.stdout == "ran\n", r
            r = await sb.exec("open('out.txt', 'w').write('result')")
            assert await sb.read_file("out.txt") == b"result"
            r = await sb.exec("import os; print(os.listdir('.'))")
            assert r.stdout == "[]\n"  # wiped before each program
        async with open_sandbox("docker", keep_workdir=True) as sb:
            await sb.exec("open('kept', 'w').write('1')")
            r = await sb.exec("import os; print(os.listdir('.'))")
            assert r.stdout == "['kept']\n"

    run(body())


def test_closed_sandbox_refuses_work_and_close_is_idempotent():
    async def body():
        sb = open_sandbox("docker")
        await sb.start()
        container_id = sb.container_id
        await sb.close()
        await sb.close()
        with pytest.raises(SandboxClosedError):
            await sb.exec("print(1)")
        return container_id

    container_id = run(body())
    assert not ours(id=container_id)


def test_cancelled_exec_kills_the_container_and_the_sandbox_recovers():
    async def body():
        async with open_sandbox("docker") as sb:
            first = sb.container_id
            ns = os.readlink(f"/proc/{sb.supervisor_pids[0]}/ns/pid")
            task = asyncio.ensure_future(sb.exec("import time\ntime.sleep(60)"))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert wait_until(lambda: not in_namespace(ns), 5)
            r = await sb.exec("print('again')")
            assert r.stdout == "again\n" and sb.starts == 2 and sb.container_id != first
            return first

    first = run(body())
    assert wait_until(lambda: not ours(id=first))


def test_fork_server_killed_from_outside_is_replaced():
    async def body():
        async with open_sandbox("docker") as sb:
            os.kill(sb.supervisor_pids[0], signal.SIGKILL)
            await asyncio.sleep(0.2)
            r = await sb.exec("print('new container')")
            assert r.stdout == "new container\n" and sb.starts == 2

    run(body())


def test_missing_image_says_how_to_build_it():
    async def body():
        async with open_sandbox("docker", image="agentrl/sandbox-python:no-such-tag"):
            pass

    with pytest.raises(SandboxUnavailableError, match="agentrl sandbox build"):
        run(body())


OWNER = textwrap.dedent("""
    import asyncio, sys
    from agentrl.sandbox import SandboxLimits, open_sandbox

    async def main():
        docker = open_sandbox("docker", SandboxLimits(wall_time=120))
        local = open_sandbox("local", SandboxLimits(wall_time=120))
        await docker.start(); await local.start()
        print(docker.container_id, *docker.supervisor_pids, *local.supervisor_pids, flush=True)
        program = "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(300)"
        await asyncio.gather(docker.exec(program), local.exec(program))

    asyncio.run(main())
""")


def test_sigkill_of_the_owner_then_gc_leaves_nothing():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        container_id, docker_pid, local_pid = owner.stdout.readline().split()
        namespaces = [os.readlink(f"/proc/{pid}/ns/pid") for pid in (docker_pid, local_pid)]
        # Both programs and their setsid children run (fork-server + 2 in each namespace).
        assert wait_until(lambda: all(len(in_namespace(ns)) >= 3 for ns in namespaces), 10)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # A live owner's containers are not touched by a plain gc; a dead owner's are.
    gc = subprocess.run([sys.executable, "-m", "agentrl.cli", "sandbox", "gc"], capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert wait_until(lambda: not ours(id=container_id), 15), gc.stdout
    assert wait_until(lambda: not any(in_namespace(ns) for ns in namespaces), 15)


def test_gc_spares_live_owners_unless_told_everything():
    from agentrl_sandboxes.docker import DockerSandbox

    async def body():
        async with open_sandbox("docker") as sb:
            assert DockerSandbox.reap() == []
            assert ours(id=sb.container_id)
            assert DockerSandbox.reap(everything=True) == [sb.container_id[:12]]
            r = await sb.exec("print('restarted')")  # its container was removed under it: a fresh one
            assert r.stdout == "restarted\n" and r.sandbox_restarted is False and sb.starts == 2

    run(body())


def test_sandbox_cli_build_is_a_no_op_when_built(docker_image):
    done = subprocess.run([sys.executable, "-m", "agentrl.cli", "sandbox", "build"], capture_output=True, text=True)
    assert done.returncode == 0 and f"{docker_image} is already built" in done.stdout, done.stderr


def test_gvisor_runtime_where_the_engine_has_it():
    from agentrl_sandboxes.docker import docker_client

    client = docker_client()
    try:
        runtimes = client.info().get("Runtimes") or {}
    finally:
        client.close()
    if "runsc" not in runtimes:
        pytest.skip("optional: docker has no 'runsc' runtime (apt-get install runsc; register it in daemon.json)")

    async def body():
        async with open_sandbox("docker", SandboxLimits(wall_time=10), runtime="runsc") as sb:
            host_kernel = os.uname().release
            r = await sb.exec(f"import os, platform, socket\nprint(platform.release() != {host_kernel!r}, os.getuid())\n"
                              "socket.socket(socket.AF_INET).connect(('1.1.1.1', 53))")
            assert r.stdout == "True 65534\n" and "Errno 97" in r.stderr, r  # gVisor's kernel; no network
            r = await sb.exec("while True:\n    pass\n", timeout=1)
            assert r.timed_out and r.signal == signal.SIGKILL
            r = await sb.exec("import os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(60)\n")
            r = await sb.exec("import os; print([p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', str(os.getpid()))])")
            assert r.stdout == "[]\n", r  # the daemon of the previous program is gone
            return sb.container_id

    container_id = run(body())
    assert wait_until(lambda: not ours(id=container_id))


IN_OWN_PID_NAMESPACE = textwrap.dedent("""
    import asyncio, json, os, subprocess, sys
    from agentrl.sandbox import SandboxLimits, open_sandbox

    def decoy_with_pid(pid):
        # A process of *this* namespace that holds the number the engine reports for the container's init.
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            proc = subprocess.Popen(["sleep", "120"])
            if proc.pid == pid:
                return proc
            proc.kill()
            proc.wait()
        raise SystemExit("could not place a decoy at pid %d" % pid)

    async def main():
        sb = open_sandbox("docker", SandboxLimits(wall_time=10))
        await sb.start()
        engine_pid = sb._client.api.inspect_container(sb.container_id)["State"]["Pid"]
        decoy = decoy_with_pid(engine_pid)
        first = (await sb.exec("print('ok')")).stdout
        task = asyncio.ensure_future(sb.exec("import time; time.sleep(60)"))
        await asyncio.sleep(1.0)
        task.cancel()  # the kill path: the container must die, through the engine
        await asyncio.gather(task, return_exceptions=True)
        again = (await sb.exec("print('again')")).stdout  # a fresh container
        await sb.close()
        print(json.dumps({"first": first, "again": again, "supervisors": list(sb.supervisor_pids),
                          "starts": sb.starts, "decoy_alive": decoy.poll() is None, "pid": os.getpid()}))
        decoy.kill()

    asyncio.run(main())
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and util-linux unshare")
def test_works_from_its_own_pid_namespace_and_signals_no_host_pid():
    """The engine's pid for the container is meaningless in the caller's pid namespace; a process of ours
    that holds that number must survive every kill path (cancel, restart, close)."""
    before = {c["Id"] for c in ours()}
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", IN_OWN_PID_NAMESPACE],
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["pid"] < 100 and report["supervisors"] == []  # in its own namespace: nothing verified by pid
    assert report["first"] == "ok\n" and report["again"] == "again\n" and report["starts"] == 2
    assert report["decoy_alive"]
    assert wait_until(lambda: not ({c["Id"] for c in ours()} - before))  # the engine removed both containers


def test_container_pidfd_refuses_a_process_that_is_not_the_containers_init():
    from agentrl_sandboxes.docker import container_pidfd

    async def body():
        async with open_sandbox("docker") as sb:
            (pid,) = sb.supervisor_pids  # verified: we run in the engine's pid namespace
            return pid, sb.container_id

    pid, container_id = run(body())
    assert container_pidfd(os.getpid(), container_id) is None  # a live host process, not in the container
    assert container_pidfd(1, container_id) is None
    assert container_pidfd(pid, container_id) is None  # the container is gone (its pid may be anyone's now)
