"""One verifiers v1 environment served over stdio to agentrl (run by an interpreter that has verifiers>=0.4).

:mod:`agentrl.interop.verifiers_v1` starts this file as ``<python> _verifiers_v1_bridge.py '<spec JSON>'``.
It imports only the standard library, ``verifiers.v1`` and ``aiohttp`` (a dependency of verifiers), so the
interpreter needs no agentrl. verifiers runs the episode exactly as ``vf-eval`` does (``env.serving()``,
``env.run_slot``: the taskset's tasks, the harness program, tool servers, ``@stop`` checks, scoring). Its model
client points at a loopback chat-completions endpoint served here, which *parks* each model request until
agentrl's policy answers it through ``step``.

Protocol: one JSON object per line. The bridge first writes ``{"ok": true, "tasks": [...], ...}`` (or
``{"ok": false, "error": ...}`` and exits). Then, for each line read: ``{"op": "reset", "task": i}`` and
``{"op": "step", "content": str, "tool_calls": [...]}`` answer with an event: ``{"event": "request",
"messages": [...], "tools": [...]}`` (the next model call) or ``{"event": "done", ...}`` (the episode ended,
scored);
``{"op": "close"}`` ends the process. A failed op answers ``{"event": "error", "error": ...}``. Each event
echoes its op's ``"id"``; an op that arrives while another is in flight cancels that one (which then answers
nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from typing import Any

TRUNCATING = ("max_turns", "max_input_tokens", "max_output_tokens", "max_total_tokens")
CHAT_ROUTE = "/v1/chat/completions"
KEY_VAR = "AGENTRL_BRIDGE_KEY"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def wire_message(raw: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions request message in agentrl's plain form (text content, OpenAI tool calls)."""
    message: dict[str, Any] = {"role": raw["role"], "content": _text(raw.get("content"))}
    calls = [
        {"id": c.get("id", ""), "type": "function",
         "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
        for c in raw.get("tool_calls") or ()
    ]  # fmt: skip
    if calls:
        message["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if raw.get(key):
            message[key] = raw[key]
    return message


def completion(model: str, turn: int, content: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = "tool_calls" if tool_calls else "stop"
    return {"id": f"agentrl-{turn}", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]}  # fmt: skip


def stream_chunk(full: dict[str, Any]) -> dict[str, Any]:
    """The whole completion as one streamed chunk (the delta carries the message, tool calls indexed)."""
    choice = full["choices"][0]
    delta = dict(choice["message"])
    if "tool_calls" in delta:
        delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(delta["tool_calls"])]
    return {**full, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}]}  # fmt: skip


def outcome(episode: Any) -> dict[str, Any]:
    """The ``done`` event of a finished episode: its rewards by name (score x weight), metrics, the stop
    condition and errors. Names get an ``<agent>/`` prefix only when the episode holds several traces."""
    traces = list(episode.traces)
    several = len(traces) > 1
    rewards: dict[str, float] = {}
    metrics: dict[str, float] = {}
    for trace in traces:
        prefix = f"{trace.agent.name}/" if several else ""
        for name, reward in trace.rewards.items():
            if reward is not None:
                rewards[prefix + name] = float(reward.value)
        for name, value in trace.metrics.items():
            if value is not None:
                metrics[prefix + name] = float(value)
    last = traces[-1] if traces else None
    stop = last.stop_condition if last is not None else None
    errors = [f"{e.type}: {e.message}" for e in episode.errors]
    errors += [f"{e.type}: {e.message}" for t in traces for e in t.errors]
    return {
        "event": "done",
        "reward": sum(rewards.values()),
        "rewards": rewards,
        "metrics": metrics,
        "stop_condition": stop,
        "truncated": bool(
            episode.is_timeout or (stop or "") in TRUNCATING or (stop or "").endswith("_timeout")
        ),
        "ok": bool(episode.ok),
        "errors": errors,
    }


