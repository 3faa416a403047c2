"""The math verifier: accuracy on our answer-equivalence cases, worker isolation, timeouts, extraction."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agentrl.rewards._math_bench import load_cases
from agentrl.rewards.answers import (
    extract_answer,
    extract_answer_tag,
    extract_boxed,
    extract_final_number,
    extract_hashes,
)
from agentrl.rewards.math import MathVerifier, verify

CASES = Path(__file__).parent / "data" / "math_equivalence.txt"
REGRESSION = Path(__file__).parent / "data" / "math_regression.txt"


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(workers=2, timeout=10.0) as v:
        yield v


def test_the_case_file_is_large_and_balanced():
    cases = load_cases(CASES)
    verdicts = Counter(equal for equal, *_ in cases)
    assert len(cases) >= 500 and verdicts[False] >= 200 and verdicts[True] >= 300
    assert len({category for _, category, *_ in cases}) >= 25


@pytest.mark.slow
def test_accuracy_on_our_answer_equivalence_cases(verifier):
    cases = load_cases(CASES)
    results = verifier.verify_many([(gold, pred) for _, _, gold, pred in cases])
    wrong = [(c, g, p) for (equal, c, g, p), r in zip(cases, results, strict=True) if r != equal]
    accuracy = 1 - len(wrong) / len(cases)
    assert accuracy >= 0.98, wrong
    # saying True to everything, or False, scores far lower: the file is not one-sided
    assert verifier.stats.timeouts == 0 and verifier.stats.errors == 0


def test_the_regression_file_is_built_by_its_script_and_covers_every_class():
    import runpy

    build = runpy.run_path(str(REGRESSION.with_name("math_regression_build.py")))["build"]
    built = [(equal, category, gold, pred) for equal, category, gold, pred in build()]
    assert load_cases(REGRESSION) == built  # the committed file is what the script writes
    verdicts = Counter(equal for equal, *_ in built)
    assert len(built) >= 1000 and verdicts[False] >= 400 and verdicts[True] >= 400
    classes = {"boxes", "prose", "lang", "choice", "lhs", "grouping", "roots", "trap"}
    assert classes <= {category for _, category, *_ in built}


@pytest.mark.slow
def test_regression_set_accuracy_and_no_false_positive(verifier):
    cases = load_cases(REGRESSION)
    results = verifier.verify_many([(gold, pred) for _, _, gold, pred in cases])
    false_pos = [(c, g, p) for (equal, c, g, p), r in zip(cases, results, strict=True) if r and not equal]
    false_neg = [(c, g, p) for (equal, c, g, p), r in zip(cases, results, strict=True) if equal and not r]
    assert not false_pos  # a wrong answer paid is the one error a policy learns to exploit
    assert len(false_neg) / len(cases) <= 0.01, false_neg


def test_verify_is_correct_from_threads_off_the_main_thread(verifier):
    pairs = [("\\frac{1}{2}", "0.5", True), ("2x+2", "2(x+1)", True), ("(1,2]", "(1,2)", False), ("42", "41", False)]
    results: dict[int, bool] = {}

    def run(i: int, gold: str, pred: str) -> None:
        results[i] = verifier.verify(gold, pred)

    threads = [threading.Thread(target=run, args=(i, g, p)) for i, (g, p, _) in enumerate(pairs * 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(threads))] == [want for *_, want in pairs * 3]


def test_module_level_verify_and_bad_input():
    assert verify("\\boxed{10}", "Therefore the total is $\\boxed{10}$.") is True
    assert verify("10", "") is False
    assert verify("10", None) is False  # type: ignore[arg-type]


def test_a_slow_comparison_times_out_as_not_equal_and_the_worker_keeps_serving():
    with MathVerifier(workers=1, timeout=1.0) as v:
        assert v.verify("1", "1") is True  # start the worker outside the timed call
        start = time.monotonic()
        assert v.verify("1", "2^{2^{2^{2^{2^{2^{2}}}}}}") is False  # sympy would work on this for hours
        assert time.monotonic() - start < 3.0
        assert v.stats.timeouts == 1
        assert v.verify("3", "3.0") is True


def test_a_stuck_worker_is_killed_at_the_hard_deadline_and_replaced():
    with MathVerifier(workers=1, timeout=1.0) as v:
        assert v.verify("1", "1") is True
        (worker,) = v._all
        os.kill(worker.proc.pid, signal.SIGSTOP)  # frozen: no signal handler of its own can run
        start = time.monotonic()
        assert v.verify("2", "2") is False
        assert 0.9 < time.monotonic() - start < 3.0
        assert worker.proc.poll() is not None  # killed, not leaked
        assert v.verify("2", "2") is True
        assert v.stats.timeouts == 1 and v.stats.restarts == 1


def test_a_worker_that_died_while_idle_is_replaced_transparently():
    with MathVerifier(workers=1) as v:
        assert v.verify("1", "1") is True
        (worker,) = v._all
        worker.proc.kill()
        worker.proc.wait()
        assert v.verify("1/4", "0.25") is True
        assert v.stats.crashes == 1
    assert not v._all  # close() stopped every worker


def test_extraction_helpers():
    assert extract_boxed("so $\\boxed{\\frac{1}{2}}$ and") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("\\boxed 6.") == "6."
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_answer_tag("<answer>3</answer> <answer> 4 </answer>") == "4"
    assert extract_hashes("work\n#### 1,000\n") == "1,000"
    assert extract_final_number("costs $1,234.50 in 2024") == "2024"
    assert extract_final_number("it is -3/4.") == "-3/4"
    assert extract_final_number("no digits") is None
    assert extract_answer("<answer>7</answer> and \\boxed{8}") == "8"  # boxed comes first under "any"
    assert extract_answer("x = 5", "number") == "5"
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_answer("5", "latex")


# ---- failure classes of answers written elsewhere: parse, then compare (in-process rules) ------------------
from agentrl.rewards._math_equiv import equivalent  # noqa: E402

CLASS_CASES = {
    "several_boxes": [
        ("1, 2", "so $x = \\boxed{1}$ and $x = \\boxed{2}$", True),
        ("\\{3, 5\\}", "\\boxed{3}, \\boxed{5}", True),
        ("1, 2", "\\boxed{1}\\boxed{2}", True),
        ("2", "first \\boxed{1}, then we find more.\n\nFinally $\\boxed{2}$", True),
        ("1, 2", "\\boxed{1} \\boxed{3}", False),
        ("1", "\\boxed{1}\\boxed{2}", False),
    ],
    "prose": [
        ("-3.5", "Final answer: -3.5", True),
        ("-3.5", "**Final Answer:** $-3.5$", True),
        ("12", "We add them and get 12.", True),
        ("7", "The value is 7. ", True),
        ("9", "Trying $\\boxed{4}$ fails. The final answer is 9.", True),
        ("4", "Trying $\\boxed{4}$ fails. The final answer is 9.", False),
        ("6", "Final answer: 6.5", False),
        ("6.5", "The answer is 6. 5 apples remain.", False),
        ("5", "I think it's 5.", True),
        ("12", "The total cost is $\\$12$.", True),  # an escaped dollar opens no math
        ("(1, 2)", "The point is (1, 2).", True),
        ("2", "The point is (1, 2).", False),
    ],
    "lhs_inside_subscript": [
        ("\\sum_{k=0}^{n} k^2", "\\sum_{k=1}^{n} k^3", False),
        ("\\lim_{x=0} f", "g", False),
        ("\\sum_{i=1}^{n} i", "\\sum_{i=1}^{n} i", True),
        ("x_{n=1}", "5", False),
        ("y = 2x + 1", "2x+1", True),
    ],
    "grouping": [
        ("32349", "32, 349", False),
        ("32, 349", "32349", False),
        ("(32, 349)", "32,349", False),
        ("32349", "32,349", True),
        ("1000", "1 000", True),
        ("1000.99", "1000,99", True),
        ("2.74", "2,74", True),
        ("2.74", "2,75", False),
        ("1000", "1,000.5", False),
        ("1, 2", "1,2", True),
        ("1.2", "1, 2", False),
        ("1234567", "1 234 567", True),
        ("1234567", "1,234,567", True),
        ("1234567", "1,23,4567", False),
    ],
    "roots": [
        ("2", "\\sqrt[3]8", True),
        ("\\sqrt[3]{8}", "\\sqrt[3]8", True),
        ("2", "\\sqrt[3]9", False),
        ("\\sqrt{8}", "\\sqrt[3]8", False),
        ("2\\sqrt2", "\\sqrt8", True),
    ],
    "choice": [
        ("C", "The correct option is (C).", True),
        ("(C)", "Answer: C", True),
        ("C", "After checking each option, the answer is **C**.", True),
        ("B", "The correct option is (C).", False),
        ("C", "A train leaves at noon; so the answer is (D).", False),
        ("C", "\\boxed{C}", True),
        ("C", "\\boxed{\\text{(C)}}", True),
        ("D", "\\boxed{A}", False),
    ],
    "languages": [
        ("5", "La respuesta es 5.", True),
        ("5", "Die Antwort ist 5.", True),
        ("5", "La réponse finale est 5.", True),
        ("5", "答案是 5。", True),
        ("5", "Ответ: 5", True),
        ("5", "A resposta é 6.", False),
        ("\\frac{1}{2}", "最终答案：$\\frac{1}{2}$", True),
    ],
}


@pytest.mark.parametrize(
    "case", [(cls, *case) for cls, cases in CLASS_CASES.items() for case in cases], ids=lambda c: c[0]
)
def test_failure_classes(case):
    _, gold, pred, want = case
    assert equivalent(gold, pred) is want


@pytest.mark.parametrize(
    ("gold", "pred", "want"),
    [
        ("C", "I pick C.", True),
        ("C", "C) 42", True),
        ("C", "(c)", True),
        ("C", "Option C is wrong; B is right.", False),  # two letters named: never paid
        ("C", "A or C", False),
        ("C", "42", False),
        ("(B) 12", "B", True),
        ("B", "Antwort: B", True),
        ("B", "答案是B", True),
    ],
)
def test_explicit_choice_mode(gold, pred, want):
    assert equivalent(gold, pred, mode="choice") is want


@pytest.mark.parametrize(
    ("gold", "pred", "want"),
    [
        ("2^{100}", "2^{100}+1", False),  # floats cannot tell these apart: sympy decides
        ("1234567", "1234567.5", False),  # a decimal stands for what it rounds to, no more
        ("\\frac13", "0.333333", True),
        ("\\frac13", "0.33", False),
        ("\\sqrt2", "1.414214", True),
        ("\\sqrt2", "1.41", False),
        ("(x-1)(x+1)", "x^2-1", True),
        ("(x-1)(x+1)", "x^2+1", False),
        ("(1, 2)", "(2, 1)", False),
        ("(1, 2)", "[1, 2]", False),
        ("\\{1, 2\\}", "2, 1", True),
        ("(3, 4)", "34", False),
        ("2^10", "1024", True),  # ambiguous to the fast layer; math-verify reads it as 2^{10}
        ("e^{2}", "2e", False),
        ("\\tan^2 y+1", "\\sec^2 y", True),
        ("\\tan^2 y+1", "\\cos^2 y", False),
        ("3", "\\log_2 8", True),
        ("\\begin{pmatrix}1 \\\\ 2\\end{pmatrix}", "\\begin{pmatrix}1 & 2\\end{pmatrix}", False),  # a column is no row
        ("\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}", "\\left[\\begin{array}{cc}1 & 0\\\\0 & 1\\end{array}\\right]", True),
        ("1, 3", "2\\frac{1}{2}, 3", False),  # a mixed number, never 2 x 1/2
        ("2", "\\sqrt12", False),  # \sqrt{1}2 to LaTeX, \sqrt{12} to its writer: paid only if right under both
        ("2\\sqrt{3}", "\\sqrt12", False),
        ("4", "\\sqrt16", False),
        ("2", "\\sqrt[3]8", True),  # one digit: one reading
        ("\\sum_{k=1}^{n} k", "\\frac{n(n+1)}{2}", True),
        ("\\sum_{k=1}^{n} (k^2 + 3)", "\\sum_{k=2}^{n} (k^2 + 3)", False),
        ("\\sum_{i=1}^{8} i", "36", True),  # the index i is no imaginary unit
        ("\\sqrt{2}", "sqrt(2)", True),  # plain words go to math-verify, never read as s*q*r*t
        ("\\frac{1}{2}", "\\frac{1}{2} + 10^{-13}", False),  # below float noise: sympy decides
        ("\\sqrt{2}", "\\sqrt{2} + 0.0000000000001", False),
        ("(-\\infty, 3]", "x \\le 3", True),
        ("(-\\infty, 3]", "x < 3", False),
        ("[2, 5)", "2 \\le x < 5", True),
        ("[3, \\infty)", "x > 3", False),
    ],
)
def test_the_exact_layer_and_its_limits(gold, pred, want):
    assert equivalent(gold, pred) is want


@pytest.mark.parametrize(
    ("gold", "pred", "decimal", "want"),
    [
        ("1.5", "1,5", "comma", True),
        ("1000", "1.000", "comma", True),
        ("1234.5", "1.234,5", "comma", True),
        ("1234.5", "1 234,5", "comma", True),
        ("1", "1,000", "comma", True),
        ("1000", "1,000", "comma", False),
        ("1000", "1,000", "point", True),
        ("2.74", "2,74", "point", False),
        ("1000.99", "1000,99", "point", False),
        ("1, 5", "1,5", "point", True),
    ],
)
def test_locale_number_modes(gold, pred, decimal, want):
    assert equivalent(gold, pred, decimal=decimal) is want


def test_options_reach_the_worker_and_bad_options_name_the_fix(verifier):
    assert verifier.verify("1.5", "1,5", decimal="comma") is True
    assert verifier.verify("1.5", "1,5", decimal="point") is False
    assert verifier.verify("B", "So I choose B.", mode="choice") is True
    from agentrl.errors import ConfigError

    with pytest.raises(ConfigError, match="decimal"):
        verifier.verify("1", "1", decimal="dot")
    with pytest.raises(ConfigError, match="mode"):
        verifier.verify("1", "1", mode="letters")
