"""``code-sandbox-v0``: write a Python function, test it in a sandbox, submit it to hidden tests.

Each turn the model may call ``run_python`` (up to ``max_runs`` times; results come back as tool messages) and
submits its program by calling ``submit``, or by answering with a fenced python block and no tool call.
Malformed calls come back as tool errors and the episode goes on; ``max_turns`` turns without a submission
truncate it.

With ``attempts`` = 1 (the class default) a submission ends the episode. With more, a submission is first run
on the task's *public* tests (:attr:`~agentrl_envs.code_sandbox.tasks.CodeTask.feedback`), in an execution of
its own: if one fails, the agent reads the first failure (the call, what it returned or raised, what was
expected) and may submit again; when they all pass, or no attempt is left, the submission is final. The
*hidden* tests alone decide the reward and are never shown, so no number of attempts reveals them (this is
the RLEF design: feedback from public tests, reward from private ones). A task without public tests says only
how many hidden tests passed.

Rewards (named components, weighted by ``weights``; ``info["reward_components"]`` holds the weighted parts,
``info["reward_raw"]`` the raw values):

- ``correct`` (ORM, last turn): the share of hidden tests the final submission passed, or 1/0 for all-pass
  with ``orm="all_pass"``. Earlier submissions score nothing.
  With ``format_gate`` (default), a submission followed by anything (text, another ``<tool_call>`` block,
  well-formed or not, after its closing ``</tool_call>``; text after its code fence) scores 0: a policy must
  not learn to ramble after its answer.
- ``format`` (PRM, every turn): -1 for a turn with a malformed call, or with neither a call nor a code block.
- ``runs`` (PRM, every turn): the share of this turn's ``run_python`` programs that exited 0; on the
  submission turn, 1 if the program loaded and no call of the tests raised.
- ``progress`` (PRM): each turn, how much the best share of hidden tests passed so far went up; programs
  run with ``run_python`` that define the entry point are graded too. Over an episode it sums to the best
  share reached. Costs a grading per such run, so it is computed only when its weight is not 0.

Each step's ``info["turn_metrics"]`` says what the turn did, for multi-turn metrics: ``attempt`` (1 if it
submitted), ``attempt_passed`` (1 if that submission passed its public tests and every hidden test; a
submission its public tests turn back is not run on the hidden ones), ``tool_calls`` and
``tool_errors`` (malformed or invalid calls, calls beyond ``max_runs``, sandbox failures).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, ToolCallError
from agentrl.rewards import compose, parse_weights
from agentrl.sandbox import SandboxError, SandboxLimits, has_sandbox, list_sandboxes
from agentrl.tools import parse_tool_calls, tool_error_message, validate_call
from agentrl.types import Message, ToolCall
from agentrl_envs.code_sandbox.datasets import load_humaneval, load_mbpp, load_tasks
from agentrl_envs.code_sandbox.generator import PRESETS, GeneratorConfig, generate_task
from agentrl_envs.code_sandbox.grading import GradeConfig, GradeResult, SandboxPair, grade, grade_public
from agentrl_envs.code_sandbox.prompts import (
    FENCED_SYSTEM_PROMPT,
    RESUBMIT_TOOL,
    RUN_TOOL,
    SUBMIT_TOOL,
    SYSTEM_PROMPT,
    demonstration,
    final_code_block,
    format_run,
    retry_feedback,
)
from agentrl_envs.code_sandbox.tasks import CodeTask, parse_source

__all__ = ["COMPONENTS", "CodeSandboxEnv"]

COMPONENTS = ("correct", "format", "runs", "progress")
DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.0, "runs": 0.0, "progress": 0.0}
_TOOLS = (RUN_TOOL, SUBMIT_TOOL)
_NUDGE = {"tool": "Call run_python to test code, or call submit with your complete program.",
          "fenced": "Call run_python to test code, or answer with your complete program in a ```python block."}
_GATED = {"tool": "nothing may follow the submission: submit with nothing after the call",
          "fenced": "nothing may follow the submission: end your answer with the block's closing ```"}
_STATUS_TEXT = {"load_error": "the program failed to load", "timeout": "the program ran out of time",
                "crashed": "the program crashed", "tampered": "the program's report was tampered with"}  # fmt: skip


def _resolve_tasks(
    tasks: str | GeneratorConfig | Mapping[str, Any] | Sequence[CodeTask],
) -> GeneratorConfig | list[CodeTask]:
    if isinstance(tasks, GeneratorConfig):
        return tasks
    if isinstance(tasks, Mapping):  # a preset with some fields changed, e.g. {preset: rl, alt_share: 0.5}
        fields = dict(tasks)
        preset = fields.pop("preset", "rl")
        if preset not in PRESETS:
            raise ConfigError(f"tasks: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        unknown = set(fields) - {f.name for f in dataclasses.fields(GeneratorConfig)}
        if unknown:
            raise ConfigError(f"tasks: {sorted(unknown)} are not GeneratorConfig fields; use any of "
                              f"{[f.name for f in dataclasses.fields(GeneratorConfig)]}")  # fmt: skip
        lists = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}  # YAML lists -> tuples
        return dataclasses.replace(PRESETS[preset], **{**fields, **lists})
    if isinstance(tasks, str):
        if tasks in PRESETS:
            return PRESETS[tasks]
        loaded = {"humaneval": load_humaneval, "mbpp": load_mbpp}.get(tasks.lower())
        return loaded() if loaded else load_tasks(tasks)
    listed = list(tasks)
    if not listed or not all(isinstance(t, CodeTask) for t in listed):
        raise ConfigError("tasks must be a preset name, a mapping {preset: ..., <GeneratorConfig field>: ...}, a "
                          "GeneratorConfig, a data set path, or a list of CodeTask")  # fmt: skip
    return listed


DEFAULT_RUN: dict[str, Any] = {
    # `agentrl train --env code-sandbox` with nothing else: the tiny model on a 2-core CPU in 14 minutes, two
    # submissions per episode, each a fenced python block (raw code: fewer tokens than a JSON string). SFT on
    # reference episodes (demonstrated phrasings only), a fifth of them recovering from a slipped first submission
    # (a retry copies most of its lines from the first attempt, so it teaches little about reading the task),
    # the digits weighed 5x (the constants to copy from the prompt are what the tiny model learns last),
    # 1,000 steps (reading the clauses is learnt late, and at 600 steps in some seeds only);
    # GRPO with turn-level credit on tasks where half the clauses use the other phrasings (where the SFT model is
    # partly right), at lr 1e-4 (3e-4 unlearned demonstrated clauses faster than it learned the new ones);
    # greedy pass@1 (all hidden tests) on held-out functions. SFT stops at its time budget (5.5 minutes; here
    # at steps 785-959) and RL at what the run's budget leaves it. Since every clause of a task is tested, RL
    # at these settings lowers pass@1 (README): the RL settings were tuned on tasks with untested clauses.
    "threads": 2,
    "budget_minutes": 14,
    "env_kwargs": {"tasks": {"preset": "rl", "alt_share": 0.5}, "attempts": 2, "max_turns": 2, "answer": "fenced"},
    "sft": {
        "demos": 16000,
        "cache": True,
        "env_kwargs": {"tasks": "sft", "attempts": 2, "max_turns": 2, "answer": "fenced"},
        "demo_options": {"check": False, "recover": 0.2},
        "learner": {"max_steps": 1000, "max_seconds": 330, "batch_size": 16, "lr": 2e-3, "warmup_steps": 30,
                    "max_seq_len": 1024, "digit_weight": 5.0},
    },
    "learner": {
        "max_steps": 250, "max_seconds": 600, "prompts_per_step": 16, "group_size": 8, "max_new_tokens": 128,
        "max_turns": 2, "advantage": "turn", "temperature": 1.0, "lr": 1e-4, "warmup_steps": 5,
        "dynamic_sampling": True, "rollout_options": {"batch_window_s": 0.05},
    },
    "eval": {"tasks": 300, "env_kwargs": {"tasks": "eval", "attempts": 2, "max_turns": 2, "answer": "fenced"},
             "pass_on": "correct",
             "max_new_tokens": 160},
}  # fmt: skip
"""The env's recipe for ``agentrl train`` (see :mod:`agentrl.pipeline.config`); any key can be overridden."""


