"""Blocking calls awaited from the event loop, each on a daemon thread of its own.

Not the loop's default executor (``asyncio.to_thread``): its few threads are shared, so calls that hang
(a sync env's ``step``, a tool) fill it and every later call waits behind them, and ``asyncio.run`` waits
for them at exit. A daemon thread that outlives its caller's deadline is abandoned instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new daemon thread; its result or exception, awaited. ``name`` says what
    runs ("the env's step", "tool 'search'") in the thread's name and in errors.

    A ``BaseException`` that is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt`` raised inside
    ``fn``) comes back as a ``RuntimeError`` naming it: it belongs to ``fn``, not to the caller's process.
    Cancelling the await abandons the thread (it runs on, unobserved, and dies with the process).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def target() -> None:
        ok: bool
        value: Any
        try:
            ok, value = True, fn(*args, **kwargs)
        except Exception as exc:
            ok, value = False, exc
        except BaseException as exc:
            ok, value = False, RuntimeError(f"{name} raised {type(exc).__name__}: {exc}")
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop closed while fn ran; nobody is waiting
            pass

    threading.Thread(target=target, name=f"agentrl-{name}", daemon=True).start()
    return await future
