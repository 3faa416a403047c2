"""``SandboxLimits.memory`` is one total for all of a program's processes, on every backend and cgroup setup.

Runs for real: the local backend with its memory cgroup (whatever this machine offers: v1 or v2) and with
cgroups turned off (the supervisor's ``/proc`` watch alone: the path of a machine without usable cgroups),
and the docker backend. Files written count against ``disk`` / ``shm``, never ``memory``.
"""

from __future__ import annotations

import os
import textwrap
import time

import pytest
from test_sandbox_local import BWRAP, MiB, hostile, no_leaks, run

from agentrl.sandbox import SandboxLimits

pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is missing: apt-get install bubblewrap")

EIGHT_HOLDERS = textwrap.dedent("""
    import os, time
    for i in range(8):
        if os.fork() == 0:
            block = b'x' * (300 * 1024 * 1024)   # touched: every page is resident
            os.write(1, b'held %d\\n' % i)
            time.sleep(30)
            os._exit(0)
    time.sleep(30)
""")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield from no_leaks()


@pytest.fixture(params=["local-cgroup", "local-no-cgroup", pytest.param("docker", marks=pytest.mark.docker)])
def setup(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    if request.param == "docker":
        request.getfixturevalue("docker_image")
        return "docker", {}
    return "local", {"cgroups": request.param == "local-cgroup"}


@pytest.mark.slow
def test_eight_processes_of_300_mb_are_stopped_at_512_mb(setup):
    backend, options = setup
    limits = SandboxLimits(memory=512 * MiB, processes=16, wall_time=30)
    started = time.monotonic()
    result, _ = run(hostile(backend, EIGHT_HOLDERS, limits, **options))
    held = result.stdout.split("\n")[:-1]
    assert result.oom and result.limit == "memory" and not result.timed_out, result
    assert len(held) <= 1, result.stdout  # two holders are 600 MB: the second never gets there
    assert time.monotonic() - started < 20  # ended by the limit, not by the 30 s deadline


def test_files_count_against_disk_and_shm_not_memory(setup):
    backend, options = setup
    program = textwrap.dedent("""
        import os, time
        with open('/tmp/big', 'wb') as f:
            f.write(b'f' * (200 * 1024 * 1024))
        with open('/dev/shm/seg', 'wb') as f:
            f.write(b's' * (12 * 1024 * 1024))
        r, w = os.pipe()
        if os.fork() == 0:
            block = b'x' * (200 * 1024 * 1024)
            os.write(w, b'1')
            time.sleep(30)
        os.read(r, 1)
        block = b'y' * (200 * 1024 * 1024)
        time.sleep(0.3)   # a few watch intervals with 200 MB of files + 400 MB of processes
        print('ok', os.path.getsize('/tmp/big'))
    """)
    limits = SandboxLimits(memory=512 * MiB, disk=256 * MiB, shm=16 * MiB, file_size=256 * MiB, processes=16,
                           wall_time=30)
    result, _ = run(hostile(backend, program, limits, **options))
    assert result.ok and result.stdout == f"ok {200 * MiB}\n" and result.limit is None, result


def test_a_full_disk_is_reported_as_disk_not_memory(setup):
    backend, options = setup
    program = "with open('/tmp/fill', 'wb') as f:\n    while True:\n        f.write(b'z' * (1 << 20))\n"
    limits = SandboxLimits(memory=256 * MiB, disk=64 * MiB, file_size=128 * MiB, wall_time=30)
    result, _ = run(hostile(backend, program, limits, **options))
    assert result.exit_code == 1 and "No space left" in result.stderr, result
    assert result.limit == "disk" and not result.oom


@pytest.mark.slow
def test_watch_reaction_time_without_cgroups(capsys):
    """Without any cgroup, how long after the total passes the limit the program is dead (measured)."""
    program = textwrap.dedent("""
        import os, time
        r, w = os.pipe()
        if os.fork() == 0:
            block = b'x' * (300 * 1024 * 1024)
            os.write(w, b'1')
            time.sleep(30)
        os.read(r, 1)
        chunks = []
        for i in range(1, 100):
            chunks.append(b'y' * (8 * 1024 * 1024))
            os.write(1, b'%d %r\\n' % (8 * i, time.monotonic()))
    """)
    limits = SandboxLimits(memory=512 * MiB, processes=16, wall_time=30)
    ended: list[float] = []

    async def stamp(sb, result):
        ended.append(time.monotonic())

    result, _ = run(hostile("local", program, limits, after=stamp, cgroups=False))
    assert result.oom and result.limit == "memory", result
    lines = [(int(a), float(b)) for a, b in (line.split() for line in result.stdout.splitlines())]
    # 300 MB held by the child + what the parent reached: the first line past 512 MB is after the crossing.
    past = [t for held, t in lines if 300 + held > 512]
    reached = lines[-1][0] + 300
    reaction = ended[0] - past[0] if past else 0.0
    with capsys.disabled():
        print(f"\nmemory watch (no cgroup): killed at <= {reached} MB of 512; "
              f"{reaction * 1e3:.1f} ms from the first report past the limit to the result on the host")
    assert reached <= 512 + 160 and reaction < 2.0
    assert os.cpu_count()  # the figures above are from this machine
