"""Accuracy and speed of the math verifier against math-verify, side by side in one process.

Usage: ``python -m agentrl.rewards._math_bench tests/data/math_equivalence.txt``

The case file has one case per line, ``<+|-> <category> <gold> ⇔ <pred>`` (``#`` comments; ``⏎`` is a
newline). Compared, each on one core after a shared warm-up of the LaTeX parser:
math-verify's defaults (``verify(parse(gold), parse(pred))``), the same with bare answers wrapped in ``$…$``,
our rules in-process, and :class:`~agentrl.rewards.math.MathVerifier` with one worker (what callers get).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

Case = tuple[bool, str, str, str]


def load_cases(path: str | Path) -> list[Case]:
    """``(equal, category, gold, pred)`` per case line of the file."""
    cases = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        verdict, category, rest = line.split(" ", 2)
        gold, pred = rest.split("⇔")
        cases.append((verdict == "+", category, gold.strip().replace("⏎", "\n"), pred.strip().replace("⏎", "\n")))
    return cases


def _wrap(text: str) -> str:
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def _run(name: str, fn: Callable[[str, str], bool], cases: list[Case]) -> list[tuple[str, str, str]]:
    start, wrong = time.perf_counter(), []
    for equal, category, gold, pred in cases:
        if bool(fn(gold, pred)) != equal:
            wrong.append((category, gold, pred))
    seconds = time.perf_counter() - start
    accuracy = 1 - len(wrong) / len(cases)
    print(f"{name:<34} accuracy {accuracy:6.1%} ({len(cases) - len(wrong)}/{len(cases)})  "
          f"{len(cases) / seconds:7.1f} cases/s")
    return wrong


def main(argv: list[str]) -> None:
    from math_verify import parse, verify

    from agentrl.rewards import _math_equiv
    from agentrl.rewards.math import MathVerifier

    logging.disable(logging.CRITICAL)
    cases = load_cases(argv[0] if argv else "tests/data/math_equivalence.txt")
    for _, _, gold, pred in cases[:: max(1, len(cases) // 40)]:  # warm the parser for everyone alike
        verify(parse(_wrap(gold)), parse(_wrap(pred)))
    print(f"{len(cases)} cases ({sum(c[0] for c in cases)} equal, {sum(not c[0] for c in cases)} not equal)")
    _run("math-verify defaults", lambda g, p: verify(parse(g), parse(p)), cases)
    _run("math-verify, bare LaTeX in $…$", lambda g, p: verify(parse(_wrap(g)), parse(_wrap(p))), cases)
    _math_equiv._parse.cache_clear()
    _math_equiv.normalize.cache_clear()
    wrong = _run("agentrl rules, in-process", _math_equiv.equivalent, cases)
    with MathVerifier(workers=1, timeout=10.0) as verifier:
        verifier.verify("1", "1")  # start the worker outside the timing
        _run("agentrl verify(), 1 worker process", verifier.verify, cases)
        print(f"worker stats: {verifier.stats}")
    for category, gold, pred in wrong:
        print(f"  wrong [{category}] {gold!r} vs {pred[:80]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
