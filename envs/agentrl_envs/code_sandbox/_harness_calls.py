"""Sandbox side of grading a submission: load it, call its functions on the hidden inputs, report the outputs.

Runs *inside* the sandbox, in the same process as the untrusted program, so nothing here is trusted: the
host decides the verdict. This harness only carries inputs in (never expected outputs) and outputs out,
as plain data (:mod:`._wire`). The report line is tagged with a nonce read from stdin *after* every call has
returned, so text the program prints cannot pass for a report; the program's own stdout goes to /dev/null.

Shipped as source: ``_wire.py`` + this file + ``main(<spec JSON>)``. Lines ending in "stripped when shipped"
exist only so linters see the names.
"""

import builtins
import io
import json
import os
import signal
import sys

from agentrl_envs.code_sandbox._wire import WireError, decode, encode  # stripped when shipped

MAX_RESULT_CHARS = 32_000
MAX_REPORT_CHARS = 400_000  # well under the sandbox's default 1 MiB of kept stdout


class CallTimeout(BaseException):
    """Raised by the alarm; a BaseException so the program's ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise CallTimeout()


def _describe(exc):
    name = type(exc).__name__ if isinstance(type(exc).__name__, str) else "Exception"
    try:
        message = BaseException.__str__(exc)  # the base method: a program's __str__ never runs here
    except BaseException:
        message = ""
    return f"{name}: {message}"[:300] if message else name


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
        return {"e": f"Timeout: the call took longer than {seconds:.3g} s"}
    except WireError as exc:
        return {"e": f"NotPlainData: {exc}"}
    except BaseException as exc:  # SystemExit and the like fail this call only
        return {"e": _describe(exc)}
    text = json.dumps(value, separators=(",", ":"))
    return {"v": value} if len(text) <= MAX_RESULT_CHARS else {"e": "OutputTooLarge"}


def _read_nonce():
    chunks = []
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            return b"".join(chunks).decode("ascii", "replace").strip()
        chunks.append(chunk)


def main(spec_text):
    spec = json.loads(spec_text)
    report_fd = os.dup(1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    sys.stdin = io.StringIO("")  # input() sees an empty stdin; the nonce stays on fd 0 for the end
    signal.signal(signal.SIGALRM, _on_alarm)
    report = {"load": None, "results": []}
    try:
        namespace = _load(spec["preamble"], spec["code"], spec["load_timeout"])
    except CallTimeout:
        report["load"] = f"Timeout: loading the program took longer than {spec['load_timeout']:.3g} s"
    except BaseException as exc:  # SyntaxError, SystemExit, anything the program raises at import time
        report["load"] = _describe(exc)
    else:
        room = MAX_REPORT_CHARS
        for name, args_wire, kwargs_wire in spec["calls"]:
            result = _call(namespace, name, args_wire, kwargs_wire, spec["call_timeout"])
            room -= len(json.dumps(result, separators=(",", ":")))
            report["results"].append(result if room > 0 else {"e": "OutputTooLarge"})
    nonce = _read_nonce()
    line = nonce + " " + json.dumps(report, separators=(",", ":")) + "\n"
    data = line.encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(report_fd, data) :]
    os._exit(0)  # no atexit handlers or finalizers of the program after the report
