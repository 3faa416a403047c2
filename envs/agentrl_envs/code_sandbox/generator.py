"""A procedural generator of small function-writing tasks with hidden tests, graded in difficulty.

A task is a *domain* (a list of integers, an integer, or a string), a chain of 1–3 transformation clauses
and a final clause, e.g. "keep only the even numbers, then add 3 to every number, then return the sum".
The reference solution has one line per clause; the hidden tests are random inputs whose expected outputs
come from running the reference (on the host: it is our own code). A task whose tests would pass a constant
function, or the program with one of its transformation clauses left out, is drawn again: every clause is
one the tests check.

Every clause has two phrasings. SFT demonstrations use only the first (``demonstrated``); RL prompts and
evaluation mix in the second, so what RL adds cannot be had by training SFT longer. Difficulty is the
number of transformation clauses.

Splits never share a *function*: whether a task is ``train`` or ``eval`` is decided by a hash of its
semantics (domain, clauses, parameters), whatever the phrasing, so no evaluation function is ever shown
in training under another wording. Tasks are reproducible from a seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentrl.errors import ConfigError
from agentrl_envs.code_sandbox.tasks import Call, CodeTask, IOTests

__all__ = ["PRESETS", "Clause", "GeneratorConfig", "generate_task", "generate_tasks", "split_of"]

ENTRY = "solve"


@dataclass(frozen=True)
class Clause:
    """One step of a task: its two phrasings and its line of code; ``{k}`` etc. are filled from ``params``.

    Attributes:
        key: a stable id, e.g. ``"keep_even"``.
        phrasings: (demonstrated, undemonstrated) wordings.
        code: the reference line (a transformation assigns the variable; a final clause returns).
        params: the parameter ranges, e.g. ``{"k": (1, 5)}`` (inclusive).
    """

    key: str
    phrasings: tuple[str, str]
    code: str
    params: tuple[tuple[str, int, int], ...] = ()


def _c(key: str, a: str, b: str, code: str, *params: tuple[str, int, int]) -> Clause:
    return Clause(key, (a, b), code, params)


K = ("k", 1, 5)
K2 = ("k", 2, 5)
LIST_STEPS = (
    _c("keep_even", "keep only the even numbers", "drop the odd numbers", "xs = [x for x in xs if x % 2 == 0]"),
    _c("keep_odd", "keep only the odd numbers", "drop the even numbers", "xs = [x for x in xs if x % 2 != 0]"),
    _c("keep_pos", "keep only the positive numbers", "remove every number that is zero or less",
       "xs = [x for x in xs if x > 0]"),
    _c("keep_gt", "keep only the numbers greater than {k}", "remove every number that is at most {k}",
       "xs = [x for x in xs if x > {k}]", K),
    _c("add", "add {k} to every number", "increase each element by {k}", "xs = [x + {k} for x in xs]", K),
    _c("mul", "multiply every number by {k}", "scale each element by a factor of {k}", "xs = [x * {k} for x in xs]", K2),
    _c("square", "square every number", "replace each element by its square", "xs = [x * x for x in xs]"),
    _c("abs", "take the absolute value of every number", "drop the sign of each element",
       "xs = [abs(x) for x in xs]"),
    _c("reverse", "reverse the list", "put the elements in the opposite order", "xs = xs[::-1]"),
    _c("sort", "sort the list in ascending order", "arrange the elements from smallest to largest", "xs = sorted(xs)"),
    _c("take", "keep the first {k} numbers", "drop everything after the first {k} elements", "xs = xs[:{k}]", K),
    _c("drop", "remove the first {k} numbers", "skip the first {k} elements", "xs = xs[{k}:]", K),
)
LIST_FINALS = (
    _c("list", "return the list", "give back the resulting list", "return xs"),
    _c("sum", "return the sum", "return the total of the elements", "return sum(xs)"),
    _c("len", "return how many numbers are left", "return the number of elements", "return len(xs)"),
    _c("max", "return the largest number, or 0 if there is none", "return the maximum element (0 for an empty list)",
       "return max(xs) if xs else 0"),
    _c("first", "return the first number, or -1 if there is none", "return the element at the front (-1 if empty)",
       "return xs[0] if xs else -1"),
)
INT_STEPS = (
    _c("add", "add {k}", "increase it by {k}", "n = n + {k}", K),
    _c("sub", "subtract {k}", "decrease it by {k}", "n = n - {k}", K),
    _c("mul", "multiply it by {k}", "scale it by a factor of {k}", "n = n * {k}", K2),
    _c("square", "square it", "raise it to the power of two", "n = n * n"),
    _c("abs", "take its absolute value", "drop its sign", "n = abs(n)"),
    _c("neg", "negate it", "flip its sign", "n = -n"),
    _c("div", "divide it by {k}, rounding down", "floor-divide it by {k}", "n = n // {k}", K2),
    _c("mod", "take the remainder after dividing by {k}", "reduce it modulo {k}", "n = n % {k}", K2),
)
INT_FINALS = (
    _c("it", "return it", "return the result", "return n"),
    _c("even", "return whether it is even", "return True if it is divisible by 2, else False", "return n % 2 == 0"),
    _c("pos", "return whether it is positive", "return True if it is greater than zero, else False", "return n > 0"),
    _c("digits", "return how many digits it has", "return the number of decimal digits of its absolute value",
       "return len(str(abs(n)))"),
    _c("digsum", "return the sum of its digits", "return the digit sum of its absolute value",
       "return sum(int(d) for d in str(abs(n)))"),
)
STR_STEPS = (
    _c("upper", "convert it to uppercase", "make every letter a capital letter", "s = s.upper()"),
    _c("reverse", "reverse it", "write it backwards", "s = s[::-1]"),
    _c("nospace", "remove the spaces", "delete every space character", 's = s.replace(" ", "")'),
    _c("novowel", "remove the vowels", "delete every a, e, i, o and u", 's = "".join(c for c in s if c not in "aeiou")'),
    _c("take", "keep the first {k} characters", "cut it after {k} characters", "s = s[:{k}]", K),
    _c("double", "repeat it twice", "append a copy of it to itself", "s = s + s"),
)
STR_FINALS = (
    _c("it", "return it", "return the resulting string", "return s"),
    _c("len", "return its length", "return how many characters it has", "return len(s)"),
    _c("vowels", "return the number of vowels", "return how many of its characters are a, e, i, o or u",
       'return sum(1 for c in s if c in "aeiou")'),
    _c("palin", "return whether it is a palindrome", "return True if it reads the same backwards, else False",
       "return s == s[::-1]"),
)


@dataclass(frozen=True)
class Domain:
    name: str
    var: str
    described: str
    steps: tuple[Clause, ...]
    finals: tuple[Clause, ...]


DOMAINS = (
    Domain("list", "xs", "a list of integers `xs`", LIST_STEPS, LIST_FINALS),
    Domain("int", "n", "an integer `n`", INT_STEPS, INT_FINALS),
    Domain("str", "s", "a string `s` of lowercase letters and spaces", STR_STEPS, STR_FINALS),
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Which tasks to draw.

    Attributes:
        split: ``"train"`` or ``"eval"``.
        depths: the numbers of transformation clauses to draw from (uniformly).
        alt_share: the probability that a clause uses its undemonstrated phrasing (0 for SFT data).
        tests: hidden tests per task.
        public_tests: public tests per task (:attr:`CodeTask.feedback`): inputs apart from the hidden tests,
            drawn from the task's own seed, so adding them changes no other draw.
        eval_share: the share of functions that belong to the eval split.
        domains: the domains to draw from.
        every_clause_tested: draw again when the program with one transformation clause left out passes every
            hidden test ("sort the list, then return the sum"; "add 4, then return whether it is positive" on
            inputs none of which lies in -3..0): otherwise a policy is rewarded for skipping clauses, and
            learns to skip them where they matter.
    """

    split: str = "train"
    depths: tuple[int, ...] = (1, 2)
    alt_share: float = 0.8
    tests: int = 5
    public_tests: int = 3
    eval_share: float = 0.2
    domains: tuple[str, ...] = ("list", "int", "str")
    every_clause_tested: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ConfigError(f"GeneratorConfig.split must be 'train' or 'eval', got {self.split!r}")
        if not self.depths or not all(isinstance(d, int) and 1 <= d <= 3 for d in self.depths):
            raise ConfigError(f"GeneratorConfig.depths must be clause counts in 1..3, got {self.depths!r}")
        if not 0.0 <= self.alt_share <= 1.0 or not 0.0 < self.eval_share < 1.0:
            raise ConfigError("GeneratorConfig.alt_share must be in [0, 1] and eval_share in (0, 1)")
        if self.tests < 1 or self.public_tests < 0:
            raise ConfigError("GeneratorConfig.tests must be at least 1 and public_tests at least 0")
        unknown = set(self.domains) - {d.name for d in DOMAINS}
        if unknown or not self.domains:
            raise ConfigError(f"unknown domains {sorted(unknown)}; choose from {[d.name for d in DOMAINS]}")