@dataclass
class _Episode:
    task: CodeTask
    turn: int = 0
    best: float = 0.0
    done: bool = False
    submissions: int = 0
    last: GradeResult | None = None  # the latest submission's hidden-test verdict, once graded
    last_code: str | None = None
    last_gated: bool = False


class CodeSandboxEnv(Env):
    """Write a function with a ``run_python`` tool and ``submit`` it to hidden tests (see the module docstring).

    Args:
        tasks: a generator preset (``"rl"``, ``"sft"``, ``"eval"``), a preset with fields changed
            (``{"preset": "rl", "alt_share": 0.5}``), a :class:`GeneratorConfig`, ``"humaneval"``
            / ``"mbpp"`` (the files under ``$AGENTRL_DATASETS``), a path to such a file, or a list of tasks.
        sandbox: the sandbox backend's registered name.
        sandbox_limits: limits of every program; defaults to 5 s wall and CPU time, 512 MiB.
        sandbox_options: backend options.
        max_turns: turns before the episode is truncated.
        attempts: submissions per episode; beyond the first, each failed public test is shown and the agent
            may submit again (see the module docstring).
        orm: ``"share"`` (share of hidden tests passed) or ``"all_pass"`` (1 only if all pass).
        weights: weights of the components ``correct``, ``format``, ``runs``, ``progress``.
        format_gate: score 0 for a submission followed by anything (text, another block or call).
        output_chars: characters of stdout and of stderr shown per ``run_python`` call.
        max_runs: ``run_python`` calls run per turn; each one beyond comes back as an error message, not run
            (a turn of runaway programs would otherwise hold the episode for ``max_runs`` x the wall time).
        grading: time limits of a grading.
        system_prompt: the system message; None: the one for ``answer``.
        answer: how the model is asked to submit (both ways are always accepted): ``"tool"``, a ``submit``
            call, or ``"fenced"``, a fenced python block (raw code: no JSON escapes, which one wrong token
            breaks at sampling temperatures above 1); then only ``run_python`` is listed as a tool.

    Attributes:
        last_grade: the :class:`GradeResult` of the latest submission (with its wall time), or None.
    """

    description = "Write a Python function with a run_python tool and submit it to hidden tests (sandboxed)"
    tools = tuple(t.schema() for t in _TOOLS)
    default_run: ClassVar[dict[str, Any]] = DEFAULT_RUN

    def __init__(
        self,
        tasks: str | GeneratorConfig | Mapping[str, Any] | Sequence[CodeTask] = "rl",
        *,
        sandbox: str = "local",
        sandbox_limits: SandboxLimits | None = None,
        sandbox_options: Mapping[str, Any] | None = None,
        max_turns: int = 4,
        attempts: int = 1,
        orm: str = "share",
        weights: Mapping[str, float] | None = None,
        format_gate: bool = True,
        output_chars: int = 1000,
        max_runs: int = 4,
        grading: GradeConfig | None = None,
        system_prompt: str | None = None,
        answer: str = "tool",
    ):
        if orm not in ("share", "all_pass"):
            raise ConfigError(f"orm must be 'share' or 'all_pass', got {orm!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ConfigError(f"max_turns must be a positive integer, got {max_turns!r}")
        if not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"attempts must be a positive integer, got {attempts!r}")
        if not isinstance(max_runs, int) or max_runs < 1:
            raise ConfigError(f"max_runs must be a positive integer, got {max_runs!r}")
        if answer not in ("tool", "fenced"):
            raise ConfigError(f"answer must be 'tool' (a submit call) or 'fenced' (a ```python block), got {answer!r}")
        if not has_sandbox(sandbox):
            raise ConfigError(f"no sandbox backend {sandbox!r}; installed: {list_sandboxes()}")
        self.source = _resolve_tasks(tasks)
        self.limits = sandbox_limits or SandboxLimits(wall_time=5.0, cpu_time=5.0)
        self.sandboxes = SandboxPair(sandbox, self.limits, **dict(sandbox_options or {}))
        self.max_turns: int = max_turns
        self.attempts = attempts
        self.answer = answer
        if answer == "fenced":
            self.tools = (RUN_TOOL.schema(),)
        elif attempts > 1:  # the same tools; submit's description says a failed public test comes back
            self.tools = (RUN_TOOL.schema(), RESUBMIT_TOOL.schema())
        self.orm, self.format_gate, self.output_chars, self.max_runs = orm, format_gate, output_chars, max_runs
        self.weights = {**DEFAULT_WEIGHTS, **parse_weights(weights, COMPONENTS)}
        self.grading = grading or GradeConfig()
        self.system_prompt = system_prompt or (FENCED_SYSTEM_PROMPT if answer == "fenced" else SYSTEM_PROMPT)
        self.last_grade: GradeResult | None = None
        self._episode: _Episode | None = None

    # ---- demonstrations ------------------------------------------------------------------------------
    def demonstration(self, task: CodeTask | int, check: bool = True, recover: float = 0.0) -> list[Message]:
        """The reference episode of ``task`` under this env's system prompt, for SFT (see
        :func:`~agentrl_envs.code_sandbox.prompts.demonstration`).

        Args:
            task: a task, or a seed: the task a generator env draws from it (a data set env: its index).
            check: run the reference on the task's example with ``run_python`` before submitting; False
                submits at once (a one-turn episode).
            recover: the share of tasks (chosen by a hash of the task id) whose episode first submits the
                reference with one plausible slip, reads the env's feedback on it and submits the fix; that
                first attempt is context, not a training target (``weight`` 0). Needs ``attempts`` > 1.
        """
        if not isinstance(task, CodeTask):
            if isinstance(self.source, GeneratorConfig):
                task = generate_task(self.source, np.random.default_rng(int(task)))
            else:
                task = self.source[int(task)]
        if recover and self.attempts < 2:
            raise ConfigError("recovery demonstrations need attempts > 1: the env must allow a second submission")
        return demonstration(task, self.system_prompt, check=check, recover=recover, attempts=self.attempts,
                             answer=self.answer)  # fmt: skip

    # ---- episode -------------------------------------------------------------------------------------
    def _pick(self, options: Mapping[str, Any]) -> CodeTask:
        task = options.get("task")
        if isinstance(task, CodeTask):
            return task
        if isinstance(task, int) and not isinstance(task, bool):  # the task demonstration(task) solves
            if isinstance(self.source, GeneratorConfig):
                return generate_task(self.source, np.random.default_rng(task))
            return self.source[task]
        if isinstance(self.source, GeneratorConfig):
            if "task_id" in options or "task_index" in options:
                raise ConfigError("generated tasks have no index; pass options={'task': CodeTask} instead")
            return generate_task(self.source, self.np_random)
        if "task_id" in options:
            found = [t for t in self.source if t.task_id == options["task_id"]]
            if not found:
                raise ConfigError(f"no task {options['task_id']!r} among the env's {len(self.source)} tasks")
            return found[0]
        index = options.get("task_index")
        return self.source[int(index) if index is not None else int(self.np_random.integers(len(self.source)))]

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        task = self._pick(options or {})
        self._episode = _Episode(task)
        opening: list[Message] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task.prompt},
        ]
        info = {"tools": self.tool_schemas(), "task_id": task.task_id, "source": task.source,
                "difficulty": task.difficulty, "split": task.split, "demonstrated": task.demonstrated}
        return ResetResult(opening, info)

    async def aprobe(self) -> None:
        """Run a trivial program in the sandbox, so one that cannot run (bubblewrap missing, no docker engine,
        a broken image) fails before a run with its reason instead of scoring every submission 0.

        Raises:
            SandboxError: the sandbox cannot start or cannot run a program.
        """
        sandbox = await self.sandboxes.untrusted()
        result = await sandbox.exec("print('ok')", timeout=self.limits.wall_time)
        if result.stdout.strip() != "ok":
            raise SandboxError(f"the {self.sandboxes.backend} sandbox cannot run a trivial program (exit "
                               f"{result.exit_code}, signal {result.signal}): {result.stderr.strip()[:300]}")  # fmt: skip

    async def astep(self, action: str) -> StepResult:
        episode = self._episode
        if episode is None or episode.done:
            raise RuntimeError("the episode is over; call reset() first")
        episode.turn += 1
        turn = await self._play_turn(episode, action)
        episode.done = turn.final or episode.turn >= self.max_turns
        if episode.done and episode.last is None and episode.last_code is not None:
            # Out of turns after a submission its public tests turned back: that one is final after all.
            episode.last = self.last_grade = await self._grade_hidden(episode.task, episode.last_code)
        return self._result(episode, turn)

    # ---- one turn ------------------------------------------------------------------------------------
    async def _play_turn(self, episode: _Episode, action: str) -> _Turn:
        parsed = parse_tool_calls(action)
        turn = _Turn(obs=[tool_error_message(e) for e in parsed.errors], malformed=bool(parsed.errors))
        turn.calls, turn.errors = len(parsed.calls) + len(parsed.errors), len(parsed.errors)
        for call in parsed.calls:
            try:
                validate_call(call, _TOOLS)
            except ToolCallError as error:
                turn.obs.append(tool_error_message(error, call.id))
                turn.malformed = True
                turn.errors += 1
                continue
            if call.name == "run_python":
                await self._run(episode, call, turn)
            else:
                trailing = bool(_after_call(action, parsed.calls.index(call)).strip())
                await self._submit(episode, str(call.arguments["code"]), trailing, turn, call.id)
                break
        if not parsed.calls and not parsed.errors:
            block = final_code_block(action)
            if block is None:
                turn.obs.append({"role": "user", "content": _NUDGE[self.answer]})
                turn.malformed = True
            else:
                await self._submit(episode, block[0], not block[1], turn, None)
        return turn

    async def _run(self, episode: _Episode, call: ToolCall, turn: _Turn) -> None:
        if len(turn.runs) >= self.max_runs:
            text = (f"Error: at most {self.max_runs} run_python calls per turn; this one was not run. "
                    "Run it in the next turn, or submit.")
            turn.obs.append({"role": "tool", "content": text, "tool_call_id": call.id or "", "name": "run_python"})
            turn.runs.append(False)
            turn.errors += 1
            return
        code = str(call.arguments["code"])
        try:
            sandbox = await self.sandboxes.untrusted()
            result = await sandbox.exec(code, timeout=self.limits.wall_time)
            text, ok = format_run(result, self.output_chars, self.limits.wall_time), result.ok
        except SandboxError as exc:  # the sandbox failed (not the program): tell the model, keep going
            text, ok = f"Error: the sandbox failed to run the code: {exc}", False
            turn.errors += 1
        turn.obs.append({"role": "tool", "content": text, "tool_call_id": call.id or "", "name": "run_python"})
        turn.runs.append(ok)
        if self.weights["progress"] and _defines(code, episode.task.entry_point):
            graded = await grade(episode.task, code, self.sandboxes, self.grading)
            turn.progress += max(0.0, graded.share - episode.best)
            episode.best = max(episode.best, graded.share)

    async def _submit(self, episode: _Episode, code: str, trailing: bool, turn: _Turn, call_id: str | None) -> None:
        task, gated = episode.task, self.format_gate and trailing
        episode.submissions += 1
        episode.last, episode.last_code, episode.last_gated = None, code, gated
        left = min(self.attempts - episode.submissions, self.max_turns - episode.turn)
        # With public tests, a submission that fails one is not final and needs no hidden grading (what it
        # would score never counts); the hidden tests run on final submissions, or for the progress reward.
        failure = await self._public_failure(task, code, gated) if left > 0 and task.feedback is not None else None
        graded = None
        if failure is None or self.weights["progress"]:
            graded = episode.last = await self._grade_hidden(task, code)
            self.last_grade = graded
            turn.progress += max(0.0, graded.share - episode.best)
            episode.best = max(episode.best, graded.share)
            if left > 0 and task.feedback is None and (gated or not graded.all_passed):
                failure = _GATED[self.answer] if gated else f"{graded.passed}/{graded.total} hidden tests passed"
        turn.submitted, turn.grade, turn.gated, turn.final = True, graded, gated, failure is None
        if failure is not None:
            text = retry_feedback(failure, left)
        else:
            assert graded is not None
            text = f"Submitted: {graded.passed}/{graded.total} hidden tests passed ({graded.status})."
            if turn.gated:
                text += " Scored 0: nothing may follow the submission."
        message: Message = {"role": "tool", "content": text, "name": "submit"}
        if call_id is not None:
            message["tool_call_id"] = call_id
        turn.obs.append(message)

    async def _grade_hidden(self, task: CodeTask, code: str) -> GradeResult:
        graded = await grade(task, code, self.sandboxes, self.grading, hidden=self.attempts > 1)
        if graded.status in ("sandbox_error", "task_error"):
            # Not the policy's doing: the episode ends as an error (learners drop it, evaluations count it)
            # instead of scoring 0 as if the program had failed its tests.
            raise SandboxError(f"task {task.task_id}: the submission could not be graded: {graded.detail}")
        return graded

    async def _public_failure(self, task: CodeTask, code: str, gated: bool) -> str | None:
        """What the agent is told about a submission that may be retried, or None when its public tests pass."""
        if gated:
            return _GATED[self.answer]
        public = await grade_public(task, code, self.sandboxes, self.grading)
        if public is None or public.all_passed:
            return None
        if public.status in ("sandbox_error", "task_error"):
            raise SandboxError(f"task {task.task_id}: the public tests could not be run: {public.detail}")
        if public.status == "graded":
            return public.detail
        return f"{_STATUS_TEXT.get(public.status, f'the program ended with status {public.status}')}: {public.detail}"

    # ---- reward --------------------------------------------------------------------------------------
    def _result(self, episode: _Episode, turn: _Turn) -> StepResult:
        correct, ends = 0.0, episode.done
        if ends and episode.last is not None and not episode.last_gated:  # the final submission's verdict
            correct = episode.last.share if self.orm == "share" else float(episode.last.all_passed)
        if turn.submitted:
            runs = 1.0 if turn.grade is not None and turn.grade.clean else 0.0
        else:
            runs = sum(turn.runs) / len(turn.runs) if turn.runs else 0.0
        raw = {"correct": correct, "format": -1.0 if turn.malformed or turn.gated else 0.0, "runs": runs,
               "progress": turn.progress}
        reward = compose(raw, self.weights)
        passed = turn.grade is not None and turn.grade.all_passed and not turn.gated
        metrics = {"attempt": float(turn.submitted), "attempt_passed": float(passed),
                   "tool_calls": float(turn.calls), "tool_errors": float(turn.errors)}
        info: dict[str, Any] = {"reward_components": dict(reward.components), "reward_raw": dict(reward.raw),
                                "task_id": episode.task.task_id, "turn": episode.turn, "turn_metrics": metrics,
                                "attempt": episode.submissions}
        if turn.grade is not None:
            g = turn.grade
            info["grade"] = {"passed": g.passed, "total": g.total, "status": g.status, "detail": g.detail,
                             "clean": g.clean, "gated": turn.gated}
        truncated = not turn.final and episode.turn >= self.max_turns
        return StepResult(turn.obs, reward.score, turn.final, truncated, info)

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the sandboxes (idempotent)."""
        await self.sandboxes.aclose()
        await super().aclose()


@dataclass
class _Turn:
    obs: list[Message]
    malformed: bool = False
    runs: list[bool] = field(default_factory=list)
    submitted: bool = False
    gated: bool = False
    grade: GradeResult | None = None
    progress: float = 0.0
    final: bool = False  # a submission that ends the episode
    calls: int = 0
    errors: int = 0


def _after_call(action: str, index: int) -> str:
    """The text after the block of the ``index``-th well-formed call: any text, block (even a malformed one)
    or further call there follows the submission."""
    target = parse_tool_calls(action).calls[index]
    for close in re.finditer(re.escape("</tool_call>"), action):
        calls = parse_tool_calls(action[: close.end()]).calls
        if len(calls) > index and calls[index] == target:
            return action[close.end():]
    return action  # unreachable for a parsed call; the whole turn counts as trailing


def _defines(code: str, name: str) -> bool:
    try:
        tree = parse_source(code)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)
