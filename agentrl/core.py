"""The Env contract: a multi-turn text environment that is a real ``gymnasium.Env``.

An episode is a chat. ``reset`` opens it with the first messages (system prompt, task); each ``step``
takes the assistant's text and answers with the messages the environment writes (tool results, user
turns). The runner plays hundreds of episodes at once through the async twins ``areset`` / ``astep``.

An environment implements either the sync pair (``reset``, ``step``) or the async pair (``areset``,
``astep``); the base class derives the other pair, so both work either way. Like Gymnasium, a subclass
calls ``super().reset(seed=seed)`` (or ``await super().areset(seed=seed)``) first to seed
``self.np_random``.
"""

from __future__ import annotations

import asyncio
import string
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

import gymnasium
import numpy as np
from gymnasium import spaces

from agentrl.threads import in_thread
from agentrl.types import Message, ToolSchema

__all__ = ["ChatSpace", "Env", "ResetResult", "StepResult", "TextSpace", "Wrapper"]

_T = TypeVar("_T")
ROLES = ("system", "user", "assistant", "tool")


class ResetResult(NamedTuple):
    """What ``reset`` returns: a plain ``(observation, info)`` tuple with names."""

    observation: list[Message]
    """The opening messages, usually a system prompt and the task as a user message."""
    info: dict[str, Any]
    """``info["tools"]`` holds the tool schemas the policy may call (render them with the chat template)."""


class StepResult(NamedTuple):
    """What ``step`` returns: Gymnasium's 5-tuple with names."""

    observation: list[Message]
    """The messages the environment wrote in answer: tool results, a user turn, or nothing."""
    reward: float
    """This turn's reward: the process (PRM) part each turn, plus the outcome (ORM) part on the last one."""
    terminated: bool
    """The task ended (solved, failed, or the agent stopped); nothing after this could change the outcome."""
    truncated: bool
    """A limit of the environment (turns, time) ended the episode early; the outcome is unknown."""
    info: dict[str, Any]
    """``info["reward_components"]``: the named parts of ``reward`` (they sum to it)."""


def _random_text(rng: np.random.Generator, max_length: int) -> str:
    length = int(rng.integers(0, max_length + 1))
    return "".join(rng.choice(np.array(list(string.printable)), size=length))


class TextSpace(spaces.Space[str]):
    """Any string up to ``max_length`` characters: the assistant's text.

    Gymnasium's ``Text`` space only admits a fixed character set; model output can hold any character.
    ``sample`` draws printable ASCII (enough to probe an env with garbage).
    """

    def __init__(self, max_length: int = 100_000, seed: int | np.random.Generator | None = None):
        self.max_length = max_length
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        return _random_text(self.np_random, min(self.max_length, 64))

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class ChatSpace(spaces.Space[list[Message]]):
    """A list of chat messages, each a dict with a ``role`` and a string ``content``."""

    def __init__(self, max_messages: int = 1_000, seed: int | np.random.Generator | None = None):
        self.max_messages = max_messages
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> list[Message]:
        count = int(self.np_random.integers(0, 4))
        return [
            {"role": str(self.np_random.choice(ROLES)), "content": _random_text(self.np_random, 64)}  # type: ignore[typeddict-item]
            for _ in range(count)
        ]

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, list)
            and len(x) <= self.max_messages
            and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in x
            )
        )

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ChatSpace(max_messages={self.max_messages})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatSpace) and other.max_messages == self.max_messages


