"""``OpenEnvEnv``: an agentrl env that drives an OpenEnv server, and the ``openenv:`` loader.

``agentrl.make("openenv:http://127.0.0.1:8000")`` connects to a running OpenEnv server (one built with
OpenEnv's own package, or ``agentrl serve``). Each env instance holds one WebSocket session (``/ws``), so
the server keeps one environment per session and the runner's concurrent episode slots are concurrent
sessions (the server's ``max_concurrent_envs`` caps them).

Mapping to the Env contract:

- **action**: the assistant's text, sent as ``{action_key: text}`` (``"message"`` by default; OpenEnv's
  echo and chat envs use it; set ``action_key`` for an env whose action field has another name).
- **observation**: the server's ``observation["messages"]`` when it sends chat messages (``agentrl serve``
  does); otherwise the ``observation_key`` field (or the whole observation as JSON) as one user message.
- **reward**: the server's ``reward`` (None is 0). Its named parts are ``metadata["reward_components"]``
  when the server sends them (``agentrl serve`` does); otherwise one component, ``"openenv"``.
- **endings**: ``done`` is ``terminated``, unless the server's metadata names ``terminated`` / ``truncated``.
- **reset**: ``seed`` and the reset ``options`` go to the server's reset as keyword arguments.

A connection that fails or closes mid-episode raises :class:`~agentrl.errors.EnvServerError` from
``reset``/``step``: the runner records that episode as an error and builds a new env (a new session).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, EnvServerError, MissingDependencyError
from agentrl.types import Message

__all__ = ["OpenEnvEnv", "load_openenv"]

_ROLES = ("system", "user", "assistant", "tool")


def _ws_url(base_url: str) -> str:
    if base_url.startswith(("ws://", "wss://")):
        return base_url if base_url.rstrip("/").endswith("/ws") else base_url.rstrip("/") + "/ws"
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"OpenEnv server address {base_url!r} must start with http://, https://, ws:// or wss://")
    return "ws" + base_url.rstrip("/")[4:] + "/ws"


def _http_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    url = url[: -len("/ws")] if url.endswith("/ws") else url
    return "http" + url[2:] if url.startswith("ws") else url


def observation_messages(observation: Mapping[str, Any], key: str | None = None) -> list[Message]:
    """The chat messages an OpenEnv observation stands for (see the module doc)."""
    messages = observation.get("messages")
    if isinstance(messages, list) and all(
        isinstance(m, Mapping) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        return [dict(m) for m in messages]  # type: ignore[misc]
    if key is not None:
        if key not in observation:
            raise EnvServerError(f"the OpenEnv observation has no {key!r} field (it has {sorted(observation)}); "
                                 "set observation_key to one of them")  # fmt: skip
        value = observation[key]
        return [{"role": "user", "content": value if isinstance(value, str) else json.dumps(value)}]
    rest = {k: v for k, v in observation.items() if k not in ("metadata", "done", "reward")}
    return [{"role": "user", "content": json.dumps(rest, ensure_ascii=False, sort_keys=True)}]


class OpenEnvEnv(Env):
    """An env played on an OpenEnv server over its WebSocket protocol (see the module doc).

    Args:
        base_url: The server, ``http://host:port`` (or its ``ws://.../ws`` address).
        action_key: The action field that carries the assistant's text.
        observation_key: The observation field shown to the model when the server sends no chat messages.
        system_prompt: A system message put before the server's first observation, if it sends none.
        reset_kwargs: Extra keyword arguments for every reset (e.g. a difficulty).
        max_turns: The turn limit as the env reports it (``agentrl serve`` announces its env's).
        message_timeout: Seconds to wait for one answer of the server.
        capacity_wait: Seconds a reset keeps retrying (with backoff) while the server is at its session limit.
        description: One line for ``agentrl envs``.

    Raises:
        ConfigError: a malformed address. EnvServerError: the server does not answer ``/health``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        action_key: str = "message",
        observation_key: str | None = None,
        system_prompt: str | None = None,
        reset_kwargs: Mapping[str, Any] | None = None,
        max_turns: int | None = None,
        message_timeout: float = 120.0,
        capacity_wait: float = 120.0,
        description: str | None = None,
    ):
        self.base_url, self.ws_url = _http_url(base_url), _ws_url(base_url)
        self.action_key, self.observation_key, self.system_prompt = action_key, observation_key, system_prompt
        self.reset_kwargs, self.message_timeout = dict(reset_kwargs or {}), message_timeout
        self.capacity_wait = capacity_wait
        about = self._about()
        self.tools = tuple(about.get("tools") or ())
        self.max_turns = max_turns if max_turns is not None else about.get("max_turns")
        self.description = description or about.get("description") or f"OpenEnv server at {self.base_url}"
        self._ws: Any = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._done = True

    def _about(self) -> dict[str, Any]:
        """``/agentrl`` of an ``agentrl serve`` server, ``{}`` for another OpenEnv server; checks ``/health``."""
        import httpx

        try:
            httpx.get(f"{self.base_url}/health", timeout=10.0).raise_for_status()
            about = httpx.get(f"{self.base_url}/agentrl", timeout=10.0)
        except httpx.HTTPError as exc:
            raise EnvServerError(f"the OpenEnv server at {self.base_url} does not answer /health ({exc}); "
                                 "start it (e.g. `agentrl serve <env-id> --port ...`) or fix the address") from None  # fmt: skip
        return about.json() if about.status_code == 200 else {}

    # ---- the session ---------------------------------------------------------------------------------
    async def _connect(self) -> Any:
        try:
            from websockets.asyncio.client import connect
            from websockets.protocol import State
        except ImportError:
            raise MissingDependencyError("the OpenEnv client needs websockets: `pip install 'agentrl[interop]'`") from None
        loop = asyncio.get_running_loop()
        if self._ws is not None and self._ws_loop is loop and self._ws.state is State.OPEN:
            return self._ws
        # A socket the server closed, or one opened on another loop, cannot be used; its session is over.
        self._ws = None
        try:
            self._ws = await connect(self.ws_url, max_size=None, open_timeout=30)
        except Exception as exc:
            raise EnvServerError(f"cannot open a session at {self.ws_url}: {type(exc).__name__}: {exc}") from None
        self._ws_loop = loop
        return self._ws

    async def _request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        ws = await self._connect()
        try:
            try:
                await ws.send(json.dumps(message))
            except ConnectionClosed:
                pass  # a refused session (at capacity) sent its reason before closing: read it below
            reply = json.loads(await asyncio.wait_for(ws.recv(), self.message_timeout))
        except (asyncio.TimeoutError, TimeoutError):
            await self._drop()  # a late answer would pair with the next request
            raise EnvServerError(f"the OpenEnv server at {self.base_url} did not answer a {message['type']} "
                                 f"within {self.message_timeout:g} s") from None  # fmt: skip
        except Exception as exc:
            await self._drop()
            raise EnvServerError(f"the OpenEnv session at {self.ws_url} broke during a {message['type']}: "
                                 f"{type(exc).__name__}: {exc}") from None  # fmt: skip
        if reply.get("type") == "error":
            data = reply.get("data") or {}
            raise EnvServerError(f"the OpenEnv server refused a {message['type']}: {data.get('message')} "
                                 f"(code {data.get('code')})")  # fmt: skip
        return reply.get("data") or {}

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 5.0)
            except Exception:
                pass  # the session is gone either way

    # ---- the Env contract ----------------------------------------------------------------------------
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        data = {**self.reset_kwargs, **(options or {})}
        if seed is not None:
            data["seed"] = seed
        reply = await self._reset_when_admitted(data)
        observation = reply.get("observation") or {}
        messages = observation_messages(observation, self.observation_key)
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        self._done = bool(reply.get("done"))
        info = {k: v for k, v in (observation.get("info") or {}).items() if k != "tools"}
        info["tools"] = list(observation.get("tools") or self.tool_schemas())
        return ResetResult(messages, info)

    async def _reset_when_admitted(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """A reset, retried with backoff for up to ``capacity_wait`` seconds while the server is full."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.capacity_wait, 0.25
        while True:
            try:
                return await self._request({"type": "reset", "data": dict(data)})
            except EnvServerError as exc:
                if "CAPACITY_REACHED" not in str(exc) or loop.time() + pause > deadline:
                    raise
                await self._drop()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def astep(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("the episode is over; call reset() first")
        reply = await self._request({"type": "step", "data": {self.action_key: action}})
        observation = reply.get("observation") or {}
        metadata = {**(observation.get("metadata") or {}), **(reply.get("metadata") or {})}
        reward = float(reply.get("reward") or 0.0)
        components = metadata.get("reward_components")
        if not isinstance(components, Mapping) or abs(sum(components.values()) - reward) > 1e-6 * max(1, abs(reward)):
            components = {"openenv": reward} if reply.get("reward") is not None else {}
        done = bool(reply.get("done"))
        terminated = bool(metadata.get("terminated", done))
        truncated = bool(metadata.get("truncated", False)) and not terminated
        self._done = terminated or truncated or done
        info = dict(observation.get("info") or {})
        info["reward_components"] = {str(k): float(v) for k, v in components.items()}
        return StepResult(observation_messages(observation, self.observation_key), reward, terminated, truncated, info)

    async def astate(self) -> dict[str, Any]:
        """The server's ``state`` of this session (episode id, step count, env-specific fields)."""
        return await self._request({"type": "state"})

    async def aclose(self) -> None:
        ws = self._ws
        if ws is not None and self._ws_loop is asyncio.get_running_loop():
            try:
                await asyncio.wait_for(ws.send(json.dumps({"type": "close"})), 5.0)
            except Exception:
                pass
            await self._drop()
        self._ws = None
        await super().aclose()


def load_openenv(target: str, **kwargs: Any) -> OpenEnvEnv:
    """The ``openenv:`` loader: ``openenv:http://host:port`` (or ``openenv:host:port``)."""
    if "://" not in target:
        target = f"http://{target}"
    return OpenEnvEnv(target, **kwargs)
