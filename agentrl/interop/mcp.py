"""Tools from MCP servers: :class:`MCPToolEnv` and the ``mcp:`` loader.

An :class:`MCPToolEnv` is a :class:`~agentrl.toolenv.ToolEnv` whose tools are the tools of one or more MCP
servers (stdio or streamable HTTP, through the ``mcp`` SDK). The servers are started (stdio) or connected
(HTTP) when the env is built, their tool schemas become the env's tools, and they are stopped when the env
closes. Every call goes to its server under the env's ``tool_timeout``; an error the server reports, a call
that times out and a server that died are all ``Error: ...`` tool messages the model reads, and a server
that died is started again on the next call to it.

The ``mcp:`` loader builds one from a config file, ``agentrl.make("mcp:path/to/env.yaml")``::

    servers:                     # or "mcpServers", the format MCP clients share
      calc: {command: python, args: [calc_server.py]}      # stdio; cwd defaults to this file's folder
      search: {url: http://127.0.0.1:8000/mcp}             # streamable HTTP
    tasks: tasks.jsonl           # or a list of {prompt, answer, id}; a path is relative to this file
    reward: exact                # exact | contains | "module:function" (task, answer) -> float | dict
    max_turns: 6                 # any other key is a ToolEnv argument (tool_timeout, system_prompt, ...)

Tasks and the outcome reward are the env's, not the servers' (MCP has neither): ``exact`` and ``contains``
score the final ``<answer>`` against the task's ``answer`` as the component ``"correct"`` (1 or 0), so
``agentrl eval --pass-on correct`` reads them. Keyword arguments to ``make`` override the file's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.core import ResetResult, _LoopThread
from agentrl.errors import ConfigError, EnvServerError, MissingDependencyError
from agentrl.threads import in_thread
from agentrl.toolenv import Task, ToolEnv
from agentrl.tools import Tool

__all__ = ["MCPServer", "MCPToolEnv", "load_mcp_env"]

_INSTALL = "install the MCP SDK with `pip install 'agentrl[interop]'`"


@dataclass(frozen=True)
class MCPServer:
    """How to reach one MCP server.

    Attributes:
        name: The server's name in the config (prefixes its tools when ``tool_prefix`` is on).
        command: The program that runs a stdio server (with ``args``, ``env``, ``cwd``).
        url: The endpoint of a streamable HTTP server; exactly one of ``command`` and ``url`` is set.
    """

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ConfigError(f"MCP server {self.name!r}: give either 'command' (stdio) or 'url' (streamable HTTP)")

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any], base: Path | None = None) -> MCPServer:
        """One entry of a ``servers`` mapping; a relative ``cwd`` (default: ``base``) is taken from ``base``."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"MCP server {name!r}: expected a mapping with 'command' or 'url', got {entry!r:.80}")
        known = {"command", "args", "env", "cwd", "url", "type", "transport"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"MCP server {name!r}: unknown key(s) {unknown}; a server takes {sorted(known)}")
        cwd = entry.get("cwd")
        if base is not None and entry.get("command") is not None:
            cwd = str(base / cwd) if cwd else str(base)
        env = entry.get("env")
        return cls(name, entry.get("command"), tuple(str(a) for a in entry.get("args", ())),
                   {str(k): str(v) for k, v in env.items()} if env else None, cwd, entry.get("url"))  # fmt: skip


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    """An attribute under its v2 (snake_case) or v1 (camelCase) name of the ``mcp`` SDK."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def _transport(server: MCPServer) -> Any:
    try:
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client
        from mcp.client.streamable_http import streamable_http_client
    except ImportError as exc:
        raise MissingDependencyError(f"MCP tools need the `mcp` package ({exc}); {_INSTALL}") from None
    if server.url is not None:
        return streamable_http_client(server.url)
    params = StdioServerParameters(command=server.command or "", args=list(server.args),
                                   env=dict(server.env) if server.env else None, cwd=server.cwd)  # fmt: skip
    return stdio_client(params)


def _describe(exc: BaseException) -> str:
    """One line for an error, unwrapping the exception groups anyio raises."""
    while getattr(exc, "exceptions", None):  # an ExceptionGroup (Python 3.11+, or the backport)
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ToolError(Exception):
    """The server answered the call with ``isError``: its text is the observation."""


class _Link:
    """One server's session, owned by one task on the connections' loop (anyio contexts must be left by the
    task that entered them)."""

    def __init__(self, server: MCPServer):
        self.server = server
        self.session: Any = None
        self.tools: list[Any] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def own(self, ready: asyncio.Future[None]) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = await stack.enter_async_context(_transport(self.server))
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                self.tools = await _list_tools(session)
                self.session = session
                ready.set_result(None)
                await self.stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            self.session = None


async def _list_tools(session: Any) -> list[Any]:
    from mcp import types

    tools, cursor = [], None
    while True:
        params: Any = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += page.tools
        cursor = _field(page, "next_cursor", "nextCursor")
        if not cursor:
            return tools


def _result_text(result: Any) -> str:
    """A ``CallToolResult`` as the text the model reads; raises :class:`ToolError` when it is an error."""
    parts = []
    for block in _field(result, "content", default=[]) or []:
        kind = _field(block, "type", default="")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(_field(block, "resource"), "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind or 'unknown'} content]")
    structured = _field(result, "structured_content", "structuredContent")
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    text = "\n".join(parts)
    if _field(result, "is_error", "isError", default=False):
        raise ToolError(text or "the server reported an error without a message")
    return text


_LISTED: dict[str, dict[str, list[Any]]] = {}
"""Tool listings by server config: the runner builds an env per episode slot from inside its event loop,
and only the first needs to block on starting servers to learn its tools; the others start theirs at reset,
without blocking the loop."""


class MCPConnections:
    """Sessions with MCP servers, kept on a private event loop in a daemon thread.

    The sessions live on their own loop so that the env can be built synchronously (its tool schemas are
    needed at once) and then called from whichever loop runs its episodes.

    Raises:
        EnvServerError: a server did not start or answer within ``startup_timeout`` seconds (its name and
            the cause in the message).
    """

    def __init__(self, servers: Sequence[MCPServer], *, startup_timeout: float = 30.0):
        names = [s.name for s in servers]
        if not servers or len(set(names)) != len(names):
            raise ConfigError(f"give at least one MCP server, each under its own name; got {names}")
        self.startup_timeout = startup_timeout
        self.links = {s.name: _Link(s) for s in servers}
        self._thread: _LoopThread | None = _LoopThread()
        key = repr(servers)
        if key in _LISTED:  # these servers were listed before: start them at the first reset, not here
            for link in self.links.values():
                link.tools = _LISTED[key][link.server.name]
            return
        try:
            self._thread.run(self._start_all())
        except BaseException:
            self.close()
            raise
        _LISTED[key] = {name: link.tools for name, link in self.links.items()}

    async def _start_all(self) -> None:
        for link in self.links.values():
            await self._start(link)

    async def _start(self, link: _Link) -> None:
        if link.task is not None and not link.task.done():  # the dead session's task is still tearing down
            link.stop.set()
            await asyncio.wait([link.task], timeout=10.0)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.stop = asyncio.Event()
        link.task = asyncio.create_task(link.own(ready))
        where = link.server.url or " ".join([link.server.command or "", *link.server.args])
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.startup_timeout)
        except asyncio.TimeoutError:
            link.task.cancel()
            raise EnvServerError(f"MCP server {link.server.name!r} ({where}) did not answer within "
                                 f"{self.startup_timeout:g} s; check that it starts by hand") from None  # fmt: skip
        except Exception as exc:
            raise EnvServerError(f"MCP server {link.server.name!r} ({where}) could not be started or reached: "
                                 f"{_describe(exc)}") from None  # fmt: skip

    async def ensure(self) -> None:
        """Start again every server that died, from any event loop (an env does it at each reset).

        Raises:
            EnvServerError: a server cannot be started again.
        """
        if self._thread is None:
            raise RuntimeError("the MCP connections are closed")
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._ensure_all(), self._thread.loop))

    async def _ensure_all(self) -> None:
        for link in self.links.values():
            if link.session is None:
                await self._start(link)

    async def call(self, server: str, tool: str, arguments: Mapping[str, Any]) -> str:
        """Call ``tool`` on ``server`` from any event loop; the reply's text.

        Raises:
            Exception: the server's error text, or a disconnect; the env turns either into ``Error: ...``.
        """
        if self._thread is None:
            raise RuntimeError("the MCP connections are closed")
        future = asyncio.run_coroutine_threadsafe(self._call(server, tool, dict(arguments)), self._thread.loop)
        return await asyncio.wrap_future(future)

    async def _call(self, server: str, tool: str, arguments: dict[str, Any]) -> str:
        link = self.links[server]
        if link.session is None:  # it died since the last call: start it again
            await self._start(link)
        try:
            return _result_text(await link.session.call_tool(tool, arguments))
        except ToolError:
            raise
        except Exception as exc:
            if await self._alive(link):
                raise
            link.session = None
            link.stop.set()
            raise EnvServerError(f"MCP server {server!r} disconnected ({_describe(exc)}); "
                                 "it is started again on the next call") from None  # fmt: skip

    @staticmethod
    async def _alive(link: _Link) -> bool:
        try:
            await asyncio.wait_for(link.session.send_ping(), 5.0)
            return True
        except Exception:
            return False

    async def _stop_all(self) -> None:
        for link in self.links.values():
            link.stop.set()
        tasks = [link.task for link in self.links.values() if link.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)

    def close(self) -> None:
        """Stop every server (stdio processes end) and the loop. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(Exception):
            thread.run(self._stop_all())
        thread.stop()


