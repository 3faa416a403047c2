"""``agentrl serve <env-id>``: any agentrl env as an OpenEnv server.

The server speaks OpenEnv's wire protocol, so OpenEnv's own clients (``GenericEnvClient``, TRL's and SkyRL's
OpenEnv integrations) and :class:`agentrl.interop.openenv.OpenEnvEnv` train and evaluate on it:

- ``WS /ws``: one session per connection, each with its own env instance (up to ``max_sessions`` at once).
  Messages ``{"type": "reset", "data": {"seed": 3, ...options}}``, ``{"type": "step", "data": {"message":
  "<assistant text>"}}``, ``{"type": "state"}``, ``{"type": "close"}``; answers ``{"type": "observation",
  "data": {"observation", "reward", "done", "metadata"}}``, ``{"type": "state", ...}`` or ``{"type": "error",
  "data": {"message", "code"}}``.
- ``GET /health``, ``/metadata``, ``/schema``; ``POST /reset`` (a stateless preview of an opening, as
  OpenEnv's HTTP routes are stateless); ``GET /agentrl``: the env id, tool schemas and turn limit.

An observation is ``{"messages": [...new chat messages], "tools": [...schemas], "info": {...}}``. ``reward``
is the step's total; ``metadata["reward_components"]`` its named parts, ``metadata["terminated"]`` and
``["truncated"]`` Gymnasium's two endings (``done`` is either). Reset keys other than ``seed`` and
``episode_id`` are the env's reset ``options`` (``{"task_index": 3}`` for code-sandbox).

Grading stays on the server: a client sends only the assistant's text, and every reward is computed by the
env in this process (for code-sandbox, hidden tests run in its sandbox), so a client cannot forge one.
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations (WebSocket, Body)
# at runtime, and those classes are imported inside create_app.

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Mapping
from typing import Any

from agentrl.errors import MissingDependencyError

__all__ = ["create_app", "jsonable", "serve"]

_INSTALL = "`agentrl serve` needs fastapi and uvicorn: `pip install 'agentrl[interop]'`"
ACTION_KEY = "message"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: numpy scalars and arrays as numbers and lists, dataclasses as dicts,
    anything else as its ``str``."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        if isinstance(obj, Mapping):
            return dict(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=default, ensure_ascii=False))


def _payload(observation: list[Any], info: Mapping[str, Any], tools: Any, reward: float | None,
             terminated: bool, truncated: bool) -> dict[str, Any]:  # fmt: skip
    metadata = {
        "reward_components": dict(info.get("reward_components", {})),
        "terminated": terminated,
        "truncated": truncated,
    }
    body = {"messages": list(observation), "tools": tools, "info": dict(info), "metadata": metadata}
    return jsonable({"observation": body, "reward": reward, "done": terminated or truncated, "metadata": metadata})


def _error(message: str, code: str) -> str:
    return json.dumps({"type": "error", "data": {"message": message, "code": code}})


class _Session:
    """One WebSocket's env and episode."""

    def __init__(self, env: Any):
        self.env = env
        self.episode_id: str | None = None
        self.step_count = 0
        self.done = True
        self.task_id: Any = None

    async def reset(self, data: Mapping[str, Any]) -> dict[str, Any]:
        seed = data.get("seed")
        options = {k: v for k, v in data.items() if k not in ("seed", "episode_id")}
        observation, info = await self.env.areset(seed=seed, options=options or None)
        self.episode_id = str(data.get("episode_id") or uuid.uuid4().hex)
        self.step_count, self.done, self.task_id = 0, False, info.get("task_id")
        return _payload(observation, info, info.get("tools", self.env.tool_schemas()), None, False, False)

    async def step(self, data: Mapping[str, Any]) -> dict[str, Any]:
        action = data.get(ACTION_KEY)
        if not isinstance(action, str):
            raise ValueError(f"a step's data must hold the assistant's text under {ACTION_KEY!r}, got {dict(data)!r:.120}")
        if self.done:
            raise RuntimeError("the episode is over; send a reset first")
        result = await self.env.astep(action)
        self.step_count += 1
        self.done = bool(result.terminated or result.truncated)
        return _payload(result.observation, result.info, None, float(result.reward), bool(result.terminated),
                        bool(result.truncated))  # fmt: skip

    def state(self, env_id: str) -> dict[str, Any]:
        return jsonable({"episode_id": self.episode_id, "step_count": self.step_count, "env_id": env_id,
                         "task_id": self.task_id, "done": self.done})  # fmt: skip


async def _run_session(websocket: Any, env_id: str, env_kwargs: Mapping[str, Any], slots: asyncio.Semaphore,
                       idle_timeout: float | None) -> None:  # fmt: skip
    import agentrl
    from agentrl.threads import in_thread

    await websocket.accept()
    if slots.locked():
        await websocket.send_text(_error("the server is at its session limit; retry later", "CAPACITY_REACHED"))
        # Close only after the client's first message (or a pause): a close that races the client's request
        # can drop the reason before the client reads it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.receive_text(), 5.0)
        await websocket.close()
        return
    async with slots:
        try:
            env = await in_thread(f"making {env_id}", agentrl.make, env_id, **dict(env_kwargs))
        except Exception as exc:
            await websocket.send_text(_error(f"cannot make {env_id}: {type(exc).__name__}: {exc}", "FACTORY_ERROR"))
            await websocket.close()
            return
        try:
            await _serve_messages(websocket, _Session(env), env_id, idle_timeout)
        finally:
            await env.aclose()


