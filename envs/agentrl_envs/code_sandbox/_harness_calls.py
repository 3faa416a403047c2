"""Sandbox side of grading a submission: load it, call its functions on the hidden inputs, report the outputs.

Runs *inside* the sandbox, so nothing here is trusted: the host decides the verdict. This harness only
carries inputs in (never expected outputs) and outputs out, as plain data (:mod:`._wire`).

Two processes, so that the limits hold whatever the program does to its own process (ignore, block or
disarm ``SIGALRM``, patch ``json``, stop the clock):

- the **watchdog** is the harness as started; no submitted code ever runs in it. It forks
- a **runner**, which loads the program and makes the calls, sending each outcome as one JSON line on a
  pipe. The watchdog gives the load and each call its limit (plus a little slack) from the arrival of the
  runner's previous line; a runner that misses a deadline is SIGKILLed, that call fails with ``Timeout``,
  and a fresh runner (the program loaded again) goes on with the next call. The runner also keeps an alarm
  of its own, so an ordinary slow call costs no new runner.

Only the watchdog holds the nonce (stdin, read *after* the last call) and the report's stdout; the runner
gets ``/dev/null`` for both, and the watchdog makes itself non-dumpable so that the runner cannot reopen
them through ``/proc/<pid>/fd``. The runner can still signal the watchdog (same uid): ``SIGTSTP`` and the
like are ignored, and since only ``SIGCONT`` resumes a process stopped with ``SIGSTOP``, a watchdog that
sees ``SIGCONT`` knows its clock was stopped and reports tampering. A runner that dies mid-way (``os._exit``) ends the grading as crashed; a
line the watchdog cannot parse ends it as tampered; both are reported under a key the host checks.

Shipped as source: ``_wire.py`` + this file + ``main(<spec JSON>)``. Lines ending in "stripped when shipped"
exist only so linters see the names.
"""

import builtins
import io
import json
import os
import select
import signal
import sys
import time

from agentrl_envs.code_sandbox._wire import WireError, decode, encode  # stripped when shipped

MAX_RESULT_CHARS = 32_000
MAX_LINE_BYTES = 4 * MAX_RESULT_CHARS  # a runner line is one result: at most ~32 kB of JSON
MAX_REPORT_CHARS = 400_000  # well under the sandbox's default 1 MiB of kept stdout
PR_SET_DUMPABLE = 4
_WATCHDOG_SIGNALS = (signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class CallTimeout(BaseException):
    """Raised by the alarm; a BaseException so the program's ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise CallTimeout()


_STOPPED = []  # set when the watchdog gets SIGCONT: it was stopped, so its deadlines did not hold


def _on_continue(signum, frame):
    _STOPPED.append(True)


def _describe(exc):
    name = type(exc).__name__ if isinstance(type(exc).__name__, str) else "Exception"
    try:
        message = BaseException.__str__(exc)  # the base method: a program's __str__ never runs here
    except BaseException:
        message = ""
    return f"{name}: {message}"[:300] if message else name


def _slack(seconds):
    """How long past a limit the watchdog waits before it kills: the runner's own alarm comes first."""
    return 0.1 * seconds + 0.05


# ---- the runner: the program's process ----------------------------------------------------------------


def _timed(seconds, fn, *args, **kwargs):
    # It fires again every 0.1 s, so a bare ``except:`` in the program cannot swallow the deadline for good.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _load(preamble, code, seconds):
    namespace = {"__name__": "solution", "__builtins__": builtins}
    exec(compile(preamble, "preamble.py", "exec"), namespace)
    _timed(seconds, exec, compile(code, "solution.py", "exec"), namespace)
    return namespace


def _call(namespace, name, args_wire, kwargs_wire, seconds):
    fn = namespace.get(name)
    if not callable(fn):
        return {"e": f"NameError: the program defines no function {name!r}"}
    try:
        value = _timed(seconds, lambda: encode(fn(*decode(args_wire), **decode(kwargs_wire))))
    except CallTimeout:
        return {"e": _timeout(seconds)}
    except WireError as exc:
        return {"e": f"NotPlainData: {exc}"}
    except BaseException as exc:  # SystemExit and the like fail this call only
        return {"e": _describe(exc)}
    text = json.dumps(value, separators=(",", ":"))
    return {"v": value} if len(text) <= MAX_RESULT_CHARS else {"e": "OutputTooLarge"}


def _timeout(seconds):
    return f"Timeout: the call took longer than {seconds:.3g} s"


def _send(fd, message):
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(fd, data) :]


