"""Math tasks: a procedural generator with graded difficulty, and a loader for GSM8K / MATH JSONL.

Difficulty levels of the generator (each a step up for a small model):
    0. one addition or subtraction of numbers up to 20;
    1. one multiplication up to 12 x 12, or an exact division;
    2. two operations with precedence or parentheses;
    3. a linear equation ``a*x + b = c`` with a whole-number solution;
    4. a linear equation with ``x`` on both sides;
    5. a system of two linear equations in ``x`` and ``y``; the answer is ``x``.

Every task carries its worked steps, from which the env builds a reference demonstration for SFT.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from agentrl.errors import ConfigError
from agentrl.rewards.answers import extract_boxed, extract_hashes
from agentrl.rewards.math import check_options

__all__ = ["LEVELS", "MathTask", "generate_task", "generate_tasks", "load_jsonl"]

LEVELS = 6


@dataclass(frozen=True)
class MathTask:
    """One math problem.

    Attributes:
        id: A stable name (``gen-<level>-<seed>-<i>`` or ``<file stem>-<line>``).
        question: The problem text shown to the model.
        answer: The reference final answer (checked with :func:`agentrl.rewards.math.verify`).
        difficulty: The generator level, or -1 for loaded tasks.
        steps: Worked steps as ``(text, expression)`` pairs: ``expression`` is what a calculator call would
            evaluate for the step (empty when the step needs none).
        solution: A full written solution when the source has one (MATH, GSM8K).
        answer_mode: How the answer is compared, overriding the env's: ``"math"`` or ``"choice"`` (multiple
            choice; the answer is a letter); empty for the env's.
        decimal: The decimal mark of the task's numbers, overriding the env's: ``"auto"``, ``"point"`` or
            ``"comma"``; empty for the env's.
    """

    id: str
    question: str
    answer: str
    difficulty: int = -1
    steps: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    solution: str = ""
    answer_mode: str = ""
    decimal: str = ""


def _level0(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b), [(f"{a} + {b} = {a + b}", f"{a} + {b}")]
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b), [(f"{a} - {b} = {a - b}", f"{a} - {b}")]


def _level1(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        return f"What is {a} * {b}?", str(a * b), [(f"{a} * {b} = {a * b}", f"{a} * {b}")]
    return f"What is {a * b} / {a}?", str(b), [(f"{a * b} / {a} = {b}", f"{a * b} / {a}")]


def _level2(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 9)
    if rng.random() < 0.5:
        return (f"What is {a} + {b} * {c}?", str(a + b * c),
                [(f"{b} * {c} = {b * c}", f"{b} * {c}"), (f"{a} + {b * c} = {a + b * c}", f"{a} + {b * c}")])
    return (f"What is ({a} + {b}) * {c}?", str((a + b) * c),
            [(f"{a} + {b} = {a + b}", f"{a} + {b}"), (f"{a + b} * {c} = {(a + b) * c}", f"{a + b} * {c}")])


def _level3(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    a, x, b = rng.randint(2, 9), rng.randint(-10, 10), rng.randint(-20, 20)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    return (f"Solve for x: {a}x {sign} {abs(b)} = {c}", str(x),
            [(f"{a}x = {c} - ({b}) = {c - b}", f"{c} - ({b})"), (f"x = {c - b} / {a} = {x}", f"{c - b} / {a}")])


def _level4(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    a, c = rng.sample(range(2, 10), 2)
    x, b = rng.randint(-10, 10), rng.randint(-20, 20)
    d = (a - c) * x + b
    return (f"Solve for x: {a}x + {b} = {c}x + {d}".replace("+ -", "- "), str(x),
            [(f"({a} - {c})x = {d} - ({b}), so {a - c}x = {d - b}", f"{d} - ({b})"),
             (f"x = {d - b} / {a - c} = {x}", f"{d - b} / ({a - c})")])


def _level5(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a, b, c, d = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5)
    while a * d - b * c == 0:
        d = rng.randint(1, 5)
    e, f = a * x + b * y, c * x + d * y
    question = f"Solve the system {_term(a, 'x')} + {_term(b, 'y')} = {e} and {_term(c, 'x')} + {_term(d, 'y')} = {f}. What is x?"
    det, rhs = a * d - b * c, e * d - b * f
    return (question, str(x),
            [(f"Eliminate y: ({a}*{d} - {b}*{c})x = {e}*{d} - {b}*({f}) = {rhs}", f"{e}*{d} - {b}*({f})"),
             (f"x = {rhs} / ({det}) = {x}", f"{rhs} / ({det})")])


def _term(coefficient: int, variable: str) -> str:
    return variable if coefficient == 1 else f"{coefficient}{variable}"


_GENERATORS = (_level0, _level1, _level2, _level3, _level4, _level5)


def generate_task(level: int, seed: int, index: int = 0) -> MathTask:
    """The ``index``-th task of ``level`` for ``seed``; the same arguments always give the same task.

    Raises:
        ConfigError: ``level`` outside ``0..LEVELS-1``.
    """
    if not 0 <= level < LEVELS:
        raise ConfigError(f"math task level must be in 0..{LEVELS - 1}, got {level}")
    rng = random.Random(f"{seed}-{level}-{index}")
    question, answer, steps = _GENERATORS[level](rng)
    return MathTask(f"gen-{level}-{seed}-{index}", question, answer, level, tuple(steps))


def generate_tasks(count: int, seed: int = 0, levels: Sequence[int] = tuple(range(LEVELS))) -> list[MathTask]:
    """``count`` tasks spread evenly over ``levels`` (round robin), reproducible from ``seed``.

    Raises:
        ConfigError: A level out of range, no levels, or a negative count.
    """
    if count < 0 or not levels:
        raise ConfigError(f"generate_tasks needs count >= 0 and at least one level, got {count}, {list(levels)}")
    return [generate_task(levels[i % len(levels)], seed, i) for i in range(count)]


def _record_task(record: dict[str, object], task_id: str, where: str) -> MathTask:
    task = _record_answer(record, task_id, where)
    options = {key: str(record[key]) for key in ("answer_mode", "decimal") if record.get(key)}
    try:
        check_options(options.get("answer_mode", "math"), options.get("decimal", "auto"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return replace(task, **options)


def _record_answer(record: dict[str, object], task_id: str, where: str) -> MathTask:
    if "question" in record and "answer" in record:  # GSM8K: the solution ends in "#### N"
        solution = str(record["answer"])
        answer = extract_hashes(solution) or solution.strip()
        return MathTask(task_id, str(record["question"]), answer.replace(",", ""), solution=solution)
    if "problem" in record and ("solution" in record or "answer" in record):  # MATH: \boxed{} in the solution
        solution = str(record.get("solution", ""))
        boxed = str(record["answer"]) if "answer" in record else extract_boxed(solution)
        if boxed is None:
            raise ConfigError(f"{where}: the solution has no \\boxed{{}} answer and there is no 'answer' field")
        return MathTask(task_id, str(record["problem"]), boxed, solution=solution)
    raise ConfigError(
        f"{where}: expected GSM8K fields 'question'/'answer' or MATH fields 'problem'/'solution', "
        f"got {sorted(record)}"
    )


def _records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def load_jsonl(path: str | Path, limit: int | None = None) -> list[MathTask]:
    """Load GSM8K-format (``question``, ``answer`` ending in ``#### N``) or MATH-format (``problem``,
    ``solution`` with ``\\boxed{}``, optional ``answer``) JSONL; an ``id`` field, if any, names the task, and
    ``answer_mode`` / ``decimal`` fields set the task's comparison (see :class:`MathTask`).

    Raises:
        ConfigError: The file is missing, or a line is not JSON, has neither format's fields or an unknown
            ``answer_mode`` / ``decimal`` (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"math task file {path} does not exist")
    tasks: list[MathTask] = []
    for lineno, record in _records(path):
        task_id = str(record.get("id", f"{path.stem}-{lineno}"))
        tasks.append(_record_task(record, task_id, f"{path}:{lineno}"))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks
