"""``math-v0``: answer a math question in a required format, optionally with a calculator or python tool.

Single-turn by default: the first assistant turn is the answer. With ``tools`` the episode is multi-turn:
each turn may call ``calculator`` (exact arithmetic, no ``eval``) or ``python`` (run in a sandbox through the
Sandbox protocol, never on the host); a turn without tool calls is the final answer. A malformed call comes
back as an ``Error: ...`` tool message and the episode goes on.

Reward components (weights configurable, ``weights={"format": 0.2}``):
    - ``correct``: 1 when the answer in the required format verifies against the reference
      (:func:`agentrl.rewards.math.verify`), on the final step (ORM);
    - ``format``: 1 when the final answer is in the required format (``\\boxed{}`` or ``<answer>``);
    - ``tool_error``: -1 per malformed or failed tool call, on that turn (PRM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, ToolCallError
from agentrl.rewards import compose, parse_weights
from agentrl.rewards.answers import extract_answer_tag
from agentrl.rewards.math import boxed_runs, check_options
from agentrl.tools import Tool, format_tool_calls, parse_tool_calls, tool_error_message, validate_call
from agentrl.types import Message, ToolCall
from agentrl_envs.math.calculator import CalculatorError, calculate
from agentrl_envs.math.tasks import MathTask, generate_tasks

__all__ = ["MathEnv"]

FORMATS = {"boxed": "\\boxed{}", "answer_tag": "<answer></answer>"}
DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.1, "tool_error": 0.05}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (numbers, + - * / // % ** and parentheses).

    Args:
        expression: The expression, e.g. "(17 + 25) * 3".
    """
    return calculate(expression)


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: The program; print the values you need.
    """
    raise NotImplementedError  # schema only: MathEnv runs the code through its sandbox


TOOLS = {"calculator": Tool.from_function(calculator), "python": Tool.from_function(python)}


class MathEnv(Env):
    """Math questions with a verified final answer; see the module docstring.

    Args:
        tasks: The task set; default: 1,200 generated tasks over every level (seed 0).
        answer_format: ``"boxed"`` (``\\boxed{…}``) or ``"answer_tag"`` (``<answer>…</answer>``).
        tools: Tool names among ``calculator`` and ``python``; empty for single-turn.
        max_turns: Turn limit with tools (the episode is truncated after it).
        weights: Reward weights by component name (``correct``, ``format``, ``tool_error``).
        verifier: Anything with ``async averify(gold, pred, *, mode, decimal) -> bool``; default: the shared
            :class:`~agentrl.rewards.math.MathVerifier`, leased until :meth:`close`.
        answer_mode: ``"math"``, or ``"choice"`` for multiple choice (the gold is a letter, the chosen letter is
            read from the answer); a task's own ``answer_mode`` wins.
        decimal: The decimal mark of answers, ``"auto"``, ``"point"`` or ``"comma"`` (see
            :func:`agentrl.rewards.math.verify`); a task's own ``decimal`` wins.
        sandbox: The sandbox backend for the ``python`` tool.

    Raises:
        ConfigError: An unknown format, tool, weight name, answer mode or decimal mark, or an empty task set.
    """

    description = "Math word problems and equations with a verified \\boxed{} answer (optional calculator tool)"

    def __init__(
        self,
        tasks: Sequence[MathTask] | None = None,
        answer_format: str = "boxed",
        tools: Sequence[str] = (),
        max_turns: int = 4,
        weights: Mapping[str, float] | None = None,
        verifier: Any = None,
        sandbox: str = "local",
        answer_mode: str = "math",
        decimal: str = "auto",
    ):
        check_options(answer_mode, decimal)
        if answer_format not in FORMATS:
            raise ConfigError(f"answer_format must be one of {sorted(FORMATS)}, got {answer_format!r}")
        unknown = sorted(set(tools) - set(TOOLS))
        if unknown:
            raise ConfigError(f"unknown math tools {unknown}; available: {sorted(TOOLS)}")
        self.tasks = list(tasks) if tasks is not None else generate_tasks(1200, seed=0)
        if not self.tasks:
            raise ConfigError("MathEnv needs at least one task")
        self.answer_format = answer_format
        self.answer_mode, self.decimal = answer_mode, decimal
        self.tool_names = tuple(tools)
        self.tools = tuple(TOOLS[name].schema() for name in self.tool_names)
        self.max_turns: int = max_turns if self.tool_names else 1
        self.weights = {**DEFAULT_WEIGHTS, **parse_weights(weights, list(DEFAULT_WEIGHTS))}
        self.sandbox_name = sandbox
        self._verifier = verifier
        self._lease: Any = None
        self._sandbox: Any = None
        self._task = self.tasks[0]
        self._turn = 0

    # ---- prompts and demonstrations ----------------------------------------------------------------
    def system_prompt(self) -> str:
        where = FORMATS[self.answer_format].replace("{}", "{ANSWER}").replace("><", ">ANSWER<")
        text = f"Solve the problem. Give the final answer as {where}."
        if self.tool_names:
            text += f" You may call the {' and '.join(self.tool_names)} tool first; then answer without a tool call."
        return text

    def wrap_answer(self, answer: str) -> str:
        """The answer in the required format."""
        return f"\\boxed{{{answer}}}" if self.answer_format == "boxed" else f"<answer>{answer}</answer>"

    def demonstration(self, task: MathTask | int) -> list[Message]:
        """A reference conversation that solves ``task`` (for SFT): with tools, one calculator call per step
        whose result is the calculator's real output; without, the worked steps and the answer."""
        task = self.tasks[task] if isinstance(task, int) else task
        messages: list[Message] = [
            {"role": "system", "content": self.system_prompt()},
            {"role": "user", "content": task.question},
        ]
        steps = [text for text, _ in task.steps] or ([task.solution] if task.solution else [])
        if "calculator" in self.tool_names and task.steps:
            for i, (_, expression) in enumerate(task.steps):
                call = ToolCall("calculator", {"expression": expression}, f"call_{i}")
                messages.append({"role": "assistant", "content": format_tool_calls([call])})
                messages.append({"role": "tool", "content": calculate(expression), "tool_call_id": f"call_{i}",
                                 "name": "calculator"})
        body = "\n".join(steps)
        messages.append({"role": "assistant", "content": f"{body}\n{self.wrap_answer(task.answer)}".strip()})
        return messages

    # ---- episode -----------------------------------------------------------------------------------
    def _pick(self, options: Mapping[str, Any] | None) -> MathTask:
        options = options or {}
        if "task" in options:
            wanted = options["task"]
            if isinstance(wanted, int) and 0 <= wanted < len(self.tasks):
                return self.tasks[wanted]
            for task in self.tasks:
                if task.id == wanted:
                    return task
            raise ConfigError(f"no math task {wanted!r}: pass an index below {len(self.tasks)} or a task id")
        return self.tasks[int(self.np_random.integers(0, len(self.tasks)))]

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        self._task = self._pick(options)
        self._turn = 0
        opening: list[Message] = [
            {"role": "system", "content": self.system_prompt()},
            {"role": "user", "content": self._task.question},
        ]
        return ResetResult(opening, {"tools": self.tool_schemas(), "task_id": self._task.id})

    async def astep(self, action: str) -> StepResult:
        if self._turn >= self.max_turns:
            raise RuntimeError("the episode is over; call reset() first")
        self._turn += 1
        parsed = parse_tool_calls(action) if self.tool_names else None
        if parsed is not None and (parsed.calls or parsed.errors):
            observation, failures = await self._run_tools(parsed.calls, parsed.errors)
            reward = compose({"tool_error": -float(failures)}, {"tool_error": self.weights["tool_error"]})
            truncated = self._turn >= self.max_turns
            info = {"reward_components": dict(reward.components), "task_id": self._task.id}
            return StepResult(observation, reward.score, False, truncated, info)
        return await self._finish(action)

    async def _finish(self, action: str) -> StepResult:
        if self.answer_format == "boxed":  # adjacent boxes are one answer: "\boxed{1}, \boxed{2}"
            runs = boxed_runs(action)
            answer = runs[-1][1] if runs else None
        else:
            answer = extract_answer_tag(action)
        options = {"mode": self._task.answer_mode or self.answer_mode, "decimal": self._task.decimal or self.decimal}
        correct = bool(answer) and await self._averify(self._task.answer, answer or "", options)
        raw = {"correct": float(correct), "format": float(answer is not None)}
        reward = compose(raw, {k: self.weights[k] for k in raw})
        info = {"reward_components": dict(reward.components), "task_id": self._task.id, "answer": answer,
                "gold": self._task.answer}
        return StepResult([], reward.score, True, False, info)

    async def _averify(self, gold: str, pred: str, options: dict[str, str]) -> bool:
        if self._verifier is not None:
            return bool(await self._verifier.averify(gold, pred, **options))
        if self._lease is None:
            from agentrl.rewards.math import default_verifier

            self._lease = default_verifier().lease()
        return bool(await self._lease.averify(gold, pred, **options))

    # ---- tools -------------------------------------------------------------------------------------
    async def _run_tools(
        self, calls: Sequence[ToolCall], errors: Sequence[ToolCallError]
    ) -> tuple[list[Message], int]:
        observation = [tool_error_message(error) for error in errors]
        failures = len(errors)
        for call in calls:
            try:
                call = validate_call(call, [TOOLS[name] for name in self.tool_names])
                content = await self._call(call)
            except (ToolCallError, CalculatorError) as error:
                observation.append(tool_error_message(error, call.id))
                failures += 1
                continue
            observation.append({"role": "tool", "content": content, "tool_call_id": call.id or "",
                                "name": call.name})
        return observation, failures

    async def _call(self, call: ToolCall) -> str:
        if call.name == "calculator":
            return calculate(str(call.arguments["expression"]))
        return await self._run_python(str(call.arguments["code"]))

    async def _run_python(self, code: str) -> str:
        if self._sandbox is None:
            from agentrl.sandbox import SandboxLimits, open_sandbox

            self._sandbox = open_sandbox(self.sandbox_name, SandboxLimits(wall_time=5.0, output_bytes=4096))
            await self._sandbox.start()
        result = await self._sandbox.exec(code)
        text = result.stdout
        if result.stderr:
            text += ("\n" if text else "") + "stderr:\n" + result.stderr
        if result.timed_out:
            text += "\n(the program ran out of time)"
        return (text or f"(no output; exit code {result.exit_code})")[:4096]

    async def aclose(self) -> None:
        if self._sandbox is not None:
            sandbox, self._sandbox = self._sandbox, None
            await sandbox.close()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.close()
        await super().aclose()