def _runner(spec, first, pipe_w):
    """In the forked runner: load the program, make calls ``first...``, one line each. Never returns."""
    try:
        quiet = os.open(os.devnull, os.O_RDWR)
        os.dup2(quiet, 0)  # the nonce stays with the watchdog
        os.dup2(quiet, 1)  # the program's prints go nowhere
        _set_dumpable(1)  # its own /proc/self again; the watchdog's stays closed
        for sig in _WATCHDOG_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        sys.stdin = io.StringIO("")
        signal.signal(signal.SIGALRM, _on_alarm)
        try:
            namespace = _load(spec["preamble"], spec["code"], spec["load_timeout"])
        except CallTimeout:
            _send(pipe_w, {"load": f"Timeout: loading the program took longer than {spec['load_timeout']:.3g} s"})
        except BaseException as exc:  # SyntaxError, SystemExit, anything the program raises at import time
            _send(pipe_w, {"load": _describe(exc)})
        else:
            _send(pipe_w, {"load": None})
            for name, args_wire, kwargs_wire in spec["calls"][first:]:
                _send(pipe_w, _call(namespace, name, args_wire, kwargs_wire, spec["call_timeout"]))
    finally:
        os._exit(0)  # no atexit handlers or finalizers of the program


# ---- the watchdog: no submitted code runs here --------------------------------------------------------


def _set_dumpable(flag):
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, flag, 0, 0, 0)
    except Exception:  # no ctypes or no prctl here: the runner could reach our fds, but not our verdict
        pass


class _Lines:
    """The runner's lines, each awaited until a deadline the watchdog keeps on its own clock."""

    def __init__(self, fd):
        self.fd, self.buffer = fd, bytearray()

    def next(self, deadline):
        """``("line", value)``, or ``("timeout" | "eof" | "tampered" | "stopped", None)``."""
        while b"\n" not in self.buffer:
            if _STOPPED:
                return "stopped", None
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return "timeout", None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return "eof", None
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE_BYTES:
                return "tampered", None
        if _STOPPED:
            return "stopped", None
        if time.monotonic() > deadline:  # the line came, but late (a loaded machine, a stopped watchdog)
            return "timeout", None
        end = self.buffer.index(b"\n")
        line, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 1 :]
        try:
            return "line", json.loads(line)
        except BaseException:  # RecursionError, huge ints, bad UTF-8: the program wrote this line
            return "tampered", None


def _start(spec, first):
    pipe_r, pipe_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(pipe_r)
        _runner(spec, first, pipe_w)
    os.close(pipe_w)
    return pid, pipe_r


def _stop(pid, pipe_r):
    os.close(pipe_r)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _grade(spec, report):
    """Fill ``report`` with the load outcome and one result per call, starting runners as needed."""
    calls, results = spec["calls"], report["results"]
    room = MAX_REPORT_CHARS
    while True:
        first = len(results)
        pid, pipe_r = _start(spec, first)
        lines = _Lines(pipe_r)
        try:
            state, message = lines.next(time.monotonic() + spec["load_timeout"] + _slack(spec["load_timeout"]))
            if state == "timeout":
                message = {"load": f"Timeout: loading the program took longer than {spec['load_timeout']:.3g} s"}
            elif state != "line" or type(message) is not dict or "load" not in message:
                return _ended(report, state, "the load")
            if message["load"] is not None:
                if first == 0:
                    report["load"] = message["load"]
                else:  # loaded once, not again: the calls left cannot run
                    results.extend({"e": f"LoadError: {str(message['load'])[:300]}"} for _ in calls[first:])
                return
            limit = spec["call_timeout"]
            while len(results) < len(calls):
                state, message = lines.next(time.monotonic() + limit + _slack(limit))
                if state == "timeout":
                    results.append({"e": _timeout(limit)})
                    break  # this runner is stuck: a fresh one goes on with the next call
                if state != "line":
                    return _ended(report, state, f"call {len(results)}")
                room -= len(json.dumps(message, separators=(",", ":")))
                results.append(message if room > 0 else {"e": "OutputTooLarge"})
            if len(results) == len(calls):
                return
        finally:
            _stop(pid, pipe_r)


def _ended(report, state, during):
    if state == "eof":
        report["crashed"] = f"the program ended its process during {during}"
    elif state == "stopped":
        report["tampered"] = f"the program stopped the harness's watchdog during {during}"
    else:
        report["tampered"] = f"the harness's message about {during} was malformed"


def _read_nonce():
    chunks = []
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            return b"".join(chunks).decode("ascii", "replace").strip()
        chunks.append(chunk)


def main(spec_text):
    spec = json.loads(spec_text)
    _set_dumpable(0)
    signal.signal(signal.SIGCONT, _on_continue)
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    report = {"load": None, "results": []}
    _grade(spec, report)
    if _STOPPED:
        report["tampered"] = "the program stopped the harness's watchdog"
    nonce = _read_nonce()
    line = nonce + " " + json.dumps(report, separators=(",", ":")) + "\n"
    data = line.encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(1, data) :]
    os._exit(0)