async def _serve_messages(websocket: Any, session: _Session, env_id: str, idle_timeout: float | None) -> None:
    from starlette.websockets import WebSocketDisconnect

    while True:
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), idle_timeout)
        except (WebSocketDisconnect, asyncio.TimeoutError):
            return
        try:
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
        except (ValueError, AttributeError) as exc:
            await websocket.send_text(_error(f"invalid JSON message: {exc}", "INVALID_JSON"))
            continue
        try:
            if kind == "reset":
                reply: dict[str, Any] = {"type": "observation", "data": await session.reset(data)}
            elif kind == "step":
                reply = {"type": "observation", "data": await session.step(data)}
            elif kind == "state":
                reply = {"type": "state", "data": session.state(env_id)}
            elif kind == "close":
                await websocket.close()
                return
            else:
                await websocket.send_text(_error(f"unknown message type {kind!r}; use reset, step, state or close",
                                                 "UNKNOWN_TYPE"))  # fmt: skip
                continue
        except ValueError as exc:
            await websocket.send_text(_error(str(exc), "VALIDATION_ERROR"))
            continue
        except Exception as exc:
            await websocket.send_text(_error(f"{type(exc).__name__}: {exc}", "EXECUTION_ERROR"))
            continue
        await websocket.send_text(json.dumps(reply, ensure_ascii=False))


def _schemas() -> dict[str, Any]:
    action = {"type": "object", "properties": {ACTION_KEY: {"type": "string", "description": "the assistant's text"},
              "metadata": {"type": "object"}}, "required": [ACTION_KEY]}  # fmt: skip
    observation = {"type": "object", "properties": {
        "messages": {"type": "array", "items": {"type": "object"}, "description": "new chat messages"},
        "tools": {"type": ["array", "null"]}, "info": {"type": "object"}, "metadata": {"type": "object"},
        "done": {"type": "boolean"}, "reward": {"type": ["number", "null"]}}}  # fmt: skip
    state = {"type": "object", "properties": {"episode_id": {"type": ["string", "null"]},
             "step_count": {"type": "integer"}}}  # fmt: skip
    return {"action": action, "observation": observation, "state": state}


def create_app(env_id: str, env_kwargs: Mapping[str, Any] | None = None, *, max_sessions: int = 64,
               idle_timeout: float | None = 600.0) -> Any:  # fmt: skip
    """A FastAPI app serving ``env_id`` over OpenEnv's protocol (see the module doc).

    Args:
        env_kwargs: keyword arguments for ``agentrl.make`` of every session's env.
        max_sessions: WebSocket sessions at once; one more is refused with ``CAPACITY_REACHED``.
        idle_timeout: seconds a session may wait for its next message before the server closes it.

    Raises:
        MissingDependencyError: fastapi is not installed. EnvNotFoundError: unknown ``env_id``.
    """
    try:
        from fastapi import Body, FastAPI, WebSocket
    except ImportError:
        raise MissingDependencyError(_INSTALL) from None
    import agentrl
    from agentrl.threads import in_thread

    kwargs = dict(env_kwargs or {})
    probe = agentrl.make(env_id, **kwargs)  # fails now, with a did-you-mean, rather than on every session
    about = jsonable({"env_id": env_id, "description": probe.description, "tools": probe.tool_schemas(),
                      "max_turns": probe.max_turns, "action_key": ACTION_KEY})  # fmt: skip
    probe.close()
    slots = asyncio.Semaphore(max_sessions)
    app = FastAPI(title=f"agentrl {env_id}", description=f"{env_id} served over OpenEnv's protocol")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {"name": env_id, "description": about["description"] or env_id, "readme_content": None,
                "version": agentrl.__version__, "author": None, "documentation_url": None}  # fmt: skip

    @app.get("/schema")
    async def schema() -> dict[str, Any]:
        return _schemas()

    @app.get("/agentrl")
    async def agentrl_about() -> dict[str, Any]:
        return about

    @app.get("/state")
    async def state() -> dict[str, Any]:
        return {"episode_id": None, "step_count": 0}

    @app.post("/reset")
    async def reset(body: dict[str, Any] = Body(default_factory=dict)) -> dict[str, Any]:  # noqa: B008
        env = await in_thread(f"making {env_id}", agentrl.make, env_id, **kwargs)
        try:
            return await _Session(env).reset(body)
        finally:
            await env.aclose()

    @app.websocket("/ws")
    async def session(websocket: WebSocket) -> None:
        await _run_session(websocket, env_id, kwargs, slots, idle_timeout)

    return app


def serve(env_id: str, env_kwargs: Mapping[str, Any] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          max_sessions: int = 64, idle_timeout: float | None = 600.0) -> None:  # fmt: skip
    """Serve ``env_id`` until interrupted (uvicorn). See :func:`create_app`."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError(_INSTALL) from None
    app = create_app(env_id, env_kwargs, max_sessions=max_sessions, idle_timeout=idle_timeout)
    # The standard asyncio loop, not uvloop: uvloop's subprocesses take no user/group, which sandboxes set.
    uvicorn.run(app, host=host, port=port, log_level="warning", ws_max_size=64 * 2**20, loop="asyncio")
