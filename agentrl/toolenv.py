"""``ToolEnv``: a multi-turn tool-using environment from typed functions, a task set and a reward function.

The common case is a few lines::

    def add(a: int, b: int) -> int:
        \"\"\"Add two numbers.\"\"\"
        return a + b

    tasks = [Task("What is 17 + 25?", answer="42")]
    env = ToolEnv([add], tasks, reward=lambda task, answer: float(answer == task.answer))

Each turn the assistant's text is parsed for Hermes ``<tool_call>`` blocks; every call is validated against
its tool's schema and run (sync tools in a thread, async ones on the loop) under a per-tool timeout. A
malformed call, an invalid argument, an exception or a timeout becomes an ``Error: ...`` tool message and
the episode goes on. The episode ends when the assistant gives its final answer (``<answer>…</answer>``
by default), or is truncated at ``max_turns``. The outcome reward (ORM) scores the final answer on the
last step; an optional process reward (PRM) scores every turn; ``info["reward_components"]`` names the
parts, which sum to the step reward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, ToolCallError
from agentrl.rewards import RewardResult, compose
from agentrl.threads import in_thread
from agentrl.tools import Tool, as_tool, call_tool, parse_tool_calls, tool_error_message, validate_call
from agentrl.types import Message, ToolCall

__all__ = ["CallRecord", "Task", "ToolEnv", "Turn"]

Reward = Callable[[Any, Any], Any]
"""``fn(task, answer_or_turn) -> float | Mapping[str, float] | RewardResult``."""


@dataclass(frozen=True)
class Task:
    """One task of a :class:`ToolEnv`.

    Attributes:
        prompt: The user message that opens the episode.
        answer: The reference answer, for the reward function (any type).
        id: A stable name (defaults to the task's index in the task set).
        data: Anything else the reward function needs (a task dict's keys that are no Task field land here).
        demonstration: Assistant turns that solve the task; :meth:`ToolEnv.demonstration` plays them through
            the env so the tool results in the SFT transcript are the real ones.
    """

    prompt: str
    answer: Any = None
    id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    demonstration: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallRecord:
    """One tool call of a turn. ``status``: ``"ok"``, ``"invalid"`` (unknown tool or bad arguments),
    ``"error"`` (the tool raised, or answered ``Error: ...``) or ``"timeout"``."""

    name: str
    arguments: Mapping[str, Any]
    content: str
    status: str


@dataclass(frozen=True)
class Turn:
    """What a process reward sees of one turn.

    Attributes:
        index: 0 for the first turn.
        text: The assistant's full text.
        calls: The calls that were run or rejected, in order.
        errors: Messages for blocks that could not be parsed as calls.
        answer: The final answer given this turn, or None.
        earlier: The episode's previous turns (e.g. to reward only the first visit of a page).
    """

    index: int
    text: str
    calls: tuple[CallRecord, ...]
    errors: tuple[str, ...]
    answer: str | None
    earlier: tuple[Turn, ...] = ()

    @property
    def well_formed(self) -> bool:
        """Every call parsed and passed validation, and there was at least a call or an answer."""
        has_action = bool(self.calls) or self.answer is not None
        return has_action and not self.errors and all(c.status != "invalid" for c in self.calls)


def _as_task(item: Any, index: int) -> Task:
    if isinstance(item, Task):
        return item if item.id else dataclasses.replace(item, id=str(index))
    if isinstance(item, str):
        return Task(item, id=str(index))
    if isinstance(item, Mapping) and isinstance(item.get("prompt"), str):
        known = {f.name for f in dataclasses.fields(Task)}
        fields = {k: v for k, v in item.items() if k in known}
        extra = {k: v for k, v in item.items() if k not in known}  # a data set's other columns: metadata
        data = fields.get("data") or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"task {index}: 'data' must be a mapping, got {type(data).__name__}")
        task = Task(**{**fields, "id": str(fields.get("id") or ""), "data": {**extra, **data},
                       "demonstration": tuple(fields.get("demonstration") or ())})  # fmt: skip
        return task if task.id else dataclasses.replace(task, id=str(index))
    raise ConfigError(f"task {index}: expected a Task, a prompt string or a dict with 'prompt', got {item!r:.80}")


def _components(value: Any, default_name: str, where: str) -> dict[str, float]:
    """A reward function's value as named components that sum to its score."""
    if isinstance(value, RewardResult):
        return dict(value.components)
    if isinstance(value, Mapping):
        return dict(compose(value, {}).components)
    if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value)):
        return {default_name: float(value)}
    raise ConfigError(f"{where} returned {value!r:.80}; return a finite float, a dict of floats or a RewardResult")


