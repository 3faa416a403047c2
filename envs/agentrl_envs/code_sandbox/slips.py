"""Plausible slips of the generated tasks' reference lines, for demonstrations that recover from a failure.

A slip is what a reader who got one clause wrong would write: the other parity, the opposite direction, the
neighbouring operation (``keep only the even numbers`` -> ``x % 2 != 0``, ``add 3`` -> ``x - 3``, ``keep the
first 2`` -> ``xs[2:]``). :func:`slipped` puts one into a task's reference and checks, on the host, that the
task's public tests catch it: the demonstration then shows the env's real feedback on that program and the
fix, and teaches the agent to read a failure and change the clause it names, not to retry at random.

Slips are keyed by the reference line's template (:data:`agentrl_envs.code_sandbox.generator.DOMAINS`); a
test checks that every key is one of the generator's lines, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from agentrl_envs.code_sandbox.tasks import CodeTask, IOTests

__all__ = ["SLIPS", "Slip", "slipped"]

SLIPS: dict[str, str] = {
    # lists
    "xs = [x for x in xs if x % 2 == 0]": "xs = [x for x in xs if x % 2 != 0]",
    "xs = [x for x in xs if x % 2 != 0]": "xs = [x for x in xs if x % 2 == 0]",
    "xs = [x for x in xs if x > 0]": "xs = [x for x in xs if x >= 0]",
    "xs = [x for x in xs if x > {k}]": "xs = [x for x in xs if x <= {k}]",
    "xs = [x + {k} for x in xs]": "xs = [x - {k} for x in xs]",
    "xs = [x * {k} for x in xs]": "xs = [x + {k} for x in xs]",
    "xs = [x * x for x in xs]": "xs = [x * 2 for x in xs]",
    "xs = [abs(x) for x in xs]": "xs = [-x for x in xs]",
    "xs = xs[::-1]": "xs = sorted(xs)",
    "xs = sorted(xs)": "xs = sorted(xs, reverse=True)",
    "xs = xs[:{k}]": "xs = xs[{k}:]",
    "xs = xs[{k}:]": "xs = xs[:{k}]",
    "return sum(xs)": "return len(xs)",
    "return len(xs)": "return sum(xs)",
    "return max(xs) if xs else 0": "return min(xs) if xs else 0",
    "return xs[0] if xs else -1": "return xs[-1] if xs else -1",
    # integers
    "n = n + {k}": "n = n - {k}",
    "n = n - {k}": "n = n + {k}",
    "n = n * {k}": "n = n + {k}",
    "n = n * n": "n = n * 2",
    "n = abs(n)": "n = -n",
    "n = -n": "n = abs(n)",
    "n = n // {k}": "n = n % {k}",
    "n = n % {k}": "n = n // {k}",
    "return n % 2 == 0": "return n % 2 != 0",
    "return n > 0": "return n >= 0",
    "return len(str(abs(n)))": "return len(str(n))",
    "return sum(int(d) for d in str(abs(n)))": "return len(str(abs(n)))",
    # strings
    "s = s.upper()": "s = s.capitalize()",
    's = s.replace(" ", "")': "s = s.strip()",
    's = "".join(c for c in s if c not in "aeiou")': 's = "".join(c for c in s if c in "aeiou")',
    "s = s[:{k}]": "s = s[{k}:]",
    "s = s + s": "s = s + s[::-1]",
    "return len(s)": 'return len(s.replace(" ", ""))',
    'return sum(1 for c in s if c in "aeiou")': 'return sum(1 for c in s if c not in "aeiou")',
}
"""Reference line template (as in the generator, ``{k}`` a parameter) -> the slip of the same parameters."""


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{k\}", r"(?P<k>-?\d+)") + "$")


_PATTERNS = [(_pattern(template), slip) for template, slip in SLIPS.items()]


@dataclass(frozen=True)
class Slip:
    """A reference with one line slipped, and how the first public test it fails reads.

    Attributes:
        program: the slipped program.
        call: the failing public test's call, e.g. ``solve([1, 2])``.
        expected: what the reference returns there.
        got: what the slipped program returns there.
    """

    program: str
    call: Any
    expected: Any
    got: Any


def _slip_line(line: str) -> str | None:
    for pattern, slip in _PATTERNS:
        found = pattern.match(line.strip())
        if found:
            return slip.format(**found.groupdict())
    return None


def _first_failure(program: str, entry: str, tests: IOTests) -> tuple[Any, Any, Any] | None:
    namespace: dict[str, Any] = {}
    exec(compile(program, "<slip>", "exec"), namespace)  # our own generated code, never a submission
    for call, expected in zip(tests.calls, tests.expected, strict=True):
        try:
            got = namespace[entry](*call.args, **call.kwargs)
        except Exception:  # a raising slip reads differently in the sandbox; skip it
            return None
        if repr(got) != repr(expected):
            return call, expected, got
    return None


def slipped(task: CodeTask) -> Slip | None:
    """The task's reference with one slipped line that its public tests catch, or None (no public tests, no
    line with a slip, or no slip they catch). Which line is tried first is fixed by a hash of the task id."""
    if task.feedback is None:
        return None
    lines = task.reference.splitlines()
    candidates = [i for i, line in enumerate(lines) if _slip_line(line) is not None]
    if not candidates:
        return None
    start = int.from_bytes(hashlib.sha256(task.task_id.encode()).digest()[:4], "big") % len(candidates)
    for i in candidates[start:] + candidates[:start]:
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        program = "\n".join([*lines[:i], indent + str(_slip_line(lines[i])), *lines[i + 1 :]]) + "\n"
        failure = _first_failure(program, task.entry_point, task.feedback)
        if failure is not None:
            return Slip(program, *failure)
    return None
