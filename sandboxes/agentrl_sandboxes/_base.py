"""What the local and docker backends share: a warm fork-server behind a message channel, driven from the host.

:class:`ForkServerSandbox` owns the protocol with the fork-server (:mod:`agentrl_sandboxes._forkserver`) and
every host-side rule about it: one call at a time, a backstop deadline past the program's own, a fresh
fork-server after any doubt (no answer, a lost channel, a dirty namespace, an undeletable work dir), staged
files written again after a restart, and a kill that happens before any ``await`` so it survives
cancellation. A backend supplies the place the fork-server runs: :meth:`_spawn` starts it and returns a
:class:`ForkServer`, :meth:`_oom_kills` reads the OOM-kill count, :meth:`_release` frees the rest on close.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from agentrl.errors import ConfigError
from agentrl.sandbox import (
    ExecResult,
    Program,
    Sandbox,
    SandboxClosedError,
    SandboxError,
    SandboxFileError,
    SandboxLimits,
)
from agentrl_sandboxes._process import ServerLost

__all__ = ["PRELOAD", "START_TIMEOUT", "ForkServer", "ForkServerSandbox", "configure", "exec_request", "exit_limit", "prioritise"]

log = logging.getLogger(__name__)
START_TIMEOUT = 20.0
PRELOAD = (
    "array", "bisect", "cmath", "collections", "copy", "functools", "heapq", "itertools", "math", "operator",
    "random", "re", "string", "typing",
)
"""Standard-library modules the fork-server imports once, so programs do not pay for them (each program's
own ``import`` of them is a lookup). Only standard-library code runs in the fork-server, never a program's.
The list is what HumanEval and MBPP import, less the heavy and rare (``hashlib`` alone adds 3.7 MB that
every fork would copy page tables for)."""


class ForkServer(Protocol):
    """One running fork-server, wherever it runs (bubblewrap on the host, a container)."""

    supervisors: tuple[int, ...]

    async def call(self, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> tuple[dict[str, Any], list[bytes]]: ...

    def died(self) -> bool: ...

    def host_pids(self) -> list[int]: ...

    def kill_now(self) -> None: ...

    async def stop(self) -> None: ...


class ForkServerSandbox(Sandbox):
    """A sandbox whose programs are forked by a fork-server; see the module docstring.

    Args:
        limits: the limits of every program.
        keep_workdir: keep files in the work dir from one program to the next (processes are still killed);
            by default it is wiped before each program, except files staged with ``write_file``.
        grace: seconds the host waits past ``timeout`` before it kills the whole sandbox itself.
        preload: modules the fork-server imports before it forks programs (default :data:`PRELOAD`; add
            e.g. ``"numpy"`` where the interpreter has it). A missing one is skipped.

    Attributes:
        starts: how many fork-servers were started (1 + restarts).
        last_phases: where the last program's time went, in seconds: ``prepare`` (wipe the work dir, write
            files, pipes), ``program`` (fork, confine, run, drain output), ``kill`` (kill and reap everything,
            prove the namespace empty), ``channel`` (the rest: messages to and from the fork-server).
    """

    def __init__(self, limits: SandboxLimits | None = None, *, keep_workdir: bool = False, grace: float = 5.0,
                 preload: Sequence[str] = PRELOAD):
        super().__init__(limits)
        self.keep_workdir, self.grace, self.preload = keep_workdir, grace, tuple(preload)
        self.starts = 0
        self._lock = asyncio.Lock()
        self._server: ForkServer | None = None
        self._staged: dict[str, tuple[bytes, bool]] = {}  # write_file()s since the last program, for restarts
        self.last_phases: dict[str, float] = {}
        self._closed = False

    # ---- what a backend provides -------------------------------------------------------------------------
    @abc.abstractmethod
    async def _spawn(self) -> ForkServer:
        """Start a configured fork-server (its "ready" read and its config acknowledged).

        Raises:
            SandboxUnavailableError: it cannot start here; the message says what to install or fix.
        """

    def _oom_kills(self) -> int | None:
        """OOM kills so far in the sandbox's memory group, None where unknown."""
        return None

    def _kill_extra(self) -> None:
        """Synchronously kill what the fork-server's own death may not take down (e.g. a cgroup's members)."""

    async def _release(self) -> None:
        """Free what outlives fork-servers (a cgroup, a host dir); called once, on close."""

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the fork-server now (``exec`` also starts it on demand).

        Raises:
            SandboxUnavailableError: the backend cannot run here; the message says what to fix.
            SandboxClosedError: the sandbox was closed.
        """
        async with self._lock:
            await self._ensure_server()

    async def close(self) -> None:
        """Kill everything in the sandbox and release it; idempotent.

        Raises:
            Nothing: cleanup problems are logged. A cancel during close still leaves everything killed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_server()
        finally:
            await self._release()

    def __del__(self) -> None:  # last resort when a caller forgot to close
        server = getattr(self, "_server", None)
        if server is not None:
            server.kill_now()

    def host_pids(self) -> list[int]:
        """Host pids of every process now in the sandbox, its fork-server included (needs root or same uid)."""
        return self._server.host_pids() if self._server is not None else []

    @property
    def supervisor_pids(self) -> tuple[int, ...]:
        """Host pids of the sandbox's own processes (the fork-server)."""
        return self._server.supervisors if self._server is not None else ()

    # ---- the public operations -------------------------------------------------------------------------------
    async def exec(
        self,
        program: Program,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, str | bytes] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run one program; see :meth:`agentrl.sandbox.Sandbox.exec`.

        Raises:
            ConfigError: ``program`` is neither source nor an argv list, or ``timeout`` is not positive.
            SandboxFileError: a file in ``files`` could not be written.
            SandboxClosedError: the sandbox was closed (also when closed while this program ran).
            SandboxUnavailableError: the sandbox could not be (re)started.
            SandboxError: the fork-server failed to start the program (the sandbox is restarted).
        """
        timeout = self.limits.wall_time if timeout is None else float(timeout)
        if not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        req, blobs = exec_request(program, stdin, files, timeout)
        async with self._lock:
            server = await self._ensure_server()
            oom_before = self._oom_kills()
            started = time.monotonic()
            try:
                reply, out = await asyncio.wait_for(server.call(req, blobs), timeout + self.grace)
                if reply.get("kind") == "WipeError":  # a program left an undeletable tree: start afresh
                    log.warning("the sandbox's work dir could not be wiped; restarting it")
                    await self._stop_server()
                    server = await self._ensure_server()
                    reply, out = await asyncio.wait_for(server.call(req, blobs), timeout + self.grace)
            except (asyncio.TimeoutError, ServerLost) as exc:
                await self._stop_server()
                if self._closed:
                    raise SandboxClosedError("the sandbox was closed while a program ran") from None
                oom, timed_out = self._oom_since(oom_before), isinstance(exc, asyncio.TimeoutError)
                return ExecResult(
                    exit_code=None, signal=signal.SIGKILL, stdout="", stderr="",
                    wall_time=time.monotonic() - started, timed_out=timed_out and not oom, oom=oom,
                    limit="memory" if oom else "wall_time" if timed_out else None, sandbox_restarted=True,
                )
            except BaseException:
                await self._stop_server()  # cancelled mid-program: kill it all, the protocol state is unknown
                raise
            if not reply.get("ok"):
                if reply.get("kind") == "StagingError":
                    raise SandboxFileError(f"could not stage the program's files: {reply.get('error')}")
                await self._stop_server()
                raise SandboxError(f"the sandbox failed to run the program: {reply.get('error')}; it was restarted")
            self._staged.clear()
            self.last_phases = _phases(reply, time.monotonic() - started)
            if not reply["clean"]:
                log.warning("sandbox could not prove all processes dead; restarting it")
                await self._stop_server()
        return self._result(reply, out, oom_before)

    async def write_file(self, path: str, data: str | bytes, *, executable: bool = False) -> None:
        """See :meth:`agentrl.sandbox.Sandbox.write_file`.

        Raises:
            SandboxFileError: the path leaves the work dir or the file cannot be written.
            SandboxClosedError: the sandbox was closed.
        """
        payload = data.encode() if isinstance(data, str) else bytes(data)
        await self._file_op({"op": "write", "path": str(path), "executable": executable}, [payload])
        if not self.keep_workdir:
            self._staged[str(path)] = (payload, executable)

    async def read_file(self, path: str) -> bytes:
        """See :meth:`agentrl.sandbox.Sandbox.read_file`.

        Raises:
            SandboxFileError: no such regular file, too large, or outside the work dir.
            SandboxClosedError: the sandbox was closed.
        """
        _, blobs = await self._file_op({"op": "read", "path": str(path), "limit": self.limits.file_size}, [])
        return blobs[0]

    # ---- internals -------------------------------------------------------------------------------------------
    async def _file_op(self, req: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        async with self._lock:
            server = await self._ensure_server()
            try:
                reply, out = await asyncio.wait_for(server.call(req, blobs), START_TIMEOUT)
            except (asyncio.TimeoutError, ServerLost) as exc:
                await self._stop_server()
                raise SandboxError(f"the sandbox stopped answering during {req['op']}; it was restarted") from exc
            except BaseException:
                await self._stop_server()
                raise
        if not reply.get("ok"):
            raise SandboxFileError(f"{req['op']} {req['path']!r} failed: {reply.get('error')}")
        return reply, out

    def _result(self, reply: dict[str, Any], out: list[bytes], oom_before: int | None) -> ExecResult:
        limit = exit_limit(reply, self.limits.cpu_time, self._oom_since(oom_before))
        return ExecResult(
            exit_code=reply["exit_code"],
            signal=reply["signal"],
            stdout=out[0].decode("utf-8", "replace"),
            stderr=out[1].decode("utf-8", "replace"),
            stdout_truncated=reply["stdout_total"] > len(out[0]),
            stderr_truncated=reply["stderr_total"] > len(out[1]),
            wall_time=reply["wall"],
            cpu_time=reply["cpu"],
            peak_memory=reply["maxrss"] or None,
            timed_out=limit in ("wall_time", "cpu_time"),
            oom=limit == "memory",
            limit=limit,
            sandbox_restarted=not reply["clean"],
        )

    def _oom_since(self, before: int | None) -> bool:
        after = self._oom_kills()
        return before is not None and after is not None and after > before

    async def _ensure_server(self) -> ForkServer:
        """The running fork-server, (re)started as needed, with the staged files written again after a restart."""
        if self._closed:
            raise SandboxClosedError("this sandbox is closed; open a new one")
        if self._server is not None and not self._server.died():
            return self._server
        await self._stop_server()
        try:
            server = self._server = await self._spawn()
            self.starts += 1
            for path, (data, executable) in self._staged.items():
                reply, _ = await server.call({"op": "write", "path": path, "executable": executable}, [data])
                if not reply.get("ok"):
                    raise SandboxFileError(f"could not restage {path!r} after a restart: {reply.get('error')}")
        except BaseException:
            await self._stop_server()
            raise
        return server

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.kill_now()  # before any await: this must happen even if we are being cancelled
            self._kill_extra()
            await server.stop()


SUPERVISOR_NICE = -10
_HERE = Path(__file__).parent
_STRIP = "# stripped when shipped"


def server_source() -> str:
    """The fork-server as one Python source: its parts, then its main module (import lines for linters out)."""
    texts = [(_HERE / name).read_text() for name in ("_forkparts.py", "_forkserver.py")]
    return "\n".join(line for text in texts for line in text.splitlines() if not line.endswith(_STRIP)) + "\n"




def prioritise(pid: int) -> None:
    """Raise the fork-server's CPU priority (root only; its programs go back to nice 0 after the fork).

    Its memory watch must run while the programs it watches hog every core, or they reach the memory
    cgroup's hard cap first, where a group without swap can thrash on page cache instead of OOM-killing.
    """
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, SUPERVISOR_NICE)


def _phases(reply: dict[str, Any], total: float) -> dict[str, float]:
    phases = {k: float(v) for k, v in (reply.get("phases") or {}).items() if k in ("prepare", "program", "kill")}
    return {**phases, "channel": max(0.0, total - sum(phases.values()))}


def exit_limit(reply: dict[str, Any], cpu_time: float, oom_killed: bool) -> str | None:
    """Which limit ended (or, for ``disk``/``shm``, starved) a program, from the fork-server's reply.

    The fork-server names the limits it enforces itself (``memory``: its watch of all processes together,
    ``wall_time``); an OOM kill in the sandbox's memory cgroup is ``memory`` too. ``SIGXCPU`` comes only from
    the kernel's CPU-time rlimit (or the program signalling itself), so it is ``cpu_time`` whatever the rusage
    clock says (the two clocks disagree by a tick or more under load); a SIGKILL at the hard rlimit, one
    second later, is recognised by the CPU time used. A program that failed with its work dir or
    ``/dev/shm`` full reports ``disk`` / ``shm``.
    """
    if reply.get("limit") == "memory" or oom_killed:  # an OOM kill before a time-out is still memory
        return "memory"
    if reply.get("limit") == "wall_time":
        return "wall_time"
    if reply["signal"] == signal.SIGXCPU or (reply["signal"] == signal.SIGKILL and reply["cpu"] >= 0.9 * cpu_time):
        return "cpu_time"
    if reply["exit_code"] != 0 and reply.get("full"):
        return str(reply["full"][0])
    return None


async def configure(server: Any, config: dict[str, Any], filters: Sequence[bytes]) -> dict[str, Any]:
    """Send the fork-server its configuration and seccomp filters; its answer, once warmed up.

    Raises:
        SandboxError: it refused the configuration.
        asyncio.TimeoutError / ServerLost: it did not answer.
    """
    reply, _ = await asyncio.wait_for(server.call(config, list(filters)), START_TIMEOUT)
    if not reply.get("ok"):
        raise SandboxError(f"the fork-server refused its configuration: {reply}")
    return reply


def exec_request(
    program: Program, stdin: str | bytes | None, files: Mapping[str, str | bytes] | None, timeout: float
) -> tuple[dict[str, Any], list[bytes]]:
    """The fork-server's ``exec`` message for one program.

    Raises:
        ConfigError: ``program`` is neither source nor a non-empty argv list of str.
    """
    req: dict[str, Any] = {"op": "exec", "timeout": timeout, "files": []}
    if isinstance(program, str):
        req["code"] = program
    elif isinstance(program, Sequence) and program and all(isinstance(a, str) for a in program):
        req["argv"] = list(program)
    else:
        raise ConfigError("program must be Python source (str) or a non-empty argv list of str")
    blobs = [stdin.encode() if isinstance(stdin, str) else bytes(stdin or b"")]
    for path, data in (files or {}).items():
        req["files"].append([str(path), False])
        blobs.append(data.encode() if isinstance(data, str) else bytes(data))
    return req, blobs
