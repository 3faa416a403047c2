"""Shared fixtures. Test modules live flat in tests/ and may import each other's helpers by module name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

_DOCKER_REASON: list[str] = []


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` inside the block and restored after (a module that leaves it
    changed breaks later tests, e.g. vLLM's CPU attention checks the count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet request handler for test servers, with one way to answer in JSON."""

    def log_message(self, *args: object) -> None:
        pass

    def send_json(self, status: int, reply: object) -> None:
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def loopback_server(handler: type) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``handler`` (a ``BaseHTTPRequestHandler``) from a thread;
    yields its OpenAI-style API root, ``http://127.0.0.1:<port>/v1``, and shuts down after the block."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs that cache their SFT phase (``sft.cache``) keep it in the test session's own directory, not in the
    user's ``~/.cache/agentrl``; a test that sets ``AGENTRL_CACHE`` itself still wins."""
    before = os.environ.get("AGENTRL_CACHE")
    os.environ["AGENTRL_CACHE"] = str(tmp_path_factory.mktemp("agentrl-cache"))
    yield
    if before is None:
        os.environ.pop("AGENTRL_CACHE", None)
    else:
        os.environ["AGENTRL_CACHE"] = before


@pytest.fixture
def make() -> Iterator[Any]:
    """Build ``code-sandbox`` envs (``CodeSandboxEnv(*args, **kwargs)``) that are closed after the test, also
    when it fails (an unclosed sandbox outlives its loop)."""
    from agentrl_envs.code_sandbox import CodeSandboxEnv

    made: list[CodeSandboxEnv] = []

    def build(*args: Any, **kwargs: Any) -> CodeSandboxEnv:
        made.append(CodeSandboxEnv(*args, **kwargs))
        return made[-1]

    yield build
    for env in made:
        env.close()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One small Ray instance for a module (2 CPUs, a 128 MiB object store): runs join it, and leave it running,
    instead of starting their own. A module opts in with ``pytest.mark.usefixtures("local_ray")``."""
    import ray

    ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: small models are faster, and timings steadier, on a shared CPU. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with torch_threads(1):
        yield


def _start_dockerd() -> None:
    """Start a docker engine when none runs and we may (root, Debian's docker.io installed)."""
    if os.geteuid() != 0 or shutil.which("dockerd") is None or Path("/var/run/docker.sock").exists():
        return
    with open("/var/log/agentrl-test-dockerd.log", "ab") as log:  # the daemon keeps its own copy of the fd
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    for _ in range(100):
        if Path("/var/run/docker.sock").exists():
            return
        time.sleep(0.2)


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The docker sandbox's image, built if missing, on an engine started if needed.

    Skips (with the reason) where no engine can run, unless ``AGENTRL_REQUIRE_DOCKER=1`` (set by CI), where
    that is a failure.
    """
    from agentrl.sandbox import SandboxUnavailableError

    if _DOCKER_REASON:
        _skip_or_fail(_DOCKER_REASON[0])
    try:
        from agentrl_sandboxes.docker import DockerSandbox, docker_client

        _start_dockerd()
        docker_client().close()
        return DockerSandbox.build_image(echo=lambda line: print(f"[docker image] {line}", file=sys.stderr))
    except (SandboxUnavailableError, ImportError) as exc:
        _DOCKER_REASON.append(f"no docker engine for the docker sandbox tests: {exc}")
        _skip_or_fail(_DOCKER_REASON[0])
        raise


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("AGENTRL_REQUIRE_DOCKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    """Each sandbox backend by name; the docker one only where an engine runs (see :func:`docker_image`)."""
    if request.param == "docker":
        request.getfixturevalue("docker_image")
    return request.param