class _LoopThread:
    """A private event loop in a daemon thread, so async-only envs work from sync code.

    One loop per env (not ``asyncio.run`` per call) keeps loop-bound resources such as subprocesses and
    HTTP clients valid across ``reset`` and ``step``, and works even when the caller already runs a loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agentrl-env-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()
            self.loop.close()


class Env(gymnasium.Env[list[Message], str]):
    """A multi-turn text environment.

    Methods (implement one pair; the other is derived):
        reset(seed, options) -> ResetResult: open an episode. Reproducible for a given ``seed``.
        step(action) -> StepResult: answer one assistant turn.
        areset / astep: async twins with the same contract; the runner calls these.
        close() / aclose(): release resources (sandboxes, clients). Safe to call twice.
        aprobe(): optional; check that episodes can run at all (a sandbox starts, a server answers) and
            raise with the reason. The evaluation harness calls it once before it loads any model.

    Attributes:
        observation_space: a :class:`ChatSpace`; observations are lists of new messages.
        action_space: a :class:`TextSpace`; an action is the assistant's full text for the turn, tool
            calls included (e.g. Hermes ``<tool_call>`` blocks).
        tools: the tool schemas the policy may call; also returned as ``info["tools"]`` by reset.
        max_turns: the episode's turn limit as the env sees it, or None. The runner enforces its own.
        description: one line for ``agentrl envs``.

    Why the returns look this way: observations are *messages*, not tokens, so one env serves every
    tokenizer; the token ledger renders them with the model's chat template. Rewards are split into named
    ``reward_components`` so reward hacking is visible per component.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - Gymnasium's class attribute
    observation_space: spaces.Space[list[Message]] = ChatSpace()
    action_space: spaces.Space[str] = TextSpace()
    tools: Sequence[ToolSchema] = ()
    max_turns: int | None = None
    description: str = ""

    _bridge: _LoopThread | None = None

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Env, name)

    def _run_sync(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._bridge is None:
            self._bridge = _LoopThread()
            # An env dropped without close() must not leave its loop thread running forever.
            weakref.finalize(self, self._bridge.stop)
        return self._bridge.run(coro)

    # ---- reset -------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:  # type: ignore[override]
        """Open an episode; see :class:`ResetResult`. Subclasses call ``super().reset(seed=seed)`` first."""
        if self._overrides("areset") and not self._overrides("reset"):
            return self._run_sync(self.areset(seed=seed, options=options))
        super().reset(seed=seed)
        return None  # type: ignore[return-value]  # only reached through super() from a subclass

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        """Async twin of :meth:`reset`. Subclasses call ``await super().areset(seed=seed)`` first."""
        if self._overrides("reset") and not self._overrides("areset"):
            return await in_thread("the env's reset", self.reset, seed=seed, options=options)
        gymnasium.Env.reset(self, seed=seed)
        return None  # type: ignore[return-value]

    # ---- step --------------------------------------------------------------------------------------
    def step(self, action: str) -> StepResult:  # type: ignore[override]
        """Answer one assistant turn; see :class:`StepResult`. Bad actions become observations, not errors."""
        if self._overrides("astep") and not self._overrides("step"):
            return self._run_sync(self.astep(action))
        raise NotImplementedError(f"{type(self).__name__} must implement step() or astep()")

    async def astep(self, action: str) -> StepResult:
        """Async twin of :meth:`step`."""
        if self._overrides("step") and not self._overrides("astep"):
            return await in_thread("the env's step", self.step, action)
        raise NotImplementedError(f"{type(self).__name__} must implement step() or astep()")

    # ---- close -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything the env holds. Idempotent. Subclasses call ``super().close()`` last."""
        if self._overrides("aclose") and not self._overrides("close"):
            self._run_sync(self.aclose())
        if self._bridge is not None:
            self._bridge.stop()
            self._bridge = None

    async def aclose(self) -> None:
        """Async twin of :meth:`close`. Subclasses call ``await super().aclose()`` last."""
        if self._overrides("close") and not self._overrides("aclose"):
            await in_thread("the env's close", self.close)

    async def aprobe(self) -> None:
        """Check what every episode needs (a sandbox, a server) once, before a run; the default checks
        nothing. Raises: any error naming what is missing, instead of episodes that all score 0."""

    # ---- helpers for subclasses --------------------------------------------------------------------
    def tool_schemas(self) -> list[ToolSchema]:
        """A fresh deep copy of :attr:`tools`, safe to hand out in ``info`` (callers may mutate it)."""
        import copy

        return copy.deepcopy(list(self.tools))


class Wrapper(gymnasium.Wrapper[list[Message], str, list[Message], str]):
    """Base for wrappers of :class:`Env`: forwards the async twins explicitly, like Gymnasium forwards sync calls."""

    env: Env

    def __init__(self, env: Env):
        super().__init__(env)

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        return await self.env.areset(seed=seed, options=options)

    async def astep(self, action: str) -> StepResult:
        return await self.env.astep(action)

    async def aclose(self) -> None:
        await self.env.aclose()

    async def aprobe(self) -> None:
        await self.env.aprobe()