class Bridge:
    """The loaded environment, its loopback model endpoint and the one episode in play."""

    def __init__(self, spec: dict[str, Any], out: Any):
        self.spec, self.out = spec, out
        self.model = spec.get("model") or "agentrl"
        self.requests: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = asyncio.Queue()
        self.episode: asyncio.Task[Any] | None = None
        self.parked: asyncio.Future[dict[str, Any]] | None = None
        self.turn = 0
        self.key = secrets.token_urlsafe(16)
        self.replies: set[asyncio.Future[dict[str, Any]]] = set()

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    # ---- loading -----------------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        from verifiers.v1.configs.agent import agent_config_fields
        from verifiers.v1.utils.loaders import load_environment, resolve_env_config

        spec = self.spec
        config = resolve_env_config(spec["config"])
        ours = [n for n, seat in agent_config_fields(config).items() if seat.client is None]
        if len(ours) != 1:
            raise ValueError(
                f"environment {config.env_id!r} has {len(ours)} seats played by the run's model ({ours}); "
                "agentrl plays exactly one. Pin the others' `client` in the env config."
            )
        [seat] = ours
        chosen = spec.get("seat") or {}
        seat_config = _merge({"runtime": {"type": "subprocess"}}, chosen)
        config = resolve_env_config(_merge(spec["config"], {seat: seat_config}))
        self.env = load_environment(config)
        harness = self.env._harnesses[seat]
        if harness.EXECUTES_CODE and "runtime" not in chosen:
            raise PermissionError(
                f"harness {harness.config.id!r} runs model-written commands; choose where with "
                "runtime='docker' (isolated) or runtime='subprocess' (this machine, for trusted use)"
            )
        taskset = self.env.taskset
        limit = spec.get("limit")
        if not taskset.bounded and limit is None:
            raise ValueError(
                f"taskset {config.taskset.id!r} is infinite; pass limit=N to play its first N tasks"
            )
        self.tasks = list(taskset.take(limit) if limit is not None else taskset)
        if not self.tasks:
            raise ValueError(f"taskset {config.taskset.id!r} has no tasks")
        agent = getattr(config, seat)
        return {
            "ok": True,
            "env_id": config.env_id,
            "seat": seat,
            "harness": harness.config.id,
            "max_turns": agent.max_turns,
            "tasks": [{"idx": t.data.idx, "id": t.data.id, "name": t.data.name} for t in self.tasks],
        }

    # ---- the loopback model endpoint ---------------------------------------------------------------
    async def start_endpoint(self) -> str:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(CHAT_ROUTE, self.handle_chat)
        app.router.add_post("/{tail:.*}", self.handle_other)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/v1"

    async def handle_other(self, request: Any) -> Any:
        from aiohttp import web

        error = (f"agentrl serves only {CHAT_ROUTE}; harness posted to {request.path} (use a chat-completions "
                 "harness such as null, bash or mini-swe-agent)")  # fmt: skip
        return web.json_response({"error": {"message": error, "type": "invalid_request_error"}}, status=400)

    async def handle_chat(self, request: Any) -> Any:
        from aiohttp import web

        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "unauthorized"}}, status=401)
        body = await request.json()
        if self.episode is None or self.episode.done():
            return web.json_response({"error": {"message": "no episode in play"}}, status=409)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies.add(reply)
        try:
            await self.requests.put((body, reply))
            full = await reply
        finally:
            self.replies.discard(reply)
        if not body.get("stream"):
            return web.json_response(full)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(stream_chunk(full))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    # ---- episodes ----------------------------------------------------------------------------------
    async def next_event(self) -> dict[str, Any]:
        """The episode's next model request, or its outcome once it has finished."""
        assert self.episode is not None
        getter = asyncio.ensure_future(self.requests.get())
        await asyncio.wait({getter, self.episode}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            body, self.parked = getter.result()
            return {"event": "request", "messages": [wire_message(m) for m in body.get("messages") or ()],
                    "tools": list(body.get("tools") or ())}  # fmt: skip
        getter.cancel()
        self.parked = None
        return outcome(self.episode.result())

    async def reset(self, index: int) -> dict[str, Any]:
        from verifiers.v1.env import RunSlot

        await self.stop_episode()
        self.requests = asyncio.Queue()
        self.turn = 0
        self.episode = asyncio.ensure_future(self.env.run_slot(RunSlot(self.tasks[index]), self.ctx))
        return await self.next_event()

    async def step(self, op: dict[str, Any]) -> dict[str, Any]:
        if self.parked is None:
            raise RuntimeError("step without a pending model request: reset first")
        self.parked.set_result(
            completion(self.model, self.turn, op.get("content", ""), op.get("tool_calls") or [])
        )
        self.turn += 1
        return await self.next_event()

    async def stop_episode(self) -> None:
        """Abandon the episode in play: its parked model calls fail first (the harness program waiting on
        them then exits), so verifiers' own teardown is not left waiting for a reply that never comes."""
        episode, self.episode, self.parked = self.episode, None, None
        for reply in list(self.replies):
            reply.cancel()
        if episode is not None and not episode.done():
            episode.cancel()
            await asyncio.gather(episode, return_exceptions=True)

    async def serve(self) -> None:
        import verifiers.v1 as vf

        try:
            hello = self.load()
            base_url = await self.start_endpoint()
            hello["endpoint"] = base_url
        except Exception as exc:  # any load failure goes back to agentrl as the reason, not a traceback
            self.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        # Only verifiers' own client may park a request: it reads this key from the environment.
        os.environ[KEY_VAR] = self.key
        client = vf.EvalClientConfig(base_url=base_url, api_key_var=KEY_VAR)
        self.ctx = vf.ModelContext(model=self.model, client=client)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with self.env.serving():
            self.send(hello)
            try:
                await self.dispatch(reader)
            finally:
                await self.stop_episode()
                await self.runner.cleanup()

    async def dispatch(self, reader: asyncio.StreamReader) -> None:
        """Run each op as it arrives; a new op first cancels one still in flight (an op agentrl abandoned,
        e.g. a step past its deadline), so a reset or close is never stuck behind it."""
        current: asyncio.Task[None] | None = None
        try:
            while line := await reader.readline():
                op = json.loads(line)
                if current is not None and not current.done():
                    current.cancel()
                    await asyncio.gather(current, return_exceptions=True)
                if op["op"] == "close":
                    return
                current = asyncio.ensure_future(self.run_op(op))
        finally:
            if current is not None and not current.done():
                current.cancel()
                await asyncio.gather(current, return_exceptions=True)

    async def run_op(self, op: dict[str, Any]) -> None:
        try:
            event = await (self.reset(int(op["task"])) if op["op"] == "reset" else self.step(op))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported to the env, which raises it from reset/step
            event = {"event": "error", "error": f"{type(exc).__name__}: {exc}"}
        self.send({**event, "id": op.get("id")})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def main() -> None:
    # This file's folder holds agentrl's own verifiers.py: it must not shadow the verifiers package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything verifiers or a harness prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    spec = json.loads(sys.argv[1])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Bridge(spec, out).serve())


if __name__ == "__main__":
    main()
