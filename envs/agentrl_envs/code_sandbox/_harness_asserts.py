"""Sandbox side of assert-style tests (HumanEval ``check(candidate)``, MBPP ``assert`` lines). Trusted code only.

No submitted program ever runs in this process or its sandbox: the tests call a *proxy* for the function
under test.

- ``record`` mode (once per task): the proxy calls the reference solution and records each call's
  arguments; the count of assertions the reference passes is the task's number of tests.
- ``replay`` mode (once per submission): the proxy checks that call *i* has the recorded arguments and
  answers with the output the submission produced for them in its own sandbox (plain data, decoded here),
  or raises the exception it raised.

The host rewrote every ``assert`` so that each one is evaluated on its own and reported through
``_agentrl_assert(ok)``: a failing assert does not hide the ones after it.

Shipped as source: ``_wire.py`` + this file + ``main(<spec JSON>)``.
"""

import builtins
import json
import os
import random
import time

from agentrl_envs.code_sandbox._wire import WireError, decode, encode  # stripped when shipped


class ReplayMismatch(Exception):
    """The tests called the function in a different order or with other arguments than recorded."""


class _State:
    def __init__(self, spec):
        self.spec = spec
        self.asserts = 0
        self.passed = 0
        self.calls = []
        self.error = None
        self.reference = None
        self.slowest = 0.0

    def check(self, ok):
        self.asserts += 1
        self.passed += 1 if ok is True else 0

    def proxy(self, name):
        def call(*args, **kwargs):
            if self.spec["mode"] == "record":
                try:
                    self.calls.append([name, encode(list(args), strict=True), encode(kwargs, strict=True)])
                except WireError as exc:
                    self.error = f"Unsupported: a call argument is not plain data ({exc})"
                    raise
                start = time.perf_counter()
                try:
                    return self.reference[name](*args, **kwargs)
                finally:
                    self.slowest = max(self.slowest, time.perf_counter() - start)
            return self.replay(name, args, kwargs)

        call.__name__ = name
        return call

    def replay(self, name, args, kwargs):
        index = len(self.calls)
        self.calls.append(name)
        recorded = self.spec["recorded"]
        try:
            same_call = index < len(recorded) and json.dumps(recorded[index]) == json.dumps(
                [name, encode(list(args), strict=True), encode(kwargs, strict=True)]
            )
        except WireError:
            same_call = False
        if not same_call:
            raise ReplayMismatch(f"call {index} to {name} differs from the recorded call")
        output = self.spec["outputs"][index]
        if "v" in output:
            return decode(output["v"])
        kind, _, message = output["e"].partition(": ")
        exc_type = getattr(builtins, kind, None)
        if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
            exc_type = RuntimeError
        raise exc_type(message or kind)


def _run(state):
    spec = state.spec
    random.seed(spec["seed"])
    namespace = {"__name__": "tests", "__builtins__": builtins}
    exec(compile(spec["setup"], "setup.py", "exec"), namespace)
    if spec["mode"] == "record":
        reference = {"__name__": "reference", "__builtins__": builtins}
        exec(compile(spec["preamble"], "preamble.py", "exec"), reference)
        exec(compile(spec["reference"], "reference.py", "exec"), reference)
        state.reference = reference
    proxies = {name: state.proxy(name) for name in spec["names"]}
    namespace.update(proxies)
    namespace["_agentrl_assert"] = state.check
    exec(compile(spec["tests"], "tests.py", "exec"), namespace)
    if spec["check"]:
        namespace[spec["check"]](proxies[spec["names"][0]])


def main(spec_text):
    spec = json.loads(spec_text)
    state = _State(spec)
    try:
        _run(state)
    except Exception as exc:  # a statement outside an assert failed: the asserts after it never ran
        state.error = state.error or f"{type(exc).__name__}: {exc}"[:300]
    report = {"asserts": state.asserts, "passed": state.passed, "error": state.error}
    if spec["mode"] == "record":
        report["calls"] = state.calls
        report["slowest"] = state.slowest
    data = (spec["nonce"] + " " + json.dumps(report, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]
    os._exit(0)