def _tool(connections: MCPConnections, server: str, listed: Any, name: str) -> Tool:
    remote = listed.name

    async def call(**arguments: Any) -> str:
        return await connections.call(server, remote, arguments)

    schema = dict(_field(listed, "input_schema", "inputSchema", default=None) or {})
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return Tool(name, _field(listed, "description", default="") or "", schema, fn=call)


class MCPToolEnv(ToolEnv):
    """A :class:`~agentrl.toolenv.ToolEnv` whose tools come from MCP servers.

    Args:
        servers: The servers (:class:`MCPServer` or ``{name: {command|url: ...}}``); started now, stopped on
            ``close``.
        tasks, reward: As for :class:`~agentrl.toolenv.ToolEnv`.
        tool_prefix: Name tools ``<server>__<tool>`` (needed when two servers offer the same name).
        startup_timeout: Seconds a server may take to start and list its tools.
        **kwargs: Any other :class:`~agentrl.toolenv.ToolEnv` argument (``tool_timeout``, ``max_turns``, ...).

    Raises:
        EnvServerError: A server did not start or answer. ConfigError: clashing tool names, bad settings.
    """

    def __init__(
        self,
        servers: Sequence[MCPServer] | Mapping[str, Mapping[str, Any]],
        tasks: Sequence[Any] | Callable[..., Task],
        reward: Callable[[Any, Any], Any],
        *,
        tool_prefix: bool = False,
        startup_timeout: float = 30.0,
        **kwargs: Any,
    ):
        if isinstance(servers, Mapping):
            servers = [MCPServer.from_config(name, entry) for name, entry in servers.items()]
        self.connections = MCPConnections(list(servers), startup_timeout=startup_timeout)
        try:
            tools = [
                _tool(self.connections, name, listed, f"{name}__{listed.name}" if tool_prefix else listed.name)
                for name, link in self.connections.links.items()
                for listed in link.tools
            ]
            kwargs.setdefault("description", f"Tools from MCP servers {', '.join(self.connections.links)}")
            super().__init__(tools, tasks, reward, **kwargs)
        except ConfigError as exc:
            self.connections.close()
            hint = " (two servers offer the same tool name: set tool_prefix: true)" if "unique" in str(exc) else ""
            raise ConfigError(f"{exc}{hint}") from None
        except BaseException:
            self.connections.close()
            raise
        weakref.finalize(self, self.connections.close)

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await self.connections.ensure()  # a server that died last episode starts again, outside any tool timeout
        return await super().areset(seed=seed, options=options)

    async def aprobe(self) -> None:
        """Start every server that is not running; raises :class:`EnvServerError` naming one that cannot."""
        await self.connections.ensure()

    async def aclose(self) -> None:
        await in_thread("closing MCP servers", self.connections.close)
        await super().aclose()


