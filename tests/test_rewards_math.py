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
