"""Readiness checks work for descriptors numbered past 1023, which a process with hundreds of sandboxes holds."""

from __future__ import annotations

import os
import resource

import pytest

from agentrl._fd import readable

HIGH = 1500


@pytest.fixture
def high_pipe():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH + 1:
        pytest.skip(f"the descriptor limit ({hard}) is too low to open descriptor {HIGH}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 2), hard))
    r, w = os.pipe()
    os.dup2(r, HIGH)
    os.close(r)
    try:
        yield HIGH, w
    finally:
        os.close(HIGH)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_past_1023_is_polled_not_refused(high_pipe):
    fd, w = high_pipe
    assert not readable(fd)  # select.select would raise "filedescriptor out of range"
    os.write(w, b"x")
    assert readable(fd) and readable(fd, 0.5)


def test_a_sandbox_server_whose_pidfd_is_past_1023_still_says_whether_it_died(high_pipe):
    from agentrl_sandboxes._process import ServerProcess

    fd, w = high_pipe
    server = ServerProcess.__new__(ServerProcess)
    server._pidfd = fd  # a pidfd becomes readable when its process exits, as this pipe when written
    server.proc = type("Running", (), {"returncode": None})()  # asyncio has not noticed the exit
    assert not server.died()
    os.write(w, b"x")
    assert server.died()
