"""MCP tools: a real MCP server (written with the ``mcp`` SDK) over stdio and streamable HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("mcp")

import agentrl
from agentrl.errors import ConfigError, EnvServerError
from agentrl.interop.mcp import MCPServer, MCPToolEnv, exact_reward

# A calculator server; works with the SDK's v2 (MCPServer) and v1 (FastMCP) names.
SERVER = textwrap.dedent(
    """
    import asyncio, os, sys
    try:
        from mcp.server.mcpserver import MCPServer as Server
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:
        from mcp.server.fastmcp import FastMCP as Server
        from mcp.server.fastmcp.exceptions import ToolError

    server = Server("calc")

    @server.tool()
    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.\"\"\"
        return a + b

    @server.tool()
    def divide(a: float, b: float) -> float:
        \"\"\"Divide a by b.\"\"\"
        if b == 0:
            raise ToolError("division by zero")
        return a / b

    @server.tool()
    async def sleep(seconds: float) -> str:
        \"\"\"Sleep, then say so.\"\"\"
        await asyncio.sleep(seconds)
        return "slept"

    @server.tool()
    def crash() -> str:
        \"\"\"End the server process.\"\"\"
        os._exit(3)

    @server.tool()
    def pid() -> int:
        \"\"\"The server's process id.\"\"\"
        return os.getpid()

    if __name__ == "__main__":
        if len(sys.argv) > 1:
            port = int(sys.argv[1])
            try:
                server.run(transport="streamable-http", host="127.0.0.1", port=port)
            except TypeError:  # v1 takes host and port in settings
                server.settings.host, server.settings.port = "127.0.0.1", port
                server.run(transport="streamable-http")
        else:
            server.run()
    """
)

TASKS = [{"prompt": "What is 17 + 25?", "answer": "42", "id": "add"}]


def _call(name: str, **arguments: object) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


@pytest.fixture()
def server_file(tmp_path):
    path = tmp_path / "calc_server.py"
    path.write_text(SERVER)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def http_server(server_file):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(server_file), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


def _stdio(server_file) -> MCPServer:
    return MCPServer("calc", command=sys.executable, args=(str(server_file),))


def _play(env: MCPToolEnv, actions: list[str]) -> list:
    env.reset(seed=0)
    return [env.step(a) for a in actions]


def test_stdio_tools_come_from_the_server_and_an_episode_scores(server_file):
    env = MCPToolEnv([_stdio(server_file)], TASKS, exact_reward, tool_timeout=5)
    try:
        names = {t["function"]["name"] for t in env.tools}
        assert {"add", "divide", "sleep", "crash"} <= names
        add = next(t for t in env.tools if t["function"]["name"] == "add")["function"]
        assert set(add["parameters"]["properties"]) == {"a", "b"} and add["description"] == "Add two integers."
        first, last = _play(env, [_call("add", a=17, b=25), "<answer>42</answer>"])
        assert first.observation[0]["role"] == "tool" and first.observation[0]["content"].strip() == "42"
        assert last.terminated and last.info["reward_components"] == {"correct": pytest.approx(1.0)}
    finally:
        env.close()


def test_server_errors_timeouts_and_disconnects_are_observations(server_file):
    env = MCPToolEnv([_stdio(server_file)], TASKS, exact_reward, tool_timeout=1.0)
    try:
        env.reset(seed=0)
        error = env.step(_call("divide", a=1, b=0)).observation[0]["content"]
        assert error.startswith("Error: ") and "division by zero" in error
        late = env.step(_call("sleep", seconds=5)).observation[0]["content"]
        assert late.startswith("Error: ") and "did not finish within 1 s" in late
        before = env.step(_call("pid")).observation[0]["content"]
        assert before.isdigit()
        gone = env.step(_call("crash")).observation[0]["content"]
        assert gone.startswith("Error: "), gone
        env.reset(seed=0)
        again = env.step(_call("pid")).observation[0]["content"]  # the server was started again
        assert again.isdigit() and again != before, (gone, again)
    finally:
        env.close()


def test_streamable_http_server(http_server):
    env = MCPToolEnv({"calc": {"url": http_server}}, TASKS, exact_reward, tool_timeout=5, tool_prefix=True)
    try:
        assert "calc__add" in {t["function"]["name"] for t in env.tools}
        first, last = _play(env, [_call("calc__add", a=2, b=3), "<answer>41</answer>"])
        assert first.observation[0]["content"].strip() == "5"
        assert last.info["reward_components"] == {"correct": pytest.approx(0.0)}
    finally:
        env.close()


def test_close_stops_stdio_servers(server_file):
    env = MCPToolEnv([_stdio(server_file)], TASKS, exact_reward)
    env.reset(seed=0)
    pid = int(env.step(_call("pid")).observation[0]["content"])
    env.close()
    env.close()  # idempotent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_loader_reads_a_config_file_with_tasks_and_reward(server_file, tmp_path):
    (tmp_path / "tasks.jsonl").write_text(json.dumps(TASKS[0]) + "\n")
    config = tmp_path / "env.yaml"
    config.write_text(
        f"mcpServers:\n  calc: {{command: {sys.executable}, args: [calc_server.py]}}\n"
        "tasks: tasks.jsonl\nreward: contains\nmax_turns: 3\n"
    )
    env = agentrl.make(f"mcp:{config}", tool_timeout=4)
    try:
        assert env.max_turns == 3 and env.tool_timeout == pytest.approx(4)
        env.reset(seed=0, options={"task": "add"})
        assert env.step("<answer>it is 42</answer>").info["reward_components"]["correct"] == pytest.approx(1.0)
    finally:
        env.close()
    from agentrl.checker import check_env

    env = agentrl.make(f"mcp:{config}")
    try:
        assert check_env(env)
    finally:
        env.close()


def test_bad_configs_name_the_problem(tmp_path, server_file):
    with pytest.raises(ConfigError, match="no such config file"):
        agentrl.make(f"mcp:{tmp_path / 'missing.yaml'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: {x: {command: /nonexistent/program}}\ntasks: [hi]\n")
    with pytest.raises(EnvServerError, match="'x'"):
        agentrl.make(f"mcp:{bad}", startup_timeout=10)
    twice = [_stdio(server_file), MCPServer("calc2", command=sys.executable, args=(str(server_file),))]
    with pytest.raises(ConfigError, match="tool_prefix"):
        MCPToolEnv(twice, TASKS, exact_reward)


def test_the_readme_example_config_plays_its_demonstrations_to_full_reward():
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "examples" / "mcp_calc" / "env.yaml"
    env = agentrl.make(f"mcp:{config}")
    try:
        for task in env.tasks:
            env.reset(options={"task": task.id})
            results = [env.step(action) for action in task.demonstration]
            tool_results = [m["content"] for r in results for m in r.observation if m["role"] == "tool"]
            assert tool_results and not any(c.startswith("Error") for c in tool_results), tool_results
            assert results[-1].terminated and results[-1].info["reward_components"]["correct"] == pytest.approx(1.0)
    finally:
        env.close()
