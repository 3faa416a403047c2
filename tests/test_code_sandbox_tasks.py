"""code-sandbox tasks and grading pieces: the generator, the data set loaders, the wire codec, the graders."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.util
import json
import math
from collections import Counter, OrderedDict, namedtuple

import _datasets as datasets
import pytest
from agentrl_envs.code_sandbox import (
    PRESETS,
    AssertTests,
    CodeTask,
    GeneratorConfig,
    GradeConfig,
    SandboxPair,
    _wire,
    generate_tasks,
    grade,
    grading,
    load_tasks,
)
from agentrl_envs.code_sandbox.datasets import DATASETS_ENV, dataset_path
from agentrl_envs.code_sandbox.generator import DOMAINS
from agentrl_envs.code_sandbox.generator import _clause_untested as clause_untested
from agentrl_envs.code_sandbox.grading import rewrite_asserts

from agentrl.errors import ConfigError


def _function(task: CodeTask) -> str:
    return task.task_id.rsplit("/", 1)[0]  # the id without the phrasing bits


@pytest.fixture(scope="module")
def pair():
    """Sandboxes and the one event loop they live on (their subprocesses are bound to it)."""
    loop = asyncio.new_event_loop()
    pair = SandboxPair()
    pair.loop = loop
    yield pair
    loop.run_until_complete(pair.aclose())
    loop.close()


def _grade_all(pair: SandboxPair, items: list[tuple[CodeTask, str]], config: GradeConfig | None = None):
    async def run():
        return [await grade(task, code, pair, config) for task, code in items]

    return pair.loop.run_until_complete(run())


# ---------------------------------------------------------------------------------------------- generator


def test_tasks_are_reproducible_from_a_seed():
    assert generate_tasks(50, seed=7) == generate_tasks(50, seed=7)
    assert generate_tasks(50, seed=7) != generate_tasks(50, seed=8)


def test_train_and_eval_never_share_a_function():
    train = {_function(t) for preset in ("sft", "rl") for t in generate_tasks(1000, seed=1, config=preset)}
    held_out = {_function(t) for t in generate_tasks(1000, seed=1, config="eval")}
    assert train and held_out and not train & held_out
    assert {t.split for t in generate_tasks(200, seed=2, config="eval")} == {"eval"}


def test_presets_set_phrasing_and_difficulty():
    sft = generate_tasks(400, seed=3, config="sft")
    assert all(t.demonstrated for t in sft) and {t.difficulty for t in sft} == {1, 2, 3}
    rl = generate_tasks(400, seed=3, config="rl")
    assert {t.difficulty for t in rl} == {1, 2}
    bits = "".join(t.task_id.rsplit("/", 1)[1] for t in rl)
    assert 0.74 < bits.count("1") / len(bits) < 0.86  # 80% undemonstrated phrasings
    assert sum(t.demonstrated for t in rl) < 0.1 * len(rl)
    for task in sft[:50]:
        assert task.reference.count("\n    ") == task.difficulty + 1  # one line per clause


def test_every_clause_appears_and_phrasings_differ():
    # Depth 2 as well: some clauses have no one-clause task whose tests check them ("convert it to uppercase,
    # then return it" is an eval function, the other string finals do not see the case).
    tasks = generate_tasks(1500, seed=4, config=GeneratorConfig(depths=(1, 2), alt_share=0.5))
    keys = {f"{t.task_id.split('/')[1]}/{part.rstrip('0123456789')}" for t in tasks
            for part in t.task_id.split("/")[2].split("-")}
    expected = {f"{d.name}/{c.key}" for d in DOMAINS for c in (*d.steps, *d.finals)}
    assert keys == expected
    for domain in DOMAINS:
        for clause in (*domain.steps, *domain.finals):
            assert clause.phrasings[0] != clause.phrasings[1]


def test_hidden_tests_are_the_reference_outputs_never_constant_and_check_every_clause():
    for task in generate_tasks(300, seed=5, config="eval"):
        namespace: dict = {}
        exec(task.reference, namespace)
        assert [namespace["solve"](*c.args) for c in task.tests.calls] == list(task.tests.expected)
        assert len({repr(v) for v in task.tests.expected}) > 1
        assert str(namespace["solve"](*task.example.args)) == task.example_stdout
        head, *body = task.reference.splitlines()
        for i in range(len(body) - 1):  # with any transformation clause left out, some hidden test fails
            namespace = {}
            exec("\n".join([head, *body[:i], *body[i + 1 :]]), namespace)
            assert [namespace["solve"](*c.args) for c in task.tests.calls] != list(task.tests.expected)
    # Without the check, many functions have a clause no test sees ("sort the list, then return the sum").
    loose = generate_tasks(300, seed=5, config=dataclasses.replace(PRESETS["eval"], every_clause_tested=False))
    assert sum(map(clause_untested, loose)) > 50


def test_generator_config_errors_are_named():
    with pytest.raises(ConfigError, match="depths"):
        GeneratorConfig(depths=(4,))
    with pytest.raises(ConfigError, match="split"):
        GeneratorConfig(split="test")
    with pytest.raises(ConfigError, match="unknown task preset"):
        generate_tasks(1, seed=0, config="hard")
    assert set(PRESETS) == {"sft", "rl", "eval"}


def test_references_of_generated_tasks_pass_in_the_sandbox(pair):
    tasks = generate_tasks(40, seed=6, config="eval") + generate_tasks(40, seed=6, config="rl")
    results = _grade_all(pair, [(t, t.reference) for t in tasks])
    assert [r.passed for r in results] == [5] * len(tasks)
    assert all(r.status == "graded" and r.clean for r in results)


# ---------------------------------------------------------------------------------------------- data sets


def test_the_shared_data_sets_load():
    humaneval, mbpp = datasets.humaneval(), datasets.mbpp()
    assert len(humaneval) == 164 and len(mbpp) == 427
    assert humaneval[0].task_id == "HumanEval/0" and humaneval[0].tests.check == "check"
    assert "def similar_elements(test_tup1, test_tup2):" in mbpp[0].prompt and mbpp[0].entry_point == "similar_elements"
    assert load_tasks(dataset_path("humaneval.jsonl"))[5] == humaneval[5]


def test_dataset_references_pass_in_the_sandbox(pair):
    items = datasets.humaneval()[::20] + datasets.mbpp()[::40]
    results = _grade_all(pair, [(t, t.reference) for t in items])
    failed = [(t.task_id, r) for t, r in zip(items, results, strict=True) if r.share < 1]
    assert not failed and len(results) == 20


def test_original_mbpp_jsonl_with_text_and_setup_code(tmp_path, monkeypatch):
    row = {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": "import math"}
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    (task,) = load_tasks("mbpp.jsonl")
    assert task.task_id == "MBPP/11" and task.preamble == "import math" and "def add(a, b):" in task.prompt
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": 1, "code": "x"}) + "\n")
    with pytest.raises(ConfigError, match="neither HumanEval fields"):
        load_tasks("bad.jsonl")
    with pytest.raises(ConfigError, match=DATASETS_ENV):
        load_tasks("missing.jsonl")
    (tmp_path / "he.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "p", "entry_point": "f"}) + "\n")
    with pytest.raises(ConfigError, match="lacks"):
        load_tasks("he.jsonl")


# ---------------------------------------------------------------------------------------------- wire


def test_plain_values_cross_the_wire_exactly():
    values = [None, True, 0, -(10**30), 1.5, math.inf, "é\n", b"\x00\xff", 1 + 2j, [1, [2]], (1, "a"),
              {1, 2}, frozenset({"x"}), {"a": [1], (1, 2): None}, []]
    for value in values:
        back = _wire.loads(_wire.dumps(value))
        assert _wire.same(back, value) and type(back) is type(value)
    assert math.isnan(_wire.loads(_wire.dumps(math.nan)))


def test_subclasses_cross_as_their_builtin_and_other_objects_as_opaque():
    Point = namedtuple("Point", "x y")

    class Liar(int):
        def __eq__(self, other):
            return True

        def __int__(self):
            return 99

    assert _wire.loads(_wire.dumps(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(_wire.loads(_wire.dumps(OrderedDict(a=1)))) is dict
    assert _wire.loads(_wire.dumps(Point(1, 2))) == (1, 2)
    liar = _wire.loads(_wire.dumps(Liar(5)))
    assert type(liar) is int and liar == 5 and liar != 6

    class AlwaysEqual:
        def __eq__(self, other):
            return True

    opaque = _wire.loads(_wire.dumps(AlwaysEqual()))
    assert isinstance(opaque, _wire.Opaque) and opaque != 5 and opaque != opaque.__class__("x", True)
    assert bool(opaque) and not _wire.same(opaque, True)
    assert bool(_wire.loads(_wire.dumps(collections.deque()))) is False


@pytest.mark.parametrize("text", ['{"q": 1}', '{"t": 5}', '{"s": [[1]]}', '{"d": [[1]]}', '{"x": "1e9"}',
                                  '{"c": ["a", 1.0]}', "[1,", '{"o": [1, true]}', '{"a": 1, "b": 2}'])
def test_malformed_wire_values_are_rejected(text):
    with pytest.raises(_wire.WireError):
        _wire.loads(text)


def test_same_is_stricter_than_equality():
    assert not _wire.same(True, 1) and not _wire.same([1], (1,)) and not _wire.same(1, 1.0)
    assert _wire.same(0.1 + 0.2, 0.3) and _wire.same({"a": [1.0]}, {"a": [1.0]})
    assert not _wire.same({"a": 1}, {"a": 1, "b": 2})


# ---------------------------------------------------------------------------------------------- graders


def test_each_assert_is_rewritten_to_report_alone():
    code = rewrite_asserts("def check(c):\n    assert c(1) == 2\n    assert True, 'x'\n    for i in range(3):\n"
                           "        assert c(i) >= 0\n")
    assert "assert " not in code and code.count("_agentrl_assert(_agentrl_ok)") == 2
    with pytest.raises(ConfigError, match="does not parse"):
        rewrite_asserts("assert (")


def test_failures_of_the_program_are_verdicts_with_reasons(pair):
    task = generate_tasks(1, seed=9, config="rl")[0]
    programs = {
        "load_error": "def solve(:\n",
        "crashed": "import ctypes\ndef solve(v):\n    ctypes.string_at(0)\n",
        "timeout": "while True:\n    pass\n",
    }
    config = GradeConfig(call_timeout=0.5, load_timeout=0.5, max_time=2.0)
    results = _grade_all(pair, [(task, code) for code in programs.values()], config)
    assert [r.status for r in results] == ["load_error", "crashed", "load_error"]
    assert "SyntaxError" in results[0].detail and "Timeout" in results[2].detail
    assert all(r.passed == 0 and r.total == 5 for r in results)
    huge = _grade_all(pair, [(task, "def solve(v):\n    return 'x' * 10**6\n")])[0]
    assert huge.passed == 0 and "OutputTooLarge" in huge.detail


def test_a_task_whose_tests_cannot_be_replayed_is_a_task_error(pair):
    tests = AssertTests(setup="", tests="def check(f):\n    assert f(lambda x: x) == 1\n", names=("apply",), check="check")
    task = CodeTask("custom/1", "Apply it.", "apply", "def apply(g):\n    return g(1)\n", tests, source="custom")
    result = _grade_all(pair, [(task, task.reference)])[0]
    assert result.status == "task_error" and "not plain data" in result.detail and result.passed == 0


def test_exceptions_replay_as_the_same_builtin_type(pair):
    tests = AssertTests(setup="", tests=(
        "def check(f):\n"
        "    try:\n        f(-1)\n        raised = False\n    except ValueError:\n        raised = True\n"
        "    assert raised\n    assert f(4) == 2\n"), names=("root",), check="check")
    reference = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return int(x ** 0.5)\n"
    task = CodeTask("custom/2", "Integer square root; ValueError below 0.", "root", reference, tests, source="custom")
    wrong = "def root(x):\n    return int(abs(x) ** 0.5)\n"
    right, half = _grade_all(pair, [(task, reference), (task, wrong)])
    assert (right.passed, right.total) == (2, 2) and (half.passed, half.total) == (1, 2)


def test_the_harness_falls_back_to_source_on_another_interpreter(pair, monkeypatch):
    task = generate_tasks(1, seed=12, config="rl")[0]
    prefix = grading._prefix("_harness_calls.py")
    other = prefix.replace(repr(importlib.util.MAGIC_NUMBER), repr(b"\x00\x00\r\n"), 1)
    assert other != prefix
    monkeypatch.setitem(grading._PREFIXES, "_harness_calls.py", other)
    assert _grade_all(pair, [(task, task.reference)])[0].passed == 5
