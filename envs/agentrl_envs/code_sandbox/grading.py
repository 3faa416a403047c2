"""Grading submissions so that the program under test cannot forge its verdict.

The program runs in a sandbox, and anything sharing a process with it is under its control: it can exit
early (``sys.exit(0)``, ``os._exit(0)``), return objects whose ``__eq__`` always says yes, patch ``print``
and builtins, disarm alarms, print fake reports, or read whatever test code sits beside it. So:

1. **Only inputs go in.** The untrusted sandbox gets the program and the *inputs* of the hidden tests
   (:mod:`._harness_calls`); expected outputs and assertion code never enter it, nor the fork-server it is
   forked from (a separate sandbox runs trusted code).
2. **Only plain data comes out.** Each call's return value is encoded as exact built-in data
   (:mod:`._wire`); anything else fails that test. The report line carries a fresh 128-bit nonce that the
   harness reads from stdin only after the last call returned; the host accepts exactly one such line, and
   a line it cannot parse within its bounds (size, depth, digits) is tampering. The token and the line
   matching are :mod:`agentrl.sandbox_tests`' (the mechanism of ``Sandbox.run_tests``).
3. **Limits are kept from outside the program's process.** A watchdog process of the harness, where no
   submitted code runs, kills the process that runs the program when a call (or the load) overruns its
   limit, whatever the program did to its own signals and timers (:mod:`._harness_calls`).
4. **The host decides.** For :class:`~.tasks.IOTests` the host compares each decoded output with the
   expected value. For :class:`~.tasks.AssertTests` a *trusted* sandbox, where no submitted code ever
   runs, re-runs the assertion code against a replay of those outputs (:mod:`._harness_asserts`), each
   ``assert`` on its own; the number of tests is fixed beforehand by recording the reference solution.
5. **Nothing of the hidden tests flows back to the agent.** A sandbox keeps its files between programs, so
   when the agent acts after a grading (the env's ``attempts`` > 1), submissions meet the hidden tests in
   a sandbox of their own (``grade(..., hidden=True)``): what a program stores there (the inputs it was
   called with) no ``run_python`` call and no public-test run can read.

A timeout, crash, missing or duplicated report is a result with ``status`` saying so and 0 tests passed,
never an exception. A sandbox lost under a program (see :func:`_sandbox_lost`) is not the program's doing:
its run is retried once, then graded ``"sandbox_error"`` / ``"task_error"``, which the env turns into an
error episode, never a wrong answer's 0.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import dataclasses
import importlib.util
import json
import logging
import marshal
import time
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl.sandbox import ExecResult, Sandbox, SandboxError, SandboxLimits, open_sandbox
from agentrl.sandbox_tests import new_token, token_lines
from agentrl_envs.code_sandbox import _wire
from agentrl_envs.code_sandbox.tasks import AssertTests, Call, CodeTask, IOTests, parse_source

__all__ = [
    "GradeConfig",
    "GradeResult",
    "Recording",
    "SandboxPair",
    "describe_failure",
    "grade",
    "grade_public",
    "record",
    "rewrite_asserts",
]

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_STRIP = "# stripped when shipped"
_MAX_REPORT_CHARS = 1 << 20  # the harness keeps its report under 0.5 MB


@dataclasses.dataclass(frozen=True)
class GradeConfig:
    """Time limits of one grading.

    Attributes:
        call_timeout: seconds per call of the function under test.
        load_timeout: seconds to load (import) the submission.
        max_time: wall-clock cap of the whole sandboxed run.
    """

    call_timeout: float = 1.0
    load_timeout: float = 2.0
    max_time: float = 10.0

    def __post_init__(self) -> None:
        for name in ("call_timeout", "load_timeout", "max_time"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"GradeConfig.{name} must be a positive number of seconds")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """The verdict on one submission.

    Attributes:
        passed: hidden tests passed.
        total: hidden tests (for assertion tests: the assertions the reference solution executes).
        status: ``"graded"`` (the tests ran; ``passed`` may be anything), ``"load_error"`` (the program did
            not import), ``"timeout"``, ``"crashed"`` (its process died before the last call returned),
            ``"tampered"`` (more than one report, one the host cannot parse, a malformed message, a stopped
            watchdog), ``"sandbox_error"`` (the sandbox itself failed or was lost twice, not the program)
            or ``"task_error"`` (the task's own tests cannot run, or the trusted sandbox failed).
        detail: a short explanation for people and for the model (first failure, error text).
        clean: the program loaded and no call raised or timed out.
        seconds: wall time of the grading.
    """

    passed: int
    total: int
    status: str
    detail: str = ""
    clean: bool = False
    seconds: float = 0.0

    @property
    def share(self) -> float:
        """The fraction of hidden tests passed."""
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


@dataclasses.dataclass(frozen=True)
class Recording:
    """What the reference solution does under a task's assertion tests (computed once per task).

    Attributes:
        calls: ``[name, args, kwargs]`` of each call the tests made, in wire form.
        total: assertions executed; all passed.
        error: why the task cannot be graded (the reference fails, an argument is not plain data), or None.
        slowest: seconds the reference took for its slowest call.
    """

    calls: tuple[Any, ...]
    total: int
    error: str | None = None
    slowest: float = 0.0


class SandboxPair:
    """The sandboxes grading needs, opened on first use: one for untrusted code, one for trusted code, and
    one for submissions under hidden tests when the agent acts after a grading (see the module docstring).

    Args:
        backend: the sandbox backend's registered name (``"local"``, ``"docker"``, ...).
        limits: limits of every program in both.
        options: backend options passed to :func:`agentrl.sandbox.open_sandbox`.
    """

    def __init__(self, backend: str = "local", limits: SandboxLimits | None = None, **options: Any):
        self.backend, self.limits, self.options = backend, limits, options
        self._boxes: dict[str, Sandbox] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _get(self, role: str) -> Sandbox:
        loop = asyncio.get_running_loop()
        if self._boxes and loop is not self._loop:
            # Sandboxes hold subprocesses bound to the loop that started them (e.g. an earlier asyncio.run).
            await self.aclose()
        self._loop = loop
        if role not in self._boxes:
            self._boxes[role] = open_sandbox(self.backend, self.limits, **self.options)
        return self._boxes[role]

    async def untrusted(self) -> Sandbox:
        """The sandbox for submissions and the model's ``run_python`` calls."""
        return await self._get("untrusted")

    async def trusted(self) -> Sandbox:
        """The sandbox for reference solutions and assertion code; no submitted code ever runs in it."""
        return await self._get("trusted")

    async def hidden(self) -> Sandbox:
        """The sandbox for submissions under the hidden tests when the agent acts after a grading; no
        ``run_python`` call or public-test run reads its files."""
        return await self._get("hidden")

    async def aclose(self) -> None:
        """Close the sandboxes; idempotent, completes even when cancelled, and never raises."""
        boxes, self._boxes = list(self._boxes.values()), {}
        for box in boxes:
            try:
                await asyncio.shield(box.close())
            except Exception as exc:  # e.g. closed from another event loop: its processes are killed anyway
                log.warning("closing a %s sandbox failed: %s", self.backend, exc)


# ---------------------------------------------------------------------------------------------- programs


def _harness_source(name: str) -> str:
    lines = (_HERE / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.endswith(_STRIP))


_PREFIXES: dict[str, str] = {}


def _prefix(harness: str) -> str:
    """The part of a harness program that is the same every time: it defines the codec and ``main``.

    Compiling the ~13 kB source costs milliseconds per grading, so the compiled code travels as a marshal
    literal, used when the sandbox's interpreter has the host's bytecode magic; the source is the fallback.
    """
    if harness not in _PREFIXES:
        source = _harness_source("_wire.py") + "\n\n" + _harness_source(harness)
        code = base64.b64encode(marshal.dumps(compile(source, f"<{harness}>", "exec", optimize=2))).decode()
        _PREFIXES[harness] = (
            "import binascii, marshal, _frozen_importlib_external as _boot\n"
            f"if _boot.MAGIC_NUMBER == {importlib.util.MAGIC_NUMBER!r}:\n"
            f"    exec(marshal.loads(binascii.a2b_base64({code!r})))\n"
            "else:\n"
            f"    exec(compile({source!r}, {f'<{harness}>'!r}, 'exec'))\n"
        )
    return _PREFIXES[harness]


def _program(harness: str, spec: dict[str, Any]) -> str:
    """Wire codec + harness + ``main(spec)``, as one Python source."""
    return f"{_prefix(harness)}main({json.dumps(spec)!r})\n"


class _Rewriter(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> Any:
        if isinstance(node.test, ast.Constant):  # `assert True, "..."` tests nothing
            return ast.Pass()
        ok = ast.Name("_agentrl_ok", ast.Store())
        guarded = ast.Try(
            body=[ast.Assign([ok], ast.Call(ast.Name("bool", ast.Load()), [node.test], []))],
            handlers=[ast.ExceptHandler(ast.Name("Exception", ast.Load()), None,
                                        [ast.Assign([ok], ast.Constant(False))])],
            orelse=[],
            finalbody=[],
        )
        report = ast.Expr(ast.Call(ast.Name("_agentrl_assert", ast.Load()), [ast.Name("_agentrl_ok", ast.Load())], []))
        return [guarded, report]


def rewrite_asserts(code: str) -> str:
    """Rewrite each ``assert`` so it reports its outcome to ``_agentrl_assert(ok)`` instead of raising.

    Raises:
        ConfigError: ``code`` is not valid Python.
    """
    try:
        tree = parse_source(code)
    except SyntaxError as exc:
        raise ConfigError(f"test code does not parse: {exc}") from exc
    return ast.unparse(ast.fix_missing_locations(_Rewriter().visit(tree)))


def _sandbox_lost(result: ExecResult) -> bool:
    """Whether the sandbox itself died under the program, on evidence the program cannot forge.

    The backends return a result with ``sandbox_restarted``, no exit status and no time-out only when their
    supervisor (the fork-server: pid 1 of the sandbox's pid namespace, or of the container) was lost, which
    a program cannot bring about: the kernel drops signals to a namespace's init sent from inside it, a
    seccomp filter refuses them too, and the OOM killer takes programs first (a run that saw an OOM kill
    is not counted here). Everything a program *can* do to itself or to the harness (exit, kill its own
    process or the harness's, stop it, run out of time or memory) leaves the supervisor up to report an
    exit status, a signal, a time-out or an OOM kill, and stays the program's failure.
    """
    return (result.sandbox_restarted and result.exit_code is None and not result.timed_out and not result.oom
            and not result.stdout and not result.stderr)


async def _exec(box: Sandbox, program: str, timeout: float, stdin: str | None = None) -> ExecResult:
    """``box.exec``, run once more if the sandbox was lost under it (it restarts itself).

    Raises:
        SandboxError: the sandbox failed, or was lost twice.
    """
    for _ in range(2):
        result = await box.exec(program, stdin=stdin, timeout=timeout)
        if not _sandbox_lost(result):
            return result
        log.warning("a sandbox was lost while grading; running the program again")
    raise SandboxError("the sandbox was lost (killed from outside) twice while grading")


def _report(result: ExecResult, nonce: str) -> tuple[dict[str, Any] | None, str]:
    """The one report line tagged with ``nonce``, or None and the status that explains its absence."""
    lines = token_lines(result.stdout, nonce)
    if len(lines) > 1:
        return None, "tampered"
    if not lines:
        if result.timed_out:
            return None, "timeout"
        return None, "crashed"
    try:  # bounded: a program that subverts the harness chooses this text (deep nesting, huge ints)
        report = _wire.parse_json(lines[0], _MAX_REPORT_CHARS)
    except _wire.WireError:
        return None, "tampered"
    return (report, "graded") if isinstance(report, dict) else (None, "tampered")


# ---------------------------------------------------------------------------------------------- stages


async def _run_calls(
    box: Sandbox, task: CodeTask, code: str, calls: list[Any], config: GradeConfig, call_timeout: float
) -> tuple[list[Any] | None, GradeResult | None]:
    """Run the submission on ``calls`` in the untrusted sandbox: its raw results, or a failed verdict."""
    spec = {"preamble": task.preamble, "code": code, "calls": calls, "call_timeout": call_timeout,
            "load_timeout": config.load_timeout}
    nonce = new_token()
    budget = min(config.max_time, config.load_timeout + call_timeout * len(calls) + 1.0)
    try:
        result = await _exec(box, _program("_harness_calls.py", spec), budget, stdin=nonce + "\n")
    except SandboxError as exc:
        return None, GradeResult(0, len(calls), "sandbox_error", f"the sandbox failed: {exc}")
    report, status = _report(result, nonce)
    if report is None:
        why = {"timeout": f"the program ran past {budget:.1f} s", "crashed": "the program ended without a report",
               "tampered": "the report was duplicated or malformed"}[status]
        return None, GradeResult(0, len(calls), status, why)
    results = report.get("results")
    for status in ("crashed", "tampered"):  # what the harness's watchdog saw the program's process do
        if report.get(status) is not None:
            return None, GradeResult(0, len(calls), status, str(report[status])[:300])
    if report.get("load") is not None:
        return None, GradeResult(0, len(calls), "load_error", str(report["load"])[:300])
    if not isinstance(results, list) or len(results) != len(calls) or not all(map(_valid_result, results)):
        return None, GradeResult(0, len(calls), "tampered", "the report does not match the calls made")
    return results, None


def _valid_result(item: Any) -> bool:
    return isinstance(item, dict) and len(item) == 1 and ("v" in item or isinstance(item.get("e"), str))


def _first_error(results: list[Any]) -> str:
    return next((r["e"] for r in results if "e" in r), "")


def _compare(tests: IOTests, results: list[Any]) -> tuple[int, str]:
    passed, detail = 0, ""
    for call, expected, item in zip(tests.calls, tests.expected, results, strict=True):
        try:
            got = _wire.decode(item["v"]) if "v" in item else None
            ok = "v" in item and _wire.same(got, expected)
        except _wire.WireError:
            ok, got = False, "<malformed value>"
        passed += ok
        if not ok and not detail:
            detail = describe_failure(call, expected, item["e"] if "e" in item else None, got)
    return passed, detail


def describe_failure(call: Call, expected: Any, error: str | None = None, got: Any = None) -> str:
    """One failed test as the agent reads it, e.g. ``solve([1, 2]) returned 3, expected 2`` or
    ``solve(0) raised ZeroDivisionError: ...`` (the env's feedback and the demonstrations both use it)."""
    if error is not None:
        return f"{call.text()} raised {error:.200}"
    return f"{call.text()} returned {got!r:.200}, expected {expected!r:.200}"


async def grade_public(
    task: CodeTask, code: str, sandboxes: SandboxPair, config: GradeConfig | None = None
) -> GradeResult | None:
    """Run ``code`` on the task's public tests (:attr:`CodeTask.feedback`) in an execution of their own, so a
    program cannot carry what it saw during the hidden tests into what it returns here. None: no public tests.
    """
    if task.feedback is None:
        return None
    return await grade(dataclasses.replace(task, tests=task.feedback), code, sandboxes, config)


async def record(task: CodeTask, box: Sandbox) -> Recording:
    """Run the task's reference solution under its assertion tests in the trusted sandbox.

    Returns:
        The calls the tests make and the number of assertions, or a :class:`Recording` with ``error`` set
        when the task cannot be graded this way.
    """
    tests = task.tests
    if not isinstance(tests, AssertTests):
        raise ConfigError(f"task {task.task_id!r} has no assertion tests to record")
    cached = _RECORDINGS.get(tests.fingerprint(task.reference))
    if cached is not None:
        return cached
    nonce = new_token()
    spec = _assert_spec(tests, nonce, mode="record", reference=task.reference, preamble=task.preamble)
    result = await _exec(box, _program("_harness_asserts.py", spec), 30.0)
    report, status = _report(result, nonce)
    if report is None:
        return Recording((), 0, f"the reference run {status}: {result.stderr[-300:]}")
    recording = Recording(tuple(report["calls"]), int(report["asserts"]), report["error"], float(report["slowest"]))
    if recording.error is None and report["passed"] != report["asserts"]:
        recording = Recording((), 0, f"the reference passes {report['passed']} of {report['asserts']} assertions")
    if recording.error is None and (recording.total == 0 or not recording.calls):
        recording = Recording((), 0, "the tests make no assertion that calls the function")
    _RECORDINGS[tests.fingerprint(task.reference)] = recording
    return recording


_RECORDINGS: dict[str, Recording] = {}


def _assert_spec(tests: AssertTests, nonce: str, **extra: Any) -> dict[str, Any]:
    return {"setup": tests.setup, "tests": _rewritten(tests.tests), "names": list(tests.names),
            "check": tests.check, "seed": tests.seed, "nonce": nonce, **extra}


_REWRITTEN: dict[str, str] = {}


def _rewritten(code: str) -> str:
    if code not in _REWRITTEN:
        _REWRITTEN[code] = rewrite_asserts(code)
    return _REWRITTEN[code]


async def _replay(tests: AssertTests, recording: Recording, results: list[Any], box: Sandbox) -> tuple[int, str]:
    nonce = new_token()
    spec = _assert_spec(tests, nonce, mode="replay", recorded=list(recording.calls), outputs=results)
    result = await _exec(box, _program("_harness_asserts.py", spec), 30.0)
    report, status = _report(result, nonce)
    if report is None:
        return 0, f"the assertion run {status}"
    passed, executed = int(report["passed"]), int(report["asserts"])
    # Each assertion the reference executed is one test. Where the outputs made the tests execute another
    # number (``for v in f(1): assert v == 0``), the run cannot be matched to the reference's assertion for
    # assertion: each missing or extra one counts as failed, so only a run like the reference's scores full.
    failed = executed - passed + abs(executed - recording.total)
    passed = max(0, recording.total - failed)
    detail = report["error"] or ("" if passed == recording.total else _first_error(results))
    return passed, detail or f"{recording.total - passed} assertion(s) failed"


async def grade(
    task: CodeTask, code: str, sandboxes: SandboxPair, config: GradeConfig | None = None, *, hidden: bool = False
) -> GradeResult:
    """Run ``code`` against ``task``'s hidden tests.

    Args:
        task: the task.
        code: the submitted program (full source defining ``task.entry_point``).
        sandboxes: where to run it (untrusted) and the assertion code (trusted).
        config: time limits.
        hidden: run the submission in the sandbox for hidden tests, whose files nothing the agent runs
            later can read (for an agent that acts after the grading).

    Returns:
        The verdict; failures of the program (and of the sandbox) are recorded in it, never raised.
    """
    config = config or GradeConfig()
    start = time.perf_counter()
    verdict = await _grade(task, code, sandboxes, config, hidden)
    return GradeResult(verdict.passed, verdict.total, verdict.status, verdict.detail, verdict.clean,
                       time.perf_counter() - start)


async def _grade(task: CodeTask, code: str, sandboxes: SandboxPair, config: GradeConfig, hidden: bool) -> GradeResult:
    tests = task.tests
    box = await (sandboxes.hidden() if hidden else sandboxes.untrusted())
    if isinstance(tests, IOTests):
        calls = [[c.name, _wire.encode(list(c.args), True), _wire.encode(dict(c.kwargs), True)] for c in tests.calls]
        results, failed = await _run_calls(box, task, code, calls, config, config.call_timeout)
        if results is None:
            return failed  # type: ignore[return-value]
        passed, detail = _compare(tests, results)
        return GradeResult(passed, len(calls), "graded", detail, not _first_error(results))
    try:
        recording = await record(task, await sandboxes.trusted())
    except SandboxError as exc:
        return GradeResult(0, 0, "task_error", f"the trusted sandbox failed: {exc}")
    if recording.error is not None:
        return GradeResult(0, 0, "task_error", recording.error)
    # A slow reference (some MBPP tasks need seconds) gets a per-call limit to match.
    call_timeout = max(config.call_timeout, 3 * recording.slowest + 0.5)
    calls = list(recording.calls)
    results, failed = await _run_calls(box, task, code, calls, config, call_timeout)
    if results is None:
        return GradeResult(0, recording.total, failed.status, failed.detail)  # type: ignore[union-attr]
    clean = not _first_error(results)
    if all("e" in r for r in results):  # nothing came back: no assertion can be about this program
        return GradeResult(0, recording.total, "graded", _first_error(results), clean)
    try:
        passed, detail = await _replay(tests, recording, results, await sandboxes.trusted())
    except SandboxError as exc:
        return GradeResult(0, recording.total, "task_error", f"the trusted sandbox failed: {exc}")
    return GradeResult(passed, recording.total, "graded", detail, clean)
