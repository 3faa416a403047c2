"""``Sandbox.run_tests``: passed only when the tests ran to their end, on every backend, for real.

Every way a program can end the run early with status 0, or print something that looks like success, is
tried against tests it would fail; none may pass. Failures, errors and timeouts come back as data.
"""

from __future__ import annotations

import asyncio

import pytest
from test_sandbox_local import BWRAP

from agentrl.errors import ConfigError
from agentrl.sandbox import SandboxLimits, open_sandbox
from agentrl.sandbox_tests import TestRun, harness_source, token_lines, verdict

pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is missing: apt-get install bubblewrap")

GOOD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nprint('tests done')\n"
WRONG = "def add(a, b):\n    return 0\n"

EARLY_EXITS = {
    "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n",
    "raise SystemExit": WRONG + "raise SystemExit\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "exit from the tested function": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "SystemExit from the tested function": "def add(a, b):\n    raise SystemExit(0)\n",
    "atexit hook": WRONG + "import atexit, os\natexit.register(os._exit, 0)\nimport sys\nsys.exit(0)\n",
    "SIGKILL to itself": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "kill the harness": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos._exit(0)\n",
    "exit from a thread": WRONG + "import os, threading\nt = threading.Thread(target=os._exit, args=(0,))\n"
                                  "t.start()\nt.join()\n",
    "print a fake report": WRONG + "print('\\n' + '0' * 32 + ' {\"said\": [\"loaded\", \"done\"], \"exit\": 0}')\n"
                                   "import os\nos._exit(0)\n",
    "read stdin for the token": WRONG + "import sys, os\ntoken = sys.stdin.read() + os.read(0, 100).decode()\n"
                                        "print('\\n%s {\"said\": [\"loaded\", \"done\"], \"exit\": 0}' % token.strip())\n"
                                        "os._exit(0)\n",
    "read the harness's stdin": WRONG + "import os\ntry:\n    print(open(f'/proc/{os.getppid()}/fd/0').read())\n"
                                        "except OSError as exc:\n    print(exc)\nos._exit(0)\n",
    "patch AssertionError away": "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n" + WRONG
                                 + "import sys\nsys.excepthook = lambda *a: None\n",
}


@pytest.fixture(scope="module", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def name(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_image")
    return request.param


def run_all(name: str, cases: dict[str, str], tests: str = TESTS, timeout: float = 5) -> dict[str, TestRun]:
    async def main() -> dict[str, TestRun]:
        async with open_sandbox(name, SandboxLimits(wall_time=30)) as sb:
            return {key: await sb.run_tests(code, tests, timeout=timeout) for key, code in cases.items()}

    return asyncio.run(main())


def test_a_correct_program_passes_and_a_wrong_one_fails(name):
    runs = run_all(name, {"good": GOOD, "wrong": WRONG, "raises": "raise ValueError('at import')\n"})
    assert runs["good"].passed and runs["good"].status == "passed" and "tests done" in runs["good"].result.stdout
    assert (runs["wrong"].passed, runs["wrong"].status) == (False, "failed")
    assert "AssertionError" in runs["wrong"].detail
    assert (runs["raises"].passed, runs["raises"].status) == (False, "error") and "ValueError" in runs["raises"].detail


def test_no_early_exit_or_forgery_passes(name):
    runs = run_all(name, EARLY_EXITS)
    passed = [key for key, run in runs.items() if run.passed]
    assert not passed, {key: runs[key].result for key in passed}
    for key, run in runs.items():
        assert run.status in ("incomplete", "failed", "error"), (key, run)


def test_timeouts_and_memory_are_data(name):
    loop = run_all(name, {"loop": "while True:\n    pass\n"}, timeout=2)["loop"]
    assert (loop.passed, loop.status) == (False, "timeout")
    # 8 processes x 200 MB, then a long sleep: only the memory limit can end it before the deadline.
    hog = "import os, time\nfor _ in range(3):\n    os.fork()\nx = b'x' * (200 << 20)\ntime.sleep(60)\n"
    memory = run_all(name, {"memory": hog}, timeout=30)["memory"]
    assert (memory.passed, memory.status) == (False, "memory"), memory.result


def test_verdict_is_decided_on_the_host():
    from agentrl.sandbox import ExecResult

    def result(stdout: str, **kw) -> ExecResult:
        return ExecResult(exit_code=0, signal=None, stdout=stdout, stderr="", **kw)

    token = "ab" * 16
    good = f'\n{token} {{"said": ["loaded", "done"], "exit": 0}}\n'
    assert verdict(result(good), token).passed
    assert not verdict(result(good), "cd" * 16).passed  # another call's token
    assert verdict(result(good + good), token).status == "tampered"
    assert verdict(result(f"{token} {{not json\n"), token).status == "tampered"
    assert verdict(result(good, timed_out=True, limit="wall_time"), token).status == "timeout"
    assert token_lines(f"x {token} y\n{token} z\n", token) == ["z"]  # only at the start of a line
    assert "_agentrl_harness" in harness_source("pass", "pass")
    with pytest.raises(ConfigError, match="source strings"):
        asyncio.run(run_tests_with_bad_input())


async def run_tests_with_bad_input() -> None:
    from agentrl.sandbox_tests import run_tests

    await run_tests(None, ["not", "source"], "")  # type: ignore[arg-type]
