"""The Sandbox protocol: limits validation, results, backend lookup by name, a light import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentrl.errors import AgentRLError, ConfigError, PluginError
from agentrl.sandbox import (
    ExecResult,
    Sandbox,
    SandboxError,
    SandboxFileError,
    SandboxLimits,
    SandboxNotFoundError,
    list_sandboxes,
    open_sandbox,
    register_sandbox,
)


def test_limits_validate_with_messages_that_name_the_field():
    assert SandboxLimits().network is False
    with pytest.raises(ConfigError, match="wall_time"):
        SandboxLimits(wall_time=0)
    with pytest.raises(ConfigError, match="memory"):
        SandboxLimits(memory=1024)
    with pytest.raises(ConfigError, match="processes"):
        SandboxLimits(processes=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="network"):
        SandboxLimits(network="yes")  # type: ignore[arg-type]
    assert SandboxLimits(cpu_time=2).to_dict()["cpu_time"] == 2


def test_exec_result_flags():
    result = ExecResult(exit_code=0, signal=None, stdout="x", stderr="", stderr_truncated=True)
    assert result.output_truncated and result.ok
    assert not ExecResult(exit_code=None, signal=9, stdout="", stderr="", timed_out=True).ok


def test_errors_keep_stdlib_bases():
    assert issubclass(SandboxError, AgentRLError) and issubclass(SandboxError, RuntimeError)
    assert issubclass(SandboxNotFoundError, LookupError)
    assert issubclass(SandboxFileError, OSError)


def test_local_backend_is_found_through_its_entry_point():
    assert "local" in list_sandboxes()
    sandbox = open_sandbox("local", SandboxLimits(wall_time=3))
    assert isinstance(sandbox, Sandbox) and sandbox.name == "local" and sandbox.limits.wall_time == 3


def test_unknown_backend_suggests_close_names_and_how_to_install():
    with pytest.raises(SandboxNotFoundError, match=r"Did you mean 'local'.*pip install"):
        open_sandbox("locall")


def test_register_sandbox_in_process():
    class Fake(Sandbox):
        name = "fake-test"

        async def exec(self, program, *, stdin=None, files=None, timeout=None):
            return ExecResult(0, None, "", "")

        async def write_file(self, path, data, *, executable=False):
            pass

        async def read_file(self, path):
            return b""

        async def close(self):
            pass

    from agentrl import sandbox as module

    try:
        register_sandbox("fake-test", Fake)
        with pytest.raises(ConfigError, match="override=True"):
            register_sandbox("fake-test", Fake)
        assert isinstance(open_sandbox("fake-test"), Fake)
        register_sandbox("fake-test", lambda limits=None: object(), override=True)
        with pytest.raises(PluginError, match="not an agentrl Sandbox"):
            open_sandbox("fake-test")
        register_sandbox("fake-test", "no_such_module_xyz:Thing", override=True)
        with pytest.raises(PluginError, match="failed to load"):
            open_sandbox("fake-test")
    finally:
        module._REGISTRY.pop("fake-test", None)


def test_import_is_light():
    code = (
        "import sys, json; import agentrl.sandbox; "
        "print(json.dumps(sorted(m for m in ('docker', 'torch', 'agentrl_sandboxes', 'httpx') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []
