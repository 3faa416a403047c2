"""The verifier's worker process: ``python -m agentrl.rewards._math_worker``.

Protocol, one JSON object per line: the parent writes ``{"gold": str, "pred": str, "budget": float, "mode": str,
"decimal": str}`` (the last two optional: see :func:`agentrl.rewards._math_equiv.equivalent`); the
worker answers ``{"equal": bool}``, ``{"timeout": true}`` when the comparison ran past ``budget`` seconds, or
``{"error": "Type: message"}``. On start it writes ``{"ready": true}`` (or ``{"fatal": ...}`` when math-verify
is missing). It exits when its stdin closes, so it never outlives the parent.

The budget is enforced with ``setitimer`` in this process's main thread, where signals work; math-verify's
own ``signal.alarm`` timeouts are switched off so they cannot reset it. A comparison stuck in C code, where
no signal handler can run, is the parent's to kill.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any


class _Budget(BaseException):
    """Raised by the timer; a BaseException so that math-verify's ``except Exception`` cannot swallow it."""


def _on_timer(signum: int, frame: Any) -> None:
    raise _Budget


def _answer(equivalent: Any, request: dict[str, Any]) -> dict[str, Any]:
    signal.setitimer(signal.ITIMER_REAL, max(0.001, float(request.get("budget", 5.0))))
    try:
        options = {key: str(request[key]) for key in ("mode", "decimal") if key in request}
        return {"equal": bool(equivalent(str(request["gold"]), str(request["pred"]), **options))}
    except _Budget:
        return {"timeout": True}
    except Exception as exc:  # a bad answer is data: report it, keep serving
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


_WARM_UP = (
    ("1", "1"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("(-\\infty, 2] \\cup (3, \\infty)", "x \\le 2"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
    ("x^2 - 1", "(x-1)(x+1)"),
    ("y = 2x + 1", "\\{1, 2\\}"),
)


def main() -> None:
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure and disabled timeout
    sys.setrecursionlimit(10_000)
    out = sys.stdout
    try:
        import math_verify  # noqa: F401

        from agentrl.rewards._math_equiv import equivalent
    except ImportError as exc:
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return
    signal.signal(signal.SIGALRM, _on_timer)
    for gold, pred in _WARM_UP:  # build the LaTeX parser's caches before the first timed request
        equivalent(gold, pred)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError as exc:
            reply: dict[str, Any] = {"error": f"bad request: {exc}"}
        else:
            reply = _answer(equivalent, request)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
