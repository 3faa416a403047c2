"""verifiers v1 environments (verifiers>=0.4: a ``Taskset`` played by a harness) as agentrl envs.

``agentrl.make("verifiers:<taskset-id>", python="/path/to/venv/bin/python")`` (or ``AGENTRL_VERIFIERS_PYTHON``;
see :func:`agentrl.interop.verifiers.load_verifiers_env` for how an id is routed to this format) loads the
installed taskset package in that interpreter and plays it through agentrl's runner.

Why a second process: verifiers 0.4 pins dependencies (``mcp==2.0.0``) that may conflict with the rest of the
training stack (vLLM's CPU build needs ``mcp>=2.3``), so it often lives in its own virtualenv; and its episodes
are already multi-process (a harness program, tool servers), so one more process costs little. The bridge
(:mod:`agentrl.interop._verifiers_v1_bridge`, standard library + verifiers only) runs the episode exactly as
``vf-eval`` does and parks each model call until this env's ``step`` answers it, so agentrl's runner does the
sampling and the token ledger holds the exact sampled ids.

The mapping:

- tasks: the taskset's tasks in ``load()`` order; ``reset(options={"task": i})`` (or ``"task_index"``) plays
  task ``i``, otherwise the reset seed draws one. An infinite taskset needs ``limit=N``.
- observations: each model request's messages past what the policy has already seen (the opening: system
  prompt and task; then tool results and the env's user turns). A harness that rewrites earlier messages
  (e.g. compaction) breaks the ledger's prefix contract: the step raises :class:`~agentrl.errors.RolloutError`.
- actions: the assistant's text; Hermes ``<tool_call>`` blocks become the OpenAI ``tool_calls`` the harness
  executes (the text outside them is the message content).
- rewards: every ``@vf.reward`` (and judge) of the finished trace is a ``reward_components`` entry
  (``score * weight``; they sum to the reward); ``@vf.metric`` values go to ``info["metrics"]``.
- ends: ``truncated`` when verifiers stopped on a limit (``max_turns``, token budgets) or a timeout,
  ``terminated`` otherwise (the harness finished, a ``@stop`` fired, the env closed the exchange). An episode
  that verifiers marks failed (a harness, tool server or hook error) raises RolloutError from ``step``: the
  runner records it as that trajectory's error.

Options (keyword arguments of ``make``): ``python`` (the interpreter), ``harness`` (a harness id; default the
taskset's own, else verifiers' ``bash``), ``runtime`` (``"subprocess"``, ``"docker"`` or a runtime config dict;
required for a harness that runs model-written commands), ``max_turns``, ``limit``, ``model`` (the model name
in verifiers' traces), ``config`` (a dict deep-merged into verifiers' env config); every other keyword is a field
of the taskset's config (``game="Wordle-v0"``).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, EnvServerError, RolloutError
from agentrl.tools import parse_tool_calls
from agentrl.types import Message

__all__ = ["BRIDGE", "VerifiersV1Env", "bridge_spec"]

BRIDGE = Path(__file__).with_name("_verifiers_v1_bridge.py")
"""The script the interpreter runs; it imports no agentrl, so the interpreter needs only verifiers."""


def bridge_spec(
    target: str,
    *,
    harness: str | None = None,
    runtime: str | Mapping[str, Any] | None = None,
    max_turns: int | None = None,
    limit: int | None = None,
    model: str = "agentrl",
    config: Mapping[str, Any] | None = None,
    **taskset_args: Any,
) -> dict[str, Any]:
    """The bridge's start-up spec: verifiers' env config for ``target`` plus the played seat's settings."""
    seat: dict[str, Any] = {}
    if harness is not None:
        seat["harness"] = {"id": harness}
    if runtime is not None:
        seat["runtime"] = {"type": runtime} if isinstance(runtime, str) else dict(runtime)
    if max_turns is not None:
        seat["max_turns"] = int(max_turns)
    env_config = _merge({"taskset": {"id": target, **taskset_args}}, dict(config or {}))
    return {"config": env_config, "seat": seat, "limit": limit, "model": model}


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _comparable(message: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must not change when a message is sent again: role, text, calls (arguments parsed), call id."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function", {})
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = function.get("arguments")
        calls.append((function.get("name"), json.dumps(arguments, sort_keys=True)))
    return message.get("role"), message.get("content") or "", tuple(calls), message.get("tool_call_id")