def _add(into: dict[str, float], parts: Mapping[str, float]) -> None:
    for name, value in parts.items():
        into[name] = into.get(name, 0.0) + value


def _threaded(tool: Tool) -> Tool:
    fn = tool.fn
    if fn is None:
        raise ConfigError(f"tool {tool.name!r} has no function; give ToolEnv tools that can run")
    if inspect.iscoroutinefunction(fn):
        return tool

    async def run(*args: Any, **kwargs: Any) -> Any:
        result = await in_thread(f"tool {tool.name!r}", fn, *args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    return dataclasses.replace(tool, fn=run)


class ToolEnv(Env):
    """A multi-turn env built from tools, tasks and rewards (async API; the sync pair is derived).

    Args:
        tools: Typed functions (sync or async), :class:`~agentrl.tools.Tool` objects (``@tool``,
            :func:`~agentrl.http_tools.http_tool` for HTTP endpoints) or OpenAI schemas with an ``fn``.
        tasks: :class:`Task` objects, prompt strings or dicts with Task's fields (other keys, e.g. a data
            set's extra columns, go into ``Task.data``), such as the rows of
            :func:`agentrl.data.sources.load_records`; or a function ``(np.random.Generator) -> Task``
            that makes one (procedural tasks).
        reward: The outcome reward, ``reward(task, answer) -> float | dict | RewardResult``, called once when
            the episode ends; ``answer`` is the final answer text, ``""`` if a limit ended the episode.
        process_reward: Optional ``process_reward(task, turn: Turn) -> float | dict | RewardResult``, every turn.
        system_prompt: The system message; the default explains the answer format.
        max_turns: Assistant turns before the episode is truncated.
        tool_timeout: Seconds one tool call may take before it is answered with a timeout error.
        answer_tag: The final answer is the text in ``<answer_tag>…</answer_tag>`` (the turn's tool calls are
            then not run). None: a turn without tool calls ends the episode and its text is the answer.
        format_penalty: Subtracted (component ``"format"``) on each turn that is not :attr:`Turn.well_formed`.
        max_calls_per_turn: Tool-call blocks read in one turn (calls and malformed blocks together); the rest
            of the turn is answered with one error and not run.
        max_output_chars: Longer tool results are cut, with a note saying so.
        tools_in_system_prompt: Also write the tool schemas into the system message, for chat templates that
            do not render ``tools=`` (they are always in ``info["tools"]``).
        description: One line for ``agentrl envs``.
        tool_format: The markup the model writes tool calls in (``"hermes"``, ``"llama3_json"``,
            ``"mistral"``, ``"qwen3_coder"``, ``"harmony"``; :mod:`agentrl.tool_formats`); ``agentrl check
            --model`` says which one a model's chat template uses.

    A float from a reward function is named ``"outcome"`` / ``"process"`` in ``info["reward_components"]``;
    a dict or RewardResult keeps its own names (the same name from both is summed).

    Raises:
        ConfigError: An empty task set, duplicate tool names, a tool without a function, bad limits.
    """

    def __init__(
        self,
        tools: Sequence[Any],
        tasks: Sequence[Any] | Callable[[np.random.Generator], Task],
        reward: Reward,
        *,
        process_reward: Reward | None = None,
        system_prompt: str | None = None,
        max_turns: int = 8,
        tool_timeout: float = 30.0,
        answer_tag: str | None = "answer",
        format_penalty: float = 0.0,
        max_calls_per_turn: int = 8,
        max_output_chars: int = 8_000,
        tools_in_system_prompt: bool = False,
        description: str | None = None,
        tool_format: str = "hermes",
    ):
        from agentrl.tool_formats import tool_format as named_format

        named_format(tool_format)  # an unknown name fails here, listing the known ones
        self.tool_format = tool_format
        if max_turns < 1 or tool_timeout <= 0 or max_calls_per_turn < 1 or max_output_chars < 1:
            raise ConfigError("max_turns, max_calls_per_turn and max_output_chars must be >= 1, tool_timeout > 0")
        built = [as_tool(t) for t in tools]
        names = [t.name for t in built]
        if len(set(names)) != len(names):
            raise ConfigError(f"tool names must be unique, got {names}")
        self._tools: dict[str, Tool] = {t.name: _threaded(t) for t in built}
        self.tools = tuple(t.schema() for t in built)
        if callable(tasks):
            self._make_task: Callable[[np.random.Generator], Task] | None = tasks
            self.tasks: tuple[Task, ...] = ()
        else:
            self._make_task = None
            self.tasks = tuple(_as_task(t, i) for i, t in enumerate(tasks))
            if not self.tasks:
                raise ConfigError("the task set is empty; give ToolEnv at least one task")
        self.reward, self.process_reward = reward, process_reward
        self.max_turns: int = max_turns
        self.tool_timeout, self.answer_tag, self.format_penalty = tool_timeout, answer_tag, format_penalty
        self.max_calls_per_turn, self.max_output_chars = max_calls_per_turn, max_output_chars
        self.system_prompt = system_prompt if system_prompt is not None else self._default_prompt()
        if tools_in_system_prompt and self.tools:
            listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in self.tools)
            call = '<tool_call>{"name": ..., "arguments": {...}}</tool_call>'
            self.system_prompt += f"\n\nTools (call one as {call}):\n{listing}"
        self.description = description or self.description or "A tool-using task set (ToolEnv)"
        tag = re.escape(answer_tag or "")
        self._answer_re = re.compile(rf"<{tag}>(.*?)</{tag}>", re.S) if answer_tag else None
        self.task: Task | None = None
        self._turns: list[Turn] = []
        self._done = True

    def _default_prompt(self) -> str:
        if self.answer_tag:
            ending = f"When you know the answer, reply with <{self.answer_tag}>your answer</{self.answer_tag}>."
        else:
            ending = "When you are done, reply without a tool call; that reply is your final answer."
        return f"Solve the task. You may call the tools as often as you need. {ending}"

    # ---- episode -----------------------------------------------------------------------------------
    def pick_task(self, options: Mapping[str, Any] | None) -> Task:
        """The task for a new episode: ``options["task"]`` (a Task, an index or an id) or a seeded draw."""
        chosen = (options or {}).get("task")
        if isinstance(chosen, Task):
            return chosen
        if self._make_task is not None:
            if chosen is not None:
                raise ConfigError("this ToolEnv makes its tasks; pass options={'task': Task(...)} to pick one")
            return self._make_task(self.np_random)
        if chosen is None:
            return self.tasks[int(self.np_random.integers(len(self.tasks)))]
        if isinstance(chosen, (int, np.integer)) and 0 <= chosen < len(self.tasks):
            return self.tasks[int(chosen)]
        for task in self.tasks:
            if task.id == chosen:
                return task
        raise ConfigError(f"options['task']={chosen!r} is neither an index below {len(self.tasks)} nor a task id")

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        self.task = self.pick_task(options)
        self._turns, self._done = [], False
        opening: list[Message] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.task.prompt},
        ]
        return ResetResult(opening, {"tools": self.tool_schemas(), "task_id": self.task.id})

    async def astep(self, action: str) -> StepResult:
        if self._done or self.task is None:
            raise RuntimeError("the episode is over; call reset() first")
        parsed = parse_tool_calls(
            action, max_blocks=self.max_calls_per_turn, tool_format=self.tool_format, tools=self.tools
        )
        answer = self._final_answer(parsed.content, bool(parsed.calls or parsed.errors))
        obs: list[Message] = [tool_error_message(e) for e in parsed.errors]
        records: list[CallRecord] = []
        if answer is None:
            for call in parsed.calls:
                message, record = await self._run_call(call)
                obs.append(message)
                records.append(record)
            if not parsed.calls and not parsed.errors:
                obs.append({"role": "user", "content": self._nudge()})
        turn = Turn(len(self._turns), action, tuple(records), tuple(str(e) for e in parsed.errors), answer,
                    tuple(self._turns))
        self._turns.append(turn)
        terminated = answer is not None
        truncated = not terminated and len(self._turns) >= self.max_turns
        self._done = terminated or truncated
        components = self.turn_components(self.task, turn)
        if self._done:
            outcome = self.reward(self.task, answer if answer is not None else "")
            _add(components, _components(outcome, "outcome", "reward"))
        info: dict[str, Any] = {"reward_components": components, "turn": turn.index, "task_id": self.task.id}
        if terminated:
            info["answer"], obs = answer, []
        return StepResult(obs, float(sum(components.values())), terminated, truncated, info)

    def turn_components(self, task: Task, turn: Turn) -> dict[str, float]:
        """The per-turn reward parts: the process reward and the format penalty."""
        components: dict[str, float] = {}
        if self.process_reward is not None:
            _add(components, _components(self.process_reward(task, turn), "process", "process_reward"))
        if self.format_penalty:
            _add(components, {"format": 0.0 if turn.well_formed else -self.format_penalty})
        return components

    def _final_answer(self, content: str, has_calls: bool) -> str | None:
        if self._answer_re is None:
            return None if has_calls else content
        found = self._answer_re.findall(content)
        return found[-1].strip() if found else None

    def _nudge(self) -> str:
        if self.answer_tag:
            return f"Call a tool, or give your final answer as <{self.answer_tag}>…</{self.answer_tag}>."
        return "Call a tool."

    async def _run_call(self, call: ToolCall) -> tuple[Message, CallRecord]:
        try:
            validate_call(call, self._tools)
        except ToolCallError as invalid:
            return self._failed(call, invalid, "invalid")
        try:
            message = await asyncio.wait_for(call_tool(call, self._tools), self.tool_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            late = TimeoutError(f"tool {call.name!r} did not finish within {self.tool_timeout:g} s")
            return self._failed(call, late, "timeout")
        content = message["content"]
        if len(content) > self.max_output_chars:
            cut = len(content) - self.max_output_chars
            message["content"] = f"{content[: self.max_output_chars]}\n[... {cut} more characters cut]"
        status = "error" if content.startswith("Error: ") else "ok"
        return message, CallRecord(call.name, call.arguments, message["content"], status)

    @staticmethod
    def _failed(call: ToolCall, error: BaseException, status: str) -> tuple[Message, CallRecord]:
        message = tool_error_message(error, call.id)
        message["name"] = call.name
        return message, CallRecord(call.name, call.arguments, message["content"], status)

    # ---- demonstrations ----------------------------------------------------------------------------
    async def ademonstration(self, task: Task | int | str) -> list[Message]:
        """Play ``task.demonstration`` through the env (a new episode) and return the whole conversation.

        Returns:
            The opening messages, then per turn the assistant's text and the env's answer: an SFT example
            whose tool results are the real ones.

        Raises:
            ConfigError: The task has no demonstration, or it does not end the episode with an answer.
        """
        chosen = self.pick_task({"task": task})
        if not chosen.demonstration:
            raise ConfigError(f"task {chosen.id!r} has no demonstration")
        messages = list((await self.areset(options={"task": chosen})).observation)
        for action in chosen.demonstration:
            result = await self.astep(action)
            messages += [{"role": "assistant", "content": action}, *result.observation]
            if result.terminated or result.truncated:
                break
        if not (self._done and self._turns[-1].answer is not None):
            raise ConfigError(f"task {chosen.id!r}: its demonstration does not end with a final answer")
        return messages

    def demonstration(self, task: Task | int | str) -> list[Message]:
        """Sync twin of :meth:`ademonstration`."""
        return self._run_sync(self.ademonstration(task))
