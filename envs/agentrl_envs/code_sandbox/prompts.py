"""What the model reads in ``code-sandbox-v0``: the system prompt, the tools, tool results, demonstrations.

The env and the SFT demonstrations share these functions, so a demonstration is exactly an episode the env
would play (a test replays one and compares every message).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from agentrl.sandbox import ExecResult
from agentrl.tools import Tool, format_tool_calls
from agentrl.types import Message, ToolCall
from agentrl_envs.code_sandbox.grading import describe_failure
from agentrl_envs.code_sandbox.slips import slipped
from agentrl_envs.code_sandbox.tasks import CodeTask

__all__ = [
    "FENCED_SYSTEM_PROMPT",
    "RESUBMIT_TOOL",
    "RUN_TOOL",
    "SUBMIT_TOOL",
    "SYSTEM_PROMPT",
    "demonstration",
    "final_code_block",
    "format_run",
    "retry_feedback",
]

SYSTEM_PROMPT = (
    "You write Python functions. Test code with the run_python tool if you like; "
    "then call the submit tool with your complete program."
)
FENCED_SYSTEM_PROMPT = (
    "You write Python functions. Test code with the run_python tool if you like; "
    "then answer with your complete program in one ```python block, and nothing after it."
)
"""The system message of ``answer="fenced"``: the program is submitted as a fenced block, raw code."""


def run_python(code: str) -> str:
    """Run Python code in a sandbox; returns its exit code, stdout and stderr.

    Args:
        code: the Python source to run.
    """
    raise NotImplementedError  # only the schema is used: the env runs the code in its sandbox


def submit(code: str) -> str:
    """Submit your final program; hidden tests grade it and the episode ends.

    Args:
        code: the complete program, defining the requested function.
    """
    raise NotImplementedError  # only the schema is used: the env grades the code


RUN_TOOL = Tool.from_function(run_python)
SUBMIT_TOOL = Tool.from_function(submit)
RESUBMIT_TOOL = dataclasses.replace(
    SUBMIT_TOOL,
    description="Submit your program to the hidden tests; if it fails a public test you see how, and may fix it "
    "and submit again.",
)
"""``submit`` as an env with several attempts describes it (same name and arguments)."""


def _clip(text: str, limit: int, tail: bool = False) -> str:
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    if tail:  # the end of a traceback names the error
        return f"[{len(text) - limit} earlier characters] ...\n{text[len(text) - limit:]}"
    return f"{text[:limit]}\n... [{len(text) - limit} more characters]"


def format_run(result: ExecResult, limit: int = 1000, timeout: float = 5.0) -> str:
    """A ``run_python`` result as the model reads it: exit status, then stdout and stderr when not empty.

    Args:
        result: the sandbox's result.
        limit: characters kept of each stream: the start of stdout, the end of stderr.
        timeout: the time limit the program ran under (named when it ran out).
    """
    if result.timed_out:
        status = f"timeout after {timeout:g} s"
    elif result.exit_code is None:
        status = f"killed by signal {result.signal}"
    else:
        status = str(result.exit_code)
    parts = [f"exit code: {status}"]
    if result.stdout.strip() or result.stdout_truncated:
        parts.append("stdout:\n" + _clip(result.stdout, limit))
    if result.stderr.strip() or result.stderr_truncated:
        parts.append("stderr:\n" + _clip(result.stderr, limit, tail=True))
    return "\n".join(parts)


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def final_code_block(text: str) -> tuple[str, bool] | None:
    """The last fenced code block of ``text`` and whether nothing but whitespace follows it; None if none."""
    blocks = list(_FENCE.finditer(text))
    if not blocks:
        return None
    last = blocks[-1]
    return last.group(1), not text[last.end():].strip()


def retry_feedback(failure: str, left: int) -> str:
    """The env's answer to a submission that failed and may be retried: what failed, and attempts left."""
    return f"Submitted: not yet correct. {failure}. Fix it and submit again ({left} left)."


def _assistant(call: ToolCall) -> Message:
    return {"role": "assistant", "content": format_tool_calls([call])}


def fenced(code: str) -> str:
    """A program as a fenced python block, the ``answer="fenced"`` submission."""
    return f"```python\n{code.rstrip()}\n```"


def _submission(code: str, answer: str, reply: str | None = None) -> list[Message]:
    """The assistant's submission of ``code`` and, when ``reply`` is given, the env's answer to it."""
    if answer == "fenced":  # no call, so the env's answer has no call id
        said: Message = {"role": "assistant", "content": fenced(code)}
        answered: Message = {"role": "tool", "content": reply or "", "name": "submit"}
    else:
        said = _assistant(ToolCall("submit", {"code": code}, "call_0"))
        answered = {"role": "tool", "content": reply or "", "tool_call_id": "call_0", "name": "submit"}
    return [said] if reply is None else [said, answered]


def _recovers(task: CodeTask, share: float) -> bool:
    """Whether ``task``'s demonstration is a recovery: a stable ``share`` of task ids, by hash."""
    return int.from_bytes(hashlib.sha256(b"recover:" + task.task_id.encode()).digest()[:8], "big") / 2**64 < share


def demonstration(
    task: CodeTask, system_prompt: str = SYSTEM_PROMPT, check: bool = True, recover: float = 0.0, attempts: int = 1,
    answer: str = "tool",
) -> list[Message]:
    """A reference episode for SFT: a quick check of the reference solution with ``run_python`` (when
    ``check`` and the task has an example), then the submission of the reference (a ``submit`` call, or with
    ``answer="fenced"`` a fenced python block).

    With ``recover``, that share of tasks first submits the reference with one plausible slip that the public
    tests catch (:func:`~agentrl_envs.code_sandbox.slips.slipped`), reads the env's feedback on it, and then
    submits the reference. The slipped submission has ``weight`` 0: the model sees it as context and is not
    taught to make it.

    Args:
        task: the task to demonstrate.
        system_prompt: the system message (the env's ``system_prompt``).
        check: run the reference on the task's example before submitting. False gives a one-turn episode
            with about a third of the assistant tokens.
        recover: the share of tasks demonstrated as a recovery (chosen by a hash of the task id).
        attempts: the env's submissions per episode (the feedback says how many are left).
        answer: how a program is submitted: ``"tool"`` (a ``submit`` call) or ``"fenced"``.

    Returns:
        The messages: system, user, then assistant tool calls and the tool results the env returns.
    """
    messages: list[Message] = [{"role": "system", "content": system_prompt}, {"role": "user", "content": task.prompt}]
    if check and task.example is not None:
        code = f"{task.reference.rstrip()}\n\nprint({task.example.text()})\n"
        ran = ExecResult(exit_code=0, signal=None, stdout=task.example_stdout + "\n", stderr="")
        messages.append(_assistant(ToolCall("run_python", {"code": code}, "call_0")))
        messages.append({"role": "tool", "content": format_run(ran), "tool_call_id": "call_0", "name": "run_python"})
    slip = slipped(task) if recover and attempts > 1 and _recovers(task, recover) else None
    if slip is not None:
        failure = describe_failure(slip.call, slip.expected, got=slip.got)
        first, feedback = _submission(slip.program, answer, retry_feedback(failure, attempts - 1))
        messages += [{**first, "weight": 0}, feedback]
    messages += _submission(task.reference, answer)
    return messages