PRESETS: dict[str, GeneratorConfig] = {
    "sft": GeneratorConfig(split="train", depths=(1, 2, 3), alt_share=0.0),
    "rl": GeneratorConfig(split="train", depths=(1, 2), alt_share=0.8),
    "eval": GeneratorConfig(split="eval", depths=(1, 2, 3), alt_share=0.4),
}
"""``sft``: demonstrated phrasings only; ``rl``: mostly undemonstrated phrasings at depth 1–2, where a model
after SFT is partly right; ``eval``: the held-out functions, depth 1–3, 40% undemonstrated phrasings."""


def split_of(semantic_key: str, eval_share: float) -> str:
    """``"eval"`` for a stable ``eval_share`` of semantic keys, ``"train"`` for the rest."""
    digest = int.from_bytes(hashlib.sha256(semantic_key.encode()).digest()[:8], "big")
    return "eval" if digest / 2**64 < eval_share else "train"


def _random_input(domain: Domain, rng: np.random.Generator) -> Any:
    if domain.name == "list":
        return [int(v) for v in rng.integers(-9, 10, size=int(rng.integers(0, 9)))]
    if domain.name == "int":
        return int(rng.integers(-50, 51))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz    aeiou"))
    return "".join(rng.choice(letters, size=int(rng.integers(0, 11))))


