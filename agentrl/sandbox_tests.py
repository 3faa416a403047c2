"""Grading a program by running tests beside it, with a verdict the program cannot fake by ending early.

A raw ``exec`` verdict is the exit status, so a program that calls ``sys.exit(0)``, ``os._exit(0)``, kills
itself or hides in an ``atexit`` hook *before* the tests run looks exactly like one that passed them.
:func:`run_tests` (also :meth:`agentrl.sandbox.Sandbox.run_tests`) closes that hole:

1. Inside the sandbox a small harness forks a **runner** that executes the program, then the tests, in one
   namespace, and tells the harness over a pipe how far it got (``loaded``, then ``done``). The harness
   itself never runs submitted code, and it is non-dumpable, so the runner cannot open its files.
2. A fresh 128-bit **token** goes to the harness on stdin, which the runner does not have (its stdin is
   ``/dev/null``); the harness reads it only *after* the runner has exited, and prints one line: the
   token and a JSON report. Nothing the program prints can carry the token, since nothing it could
   read held it while it ran.
3. The **host decides**: passed only when exactly one line carries this call's token, the report says the
   runner reached the end of the tests and exited 0, and no limit ended the run. A timeout, a memory
   kill, a test that raised or a program that ended early is a :class:`TestRun` with ``status`` saying so,
   never an exception.

What it does not defend against: the runner is one process with the program, so code written to subvert
*this* harness (finding the pipe and writing ``done`` itself) could forge completion. Graders facing that
should also keep expected values out of the sandbox and compare on the host, as the bundled code-sandbox
env does (it shares :func:`new_token` and :func:`token_lines` for its report line).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentrl.errors import ConfigError

if TYPE_CHECKING:
    from agentrl.sandbox import ExecResult, Sandbox

__all__ = ["TestRun", "harness_source", "new_token", "run_tests", "token_lines", "verdict"]

_MAX_REPORT = 4096


@dataclass(frozen=True)
class TestRun:
    """The verdict of :func:`run_tests`.

    Attributes:
        passed: the tests ran to their end, every statement of them, and nothing failed or ran out.
        status: ``"passed"``; ``"failed"`` (a test raised, e.g. ``AssertionError``); ``"error"`` (the
            program raised before the tests began); ``"incomplete"`` (the run ended before the end of the
            tests without raising: ``sys.exit``, ``os._exit``, a signal, a killed harness); ``"timeout"``
            (wall or CPU time); ``"memory"``; (``SystemExit`` anywhere is ``"incomplete"``) ``"tampered"`` (more than one line with the token, or a
            report the host cannot read).
        detail: a short explanation (the exception's type and the end of its traceback, the limit hit).
        result: the raw :class:`~agentrl.sandbox.ExecResult` (stdout/stderr of program and tests).
    """

    __test__ = False  # not a pytest test class

    passed: bool
    status: str
    detail: str
    result: ExecResult


def new_token() -> str:
    """A fresh, unguessable 128-bit token (hex) for one run."""
    return secrets.token_hex(16)


def token_lines(stdout: str, token: str) -> list[str]:
    """The rest of each stdout line that starts with ``token`` and a space (a report should have exactly one)."""
    prefix = token + " "
    return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


_HARNESS = r'''
def _agentrl_harness(spec):
    import builtins, ctypes, json, os, sys, traceback
    write, exit_now, devnull = os.write, os._exit, os.devnull
    try:  # non-dumpable: the runner (same uid) cannot open /proc/<this pid>/fd/0, where the token waits
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        null = os.open(devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        phase = "program"
        try:
            namespace = {"__name__": "__main__", "__builtins__": builtins}
            exec(compile(spec["program"], "<program>", "exec"), namespace)
            write(w, b"loaded\n")
            phase = "tests"
            exec(compile(spec["tests"], "<tests>", "exec"), namespace)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as exc:
            try:
                traceback.print_exception(type(exc), exc, exc.__traceback__)
                sys.stderr.flush()
                write(w, ("raised %s %s\n" % (phase, type(exc).__name__)).encode()[:200])
            finally:
                exit_now(1)
        write(w, b"done\n")
        exit_now(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    try:
        said = os.read(r, 4096).decode("utf-8", "replace").splitlines()
    except BlockingIOError:
        said = []
    token = sys.stdin.readline().strip()  # only now: the runner is gone
    report = {"said": said[:8], "exit": os.waitstatus_to_exitcode(status)}
    write(1, ("\n%s %s\n" % (token, json.dumps(report))).encode())
    exit_now(0)
'''


def harness_source(program: str, tests: str) -> str:
    """The Python source that runs ``program`` then ``tests`` under the harness (token on stdin)."""
    spec = json.dumps({"program": program, "tests": tests})
    return f"{_HARNESS}\n_agentrl_harness(__import__('json').loads({spec!r}))\n"


def verdict(result: ExecResult, token: str) -> TestRun:
    """Judge one harness run on the host, from its :class:`ExecResult` and the token it was given."""
    if result.limit in ("wall_time", "cpu_time", "memory"):
        status = "memory" if result.limit == "memory" else "timeout"
        return TestRun(False, status, f"the {result.limit} limit ended the run", result)
    lines = token_lines(result.stdout, token)
    if len(lines) != 1:
        why = "more than one report line" if lines else "the harness ended without a report (killed from inside?)"
        if not lines and result.stdout_truncated:
            why = "stdout passed output_bytes, which cut the report off"
        return TestRun(False, "tampered" if lines else "incomplete", why, result)
    try:
        report = json.loads(lines[0][:_MAX_REPORT])
        said, code = [str(s) for s in report["said"]], int(report["exit"])
    except (ValueError, KeyError, TypeError):
        return TestRun(False, "tampered", "the report could not be read", result)
    tail = result.stderr.strip().splitlines()[-1:] or [""]
    if said == ["loaded", "done"] and code == 0:
        return TestRun(True, "passed", "", result)
    raised = next((s.split() for s in said if s.startswith("raised ")), None)
    if raised is not None and len(raised) == 3:
        status = "incomplete" if raised[2] == "SystemExit" else "failed" if raised[1] == "tests" else "error"
        return TestRun(False, status, f"{raised[2]} in the {raised[1]}: {tail[0][:300]}", result)
    where = "before the tests began" if "loaded" not in said else "before the end of the tests"
    how = f"exit status {code}" if code >= 0 else f"signal {-code}"
    return TestRun(False, "incomplete", f"the run ended {where} ({how})", result)


async def run_tests(
    sandbox: Sandbox,
    program: str,
    tests: str,
    *,
    timeout: float | None = None,
    files: Mapping[str, str | bytes] | None = None,
) -> TestRun:
    """Run ``program`` then ``tests`` (Python source, one namespace) in ``sandbox``; see the module docstring.

    Args:
        sandbox: an open sandbox of any backend.
        program: the code under test (it is executed as ``__main__``, then the tests see its names).
        tests: test code, e.g. ``assert add(1, 2) == 3`` lines; an exception in it fails the run.
        timeout: wall-clock seconds for program and tests together (``limits.wall_time`` by default).
        files: files to create in the work dir first.

    Returns:
        The :class:`TestRun`; failures, timeouts and early exits are data there.

    Raises:
        ConfigError: ``program`` or ``tests`` is not a string.
        SandboxError: the sandbox itself failed (as from ``exec``).
    """
    if not isinstance(program, str) or not isinstance(tests, str):
        raise ConfigError("run_tests takes the program and the tests as Python source strings")
    token = new_token()
    result = await sandbox.exec(harness_source(program, tests), stdin=token + "\n", files=files, timeout=timeout)
    return verdict(result, token)
