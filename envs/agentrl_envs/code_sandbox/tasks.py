"""Task records for ``code-sandbox-v0``: what to write, and the hidden tests that grade it.

Two kinds of hidden tests:

- :class:`IOTests`: calls with inputs and the expected outputs, known on the host (generated tasks). The
  host compares the submission's outputs itself.
- :class:`AssertTests`: assertion code (HumanEval's ``check(candidate)``, MBPP's ``assert`` lines). The code
  runs in a separate, trusted sandbox against a replay of the submission's outputs; see
  :mod:`agentrl_envs.code_sandbox.grading`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["AssertTests", "Call", "CodeTask", "IOTests", "parse_source"]


def parse_source(code: str) -> ast.Module:
    """``ast.parse`` without warnings: data sets and models write regexes like ``"\\w"`` in plain strings.

    Raises:
        SyntaxError: ``code`` is not valid Python.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(code)


@dataclass(frozen=True)
class Call:
    """One call of the function under test.

    Attributes:
        name: the function's name.
        args: positional arguments (plain data).
        kwargs: keyword arguments (plain data).
    """

    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The call as Python source, e.g. ``solve([1, 2])``."""
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


@dataclass(frozen=True)
class IOTests:
    """Hidden tests as input/expected-output pairs; a test passes when the output is :func:`_wire.same`.

    Attributes:
        calls: the calls, one per test.
        expected: the expected return value of each call.
    """

    calls: tuple[Call, ...]
    expected: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.calls) != len(self.expected) or not self.calls:
            raise ConfigError("IOTests needs one expected value per call, and at least one call")


@dataclass(frozen=True)
class AssertTests:
    """Hidden tests as assertion code; each executed ``assert`` is one test.

    Attributes:
        setup: code run before the tests in their namespace (HumanEval's prompt with its helpers, MBPP's
            ``test_imports``); never the submission.
        tests: the assertion code: a module of ``assert`` lines, or one defining ``check(candidate)``.
        names: the functions of the submission the tests call; each is bound to a proxy.
        check: the function the tests define and that is called with the proxy of ``names[0]`` (``"check"``
            for HumanEval), or None when the module's own ``assert`` lines are the tests (MBPP).
        seed: ``random.seed`` before the tests, so randomised tests make the same calls every time.
    """

    setup: str
    tests: str
    names: tuple[str, ...]
    check: str | None = None
    seed: int = 0

    def fingerprint(self, reference: str) -> str:
        """A digest of everything that decides which calls the tests make."""
        text = json.dumps([self.setup, self.tests, list(self.names), self.check, self.seed, reference])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CodeTask:
    """One function-writing task.

    Attributes:
        task_id: unique and stable, e.g. ``gen/list/keep_even-sum/0a1b2c3d``, ``HumanEval/0``, ``MBPP/2``.
        prompt: the task as the user states it (the env adds how to use the tools).
        entry_point: the function the submission must define.
        reference: a correct program (full source); the demonstration submits it.
        tests: the hidden tests.
        source: ``"generated"``, ``"humaneval"`` or ``"mbpp"``.
        difficulty: the number of clauses for generated tasks; 0 where unknown.
        split: ``"train"`` or ``"eval"``; generated tasks of the two splits never share a function.
        demonstrated: every phrasing in the prompt is one that SFT demonstrations use.
        example: a call used by the demonstration's quick check, or None.
        example_stdout: what ``print(<example>)`` prints for the reference (without the final newline).
        preamble: code run in the submission's namespace before it (MBPP's test imports); also before the
            reference solution.
        feedback: public tests, apart from the hidden ones: with ``attempts`` > 1 the env runs a submission on
            them and shows the first failure (call, expected, got) so the agent can try again; the hidden
            tests alone decide the reward and are never shown. None: no public tests.
    """

    task_id: str
    prompt: str
    entry_point: str
    reference: str
    tests: IOTests | AssertTests
    source: str = "generated"
    difficulty: int = 0
    split: str = "eval"
    demonstrated: bool = False
    example: Call | None = None
    example_stdout: str = ""
    preamble: str = ""
    feedback: IOTests | None = None