def _activated(python: str) -> dict[str, str]:
    """This process's environment with the interpreter's folder first on PATH, as a virtualenv's activation
    puts it: verifiers' harness programs run with ``uv``, which is looked up there."""
    path = os.environ.get("PATH", "")
    return {
        **os.environ,
        "PATH": f"{Path(python).parent}{os.pathsep}{path}" if path else str(Path(python).parent),
    }


def _extends(messages: list[Message], seen: list[Message]) -> bool:
    """Whether a request is the conversation seen so far, then the assistant's reply, then anything new."""
    head = [_comparable(m) for m in messages[: len(seen)]]
    return (
        len(messages) > len(seen)
        and head == [_comparable(m) for m in seen]
        and messages[len(seen)]["role"] == "assistant"
    )


def _read_hello(proc: subprocess.Popen[str], timeout: float, log: IO[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise EnvServerError(
            f"the verifiers bridge did not start within {timeout:.0f} s" if not ready else
            f"the verifiers bridge exited during start-up: {_tail(log)}"
        )  # fmt: skip
    return json.loads(line)


def _tail(log: IO[str], limit: int = 2000) -> str:
    """The end of the bridge's stderr, where verifiers and the harness write why they failed."""
    if log.closed:
        return "(the env was closed)"
    log.flush()
    text = Path(log.name).read_text(errors="replace").strip()
    return text[-limit:] or "(no output)"


def _stop(proc: subprocess.Popen[str], log: IO[str]) -> None:
    """End the bridge and everything it started (its own process group), then drop its log."""
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the bridge if it hung, and anything of its group it left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    log.close()


class VerifiersV1Env(Env):
    """One verifiers v1 environment, played in a bridge process (see the module docstring).

    Args:
        target: the taskset id (its installed package's name).
        python: the interpreter that has verifiers>=0.4 and the taskset package.
        start_timeout: seconds the bridge may take to load the environment.
        **options: see the module docstring (``harness``, ``runtime``, ``max_turns``, ``limit``, ``model``,
            ``config``, taskset config fields).

    Raises:
        ConfigError: the interpreter does not exist, or the bridge refused the environment (unknown id, a
            multi-seat env, a code-running harness without a runtime, an infinite taskset without a limit).
        EnvServerError: the bridge died or hung during start-up.
    """

    def __init__(self, target: str, *, python: str, start_timeout: float = 300.0, **options: Any):
        if not Path(python).is_file():
            raise ConfigError(
                f"verifiers interpreter {python!r} does not exist; point python= or AGENTRL_VERIFIERS_PYTHON at "
                "the `python` of an environment with verifiers>=0.4 (e.g. a virtualenv's bin/python)"
            )
        self.target, self.python = target, python
        self._log = tempfile.NamedTemporaryFile("w+", prefix="agentrl-verifiers-", suffix=".log")
        self._proc = subprocess.Popen(
            [python, str(BRIDGE), json.dumps(bridge_spec(target, **options))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            start_new_session=True, env=_activated(python),
        )  # fmt: skip
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._log)
        hello = _read_hello(self._proc, start_timeout, self._log)
        if not hello.get("ok"):
            self.close()
            error = str(hello.get("error"))
            module = target.rsplit("/", 1)[-1].split("@", 1)[0].replace("-", "_").lower()
            hint = (
                f" Install its package where that interpreter sees it, so that `import {module}` works there."
                if error.startswith("ModuleNotFoundError")
                else ""
            )
            raise ConfigError(
                f"verifiers environment {target!r} could not be loaded by {python}: {error}.{hint}"
            )
        self.task_list: list[dict[str, Any]] = hello["tasks"]
        self.max_turns = hello.get("max_turns")
        self.endpoint: str = hello["endpoint"]
        """The bridge's loopback model endpoint (``.../v1``); it answers only verifiers' own client."""
        size = f"harness {hello['harness']}, {len(self.task_list)} tasks"
        self.description = f"verifiers v1 environment {hello['env_id']} ({size})"
        self._lock = threading.Lock()
        self._waiter: tuple[Any, Any, int] | None = None
        self._ids = 0
        self._seen: list[Message] = []
        self._turn = 0
        self._in_play = False
        threading.Thread(target=self._read_events, name=f"verifiers-bridge-{target}", daemon=True).start()

    # ---- transport ---------------------------------------------------------------------------------
    def _read_events(self) -> None:
        """Hand each event to the op waiting for it; events of an abandoned (cancelled) op are dropped."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not the protocol's (the bridge keeps stray output off this pipe; never trust it)
            with self._lock:
                waiter = self._waiter
            if waiter is not None and waiter[2] == event.get("id"):
                waiter[0].call_soon_threadsafe(_settle, waiter[1], event)
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            error = EnvServerError(f"the verifiers bridge exited: {_tail(self._log)}")
            waiter[0].call_soon_threadsafe(_settle, waiter[1], error)

    async def _call(self, op: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._log.closed:
                raise EnvServerError(f"verifiers environment {self.target!r} is closed; make a new one")
            if self._proc.poll() is not None:
                raise EnvServerError(f"the verifiers bridge has exited: {_tail(self._log)}")
            self._ids += 1
            op = {**op, "id": self._ids}
            self._waiter = (loop, future, self._ids)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(op) + "\n")
            self._proc.stdin.flush()
            event = await future
        finally:
            with self._lock:
                if self._waiter is not None and self._waiter[1] is future:
                    self._waiter = None
        if event.get("event") == "error":
            raise RolloutError(f"verifiers environment {self.target!r}: {event['error']}")
        return event

    # ---- episode -----------------------------------------------------------------------------------
    def _task(self, options: Mapping[str, Any] | None) -> int:
        options = options or {}
        index = options.get("task", options.get("task_index"))
        if index is None:
            index = int(self.np_random.integers(0, len(self.task_list)))
        if not isinstance(index, int) or not 0 <= index < len(self.task_list):
            raise ConfigError(f"task {index!r}: this env has tasks 0..{len(self.task_list) - 1}")
        return index

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        index = self._task(options)
        event = await self._call({"op": "reset", "task": index})
        if event["event"] != "request":
            raise RolloutError(
                f"verifiers environment {self.target!r} ended task {index} before its first model call: "
                f"{event.get('errors') or event.get('stop_condition')}"
            )
        self._seen, self._turn, self._in_play = list(event["messages"]), 0, True
        meta = self.task_list[index]
        info = {
            "tools": event["tools"],
            "task_index": index,
            "env_task_id": meta.get("id") or meta.get("name"),
        }
        return ResetResult(list(event["messages"]), info)

    async def astep(self, action: str) -> StepResult:
        if not self._in_play:
            raise RuntimeError("call reset() before step()")
        parsed = parse_tool_calls(action, max_blocks=None)
        calls = [
            {"id": f"call_{self._turn}_{i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
            for i, c in enumerate(parsed.calls)
        ]  # fmt: skip
        content = parsed.content if calls else action
        self._turn += 1
        event = await self._call({"op": "step", "content": content, "tool_calls": calls})
        if event["event"] == "done":
            self._in_play = False
            return self._finish(event)
        messages: list[Message] = event["messages"]
        seen = len(self._seen)
        if not _extends(messages, self._seen):
            raise RolloutError(
                f"verifiers environment {self.target!r} rewrote or restarted the conversation (a compacting "
                "harness, or an env that plays the seat more than once, such as best-of-n?); agentrl's token "
                "ledger needs each prompt to extend the last one by the assistant's reply"
            )
        self._seen = list(messages)
        return StepResult(messages[seen + 1 :], 0.0, False, False, {"reward_components": {}})

    def _finish(self, event: Mapping[str, Any]) -> StepResult:
        if not event["ok"]:
            raise RolloutError(f"verifiers environment {self.target!r} failed the episode: {event['errors']}")
        info = {
            "reward_components": dict(event["rewards"]),
            "metrics": dict(event["metrics"]),
            "stop_condition": event["stop_condition"],
        }
        truncated = bool(event["truncated"])
        return StepResult([], float(event["reward"]), not truncated, truncated, info)

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        self._finalizer()
        super().close()


def _settle(future: Any, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