# ---- the ``mcp:`` loader ---------------------------------------------------------------------------
def _normalized(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().casefold()


def exact_reward(task: Task, answer: str) -> dict[str, float]:
    """1 when the answer equals the task's answer (case and runs of whitespace ignored)."""
    return {"correct": float(_normalized(answer) == _normalized(task.answer))}


def contains_reward(task: Task, answer: str) -> dict[str, float]:
    """1 when the task's answer appears in the answer (case and runs of whitespace ignored)."""
    return {"correct": float(bool(_normalized(task.answer)) and _normalized(task.answer) in _normalized(answer))}


REWARDS: dict[str, Callable[[Task, str], dict[str, float]]] = {"exact": exact_reward, "contains": contains_reward}


def _reward(value: Any) -> Callable[[Any, Any], Any]:
    from agentrl._plugins import load_object

    if callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str) and value in REWARDS:
        return REWARDS[value]
    if isinstance(value, str) and ":" in value:
        return load_object(value, "MCP env reward")
    raise ConfigError(f"reward {value!r}: use {' or '.join(map(repr, REWARDS))}, or 'module:function' "
                      "taking (task, answer) and returning a float or a dict of floats")  # fmt: skip


def _tasks(value: Any, base: Path) -> Any:
    if not isinstance(value, (str, Path)):
        return value
    path = base / value
    if not path.is_file():
        raise ConfigError(f"tasks file {str(path)!r} does not exist; give a JSONL/JSON/YAML file or a list of tasks")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return _load_text(text, path)


