"""Accuracy, false positives and speed of the math verifier against math-verify, side by side in one run.

Usage: ``python -m agentrl.rewards._math_bench [CASE_FILE ...]`` (default: ``tests/data/math_regression.txt``
and ``tests/data/math_equivalence.txt``).

The case file has one case per line, ``<+|-> <category> <gold> ⇔ <pred>`` (``#`` comments; ``⏎`` is a
newline). Compared, each on one core after a shared warm-up of the LaTeX parser:
math-verify's defaults (``verify(parse(gold), parse(pred))``), the same with bare answers wrapped in ``$…$``,
our rules in-process, and :class:`~agentrl.rewards.math.MathVerifier` with one worker (what callers get).
A false positive (a wrong answer accepted: a reward paid for it) is counted apart from accuracy, since it is
the error a policy learns to exploit; FN counts the right answers refused.
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


def _run(name: str, fn: Callable[[str, str], bool], cases: list[Case]) -> list[tuple[str, str, str, str]]:
    start, wrong = time.perf_counter(), []
    for equal, category, gold, pred in cases:
        if bool(fn(gold, pred)) != equal:
            wrong.append(("FN" if equal else "FP", category, gold, pred))
    seconds = time.perf_counter() - start
    right = len(cases) - len(wrong)
    false_pos = sum(kind == "FP" for kind, *_ in wrong)
    print(f"{name:<34} accuracy {right / len(cases):6.1%} ({right}/{len(cases)})  false positives {false_pos:3d}  "
          f"false negatives {len(wrong) - false_pos:3d}  {len(cases) / seconds:7.1f} cases/s")
    return wrong


def _clear_caches() -> None:
    """Nobody starts with the parses of an earlier run: math-verify's caches and ours are emptied."""
    from math_verify import parser

    from agentrl.rewards import _math_equiv

    for cached in (parser.parse_latex_cached, parser.parse_expr_cached, parser.extract_latex,
                   _math_equiv._parse, _math_equiv.normalize):
        cached.cache_clear()


def main(argv: list[str]) -> None:
    logging.disable(logging.CRITICAL)
    paths = argv or ["tests/data/math_regression.txt", "tests/data/math_equivalence.txt"]
    for path in paths:
        print(f"== {path}")
        _compare(load_cases(path))


def _compare(cases: list[Case]) -> None:
    from math_verify import parse, verify

    from agentrl.rewards import _math_equiv
    from agentrl.rewards.math import MathVerifier

    for _, _, gold, pred in cases[:: max(1, len(cases) // 40)]:  # warm the parser for everyone alike
        verify(parse(_wrap(gold)), parse(_wrap(pred)))
    print(f"{len(cases)} cases ({sum(c[0] for c in cases)} equal, {sum(not c[0] for c in cases)} not equal)")
    _clear_caches()
    _run("math-verify defaults", lambda g, p: verify(parse(g), parse(p)), cases)
    _clear_caches()
    _run("math-verify, bare LaTeX in $…$", lambda g, p: verify(parse(_wrap(g)), parse(_wrap(p))), cases)
    _clear_caches()
    wrong = _run("agentrl rules, in-process", _math_equiv.equivalent, cases)
    _clear_caches()
    with MathVerifier(workers=1, timeout=10.0) as verifier:
        verifier.verify("1", "1")  # start the worker outside the timing
        _run("agentrl verify(), 1 worker process", verifier.verify, cases)
        print(f"worker stats: {verifier.stats}")
    for kind, category, gold, pred in wrong:
        print(f"  {kind} [{category}] {gold!r} vs {pred[:80]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