def _draw_clause(pool: Sequence[Clause], rng: np.random.Generator, alt_share: float) -> tuple[Clause, dict, int]:
    clause = pool[int(rng.integers(len(pool)))]
    params = {name: int(rng.integers(lo, hi + 1)) for name, lo, hi in clause.params}
    return clause, params, int(rng.random() < alt_share)


def _reference(domain: Domain, lines: list[str]) -> str:
    body = "".join(f"    {line}\n" for line in lines)
    return f"def {ENTRY}({domain.var}):\n{body}"


def _run_reference(code: str, inputs: Sequence[Any]) -> list[Any]:
    namespace: dict[str, Any] = {}
    exec(compile(code, "<reference>", "exec"), namespace)  # our own generated code, never a submission
    return [namespace[ENTRY](value) for value in inputs]


def _clause_untested(task: CodeTask) -> bool:
    """Whether the reference with one transformation line left out still passes every hidden test."""
    if not isinstance(task.tests, IOTests):
        return False
    head, *body = task.reference.splitlines()
    inputs = [call.args[0] for call in task.tests.calls]
    for i in range(len(body) - 1):  # the last line is the final clause
        shorter = "\n".join([head, *body[:i], *body[i + 1 :]]) + "\n"
        try:
            outputs = _run_reference(shorter, inputs)
        except Exception:  # a program that raises fails the tests
            continue
        if repr(outputs) == repr(list(task.tests.expected)):
            return True
    return False


def _draw_shape(config: GeneratorConfig, rng: np.random.Generator) -> tuple[Domain, int]:
    name = config.domains[int(rng.integers(len(config.domains)))]
    domain = next(d for d in DOMAINS if d.name == name)
    return domain, config.depths[int(rng.integers(len(config.depths)))]