def _load_text(text: str, path: Path) -> Any:
    if path.suffix == ".json":
        return json.loads(text)
    from agentrl import _yaml

    return _yaml.load(text)


def load_mcp_env(target: str, **overrides: Any) -> MCPToolEnv:
    """The ``mcp:`` loader: an :class:`MCPToolEnv` from a YAML or JSON config file (see the module doc).

    Raises:
        ConfigError: the file is missing or malformed (naming the key). EnvServerError: a server did not start.
    """
    path = Path(target).expanduser()
    if not path.is_file():
        raise ConfigError(f"mcp:{target}: no such config file; write a YAML or JSON file with 'servers', "
                          "'tasks' and 'reward' (see agentrl.interop.mcp)")  # fmt: skip
    config = _load_text(path.read_text(), path)
    if not isinstance(config, Mapping):
        raise ConfigError(f"mcp:{target}: expected a mapping with 'servers', 'tasks' and 'reward'")
    config = {**config, **overrides}
    servers = config.pop("servers", None) or config.pop("mcpServers", None)
    if not isinstance(servers, Mapping) or not servers:
        raise ConfigError(f"mcp:{target}: 'servers' must map names to {{command: ...}} or {{url: ...}}")
    if "tasks" not in config:
        raise ConfigError(f"mcp:{target}: 'tasks' is missing (a list of {{prompt, answer}} or a JSONL file)")
    base = path.resolve().parent
    built = [MCPServer.from_config(str(name), entry, base) for name, entry in servers.items()]
    tasks = _tasks(config.pop("tasks"), base)
    reward = _reward(config.pop("reward", "exact"))
    return MCPToolEnv(built, tasks, reward, **config)