def _draw_chain(
    config: GeneratorConfig, rng: np.random.Generator, domain: Domain, depth: int
) -> list[tuple[Clause, dict, int]]:
    chosen: list[tuple[Clause, dict, int]] = []
    while len(chosen) < depth:
        step = _draw_clause(domain.steps, rng, config.alt_share)
        if not chosen or chosen[-1][0].key != step[0].key:  # "reverse it, then reverse it" teaches nothing
            chosen.append(step)
    chosen.append(_draw_clause(domain.finals, rng, config.alt_share))
    return chosen


def _build(config: GeneratorConfig, rng: np.random.Generator, domain: Domain, chosen: list, semantic: str) -> CodeTask:
    phrases = [c.phrasings[alt].format(**p) for c, p, alt in chosen]
    text = ", then ".join(phrases)
    prompt = (f"Write a Python function `{ENTRY}({domain.var})` that takes {domain.described}. "
              f"{text[0].upper()}{text[1:]}.")
    reference = _reference(domain, [c.code.format(**p) for c, p, _ in chosen])
    inputs = [_random_input(domain, rng) for _ in range(config.tests + 1)]
    outputs = _run_reference(reference, inputs)
    alts = "".join(str(alt) for _, _, alt in chosen)
    task_id = f"gen/{semantic}/{alts}"
    return CodeTask(
        task_id=task_id,
        prompt=prompt,
        entry_point=ENTRY,
        reference=reference,
        tests=IOTests(tuple(Call(ENTRY, (v,)) for v in inputs[1:]), tuple(outputs[1:])),
        source="generated",
        difficulty=len(chosen) - 1,
        split=config.split,
        demonstrated="1" not in alts,
        example=Call(ENTRY, (inputs[0],)),
        example_stdout=str(outputs[0]),
        feedback=_public_tests(domain, reference, task_id, inputs, config.public_tests),
    )


def _public_tests(domain: Domain, reference: str, task_id: str, hidden: list[Any], n: int) -> IOTests | None:
    """``n`` public tests: inputs drawn from the task id's own seed (the main stream is untouched), none
    equal to a hidden test's input (or the example's), so what the agent is shown never reveals a hidden test."""
    if n == 0:
        return None
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big"))
    taken, inputs = {repr(v) for v in hidden}, list[Any]()
    for _ in range(50 * n):
        value = _random_input(domain, rng)
        if repr(value) not in taken:
            taken.add(repr(value))
            inputs.append(value)
            if len(inputs) == n:
                break
    if not inputs:
        return None
    return IOTests(tuple(Call(ENTRY, (v,)) for v in inputs), tuple(_run_reference(reference, inputs)))


def generate_task(config: GeneratorConfig, rng: np.random.Generator, max_tries: int = 1000) -> CodeTask:
    """Draw one task of ``config.split``: its domain and depth, then clauses until a function of the split
    whose tests check every clause comes up (so rejected draws do not shift the mix of domains and depths).

    Raises:
        ConfigError: no task of the split came up in ``max_tries`` draws (an ``eval_share`` near 0 or 1).
    """
    domain, depth = _draw_shape(config, rng)
    for _ in range(max_tries):
        chosen = _draw_chain(config, rng, domain, depth)
        semantic = f"{domain.name}/" + "-".join(c.key + "".join(map(str, p.values())) for c, p, _ in chosen)
        if split_of(semantic, config.eval_share) != config.split:
            continue
        task = _build(config, rng, domain, chosen, semantic)
        # One output for every hidden test would let a constant function pass, and a clause the tests do not
        # check would let a program that skips it pass: draw again.
        expected = task.tests.expected if isinstance(task.tests, IOTests) else ()
        if len({repr(v) for v in expected}) > 1 and not (config.every_clause_tested and _clause_untested(task)):
            return task
    raise ConfigError(f"no {config.split!r} task in {max_tries} draws; check GeneratorConfig.eval_share")


def generate_tasks(n: int, seed: int, config: GeneratorConfig | str = "rl") -> list[CodeTask]:
    """``n`` tasks drawn reproducibly from ``seed``; ``config`` is a :class:`GeneratorConfig` or a preset name.

    Raises:
        ConfigError: an unknown preset name.
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown task preset {config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[config]
    rng = np.random.default_rng(seed)
    return [generate_task(config, rng) for _ in range(n)]
