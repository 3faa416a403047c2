"""The local sandbox: bubblewrap around a warm fork-server. No daemon; a few milliseconds per program.

Design (see :mod:`agentrl_sandboxes._forkserver` for the part inside):

- **One bubblewrap per sandbox**, launched as an unprivileged uid (65534 when we are root: bubblewrap started
  by root keeps root's reach), with ``--unshare-all --unshare-user --disable-userns --die-with-parent
  --new-session --cap-drop ALL --clearenv``. Its filesystem is ``/usr`` (and the ``/bin``, ``/lib*``
  symlinks) read-only, a fresh ``/proc`` and ``/dev``, sized tmpfs for ``/tmp`` (the work dir) and
  ``/dev/shm``, and a read-only root: no ``/etc``, ``/home``, ``/run``, no docker socket, no host secrets.
- **A seccomp deny-list** for the whole sandbox (:mod:`agentrl_sandboxes._seccomp`), passed as
  ``--seccomp FD``, plus a per-program filter that keeps programs from signalling the fork-server.
- **A warm fork-server**, pid 1 of the sandbox's own pid namespace (``--as-pid-1``: no bubblewrap init
  that programs could reach, and the kernel drops every signal a program sends it), forks one child per
  program with rlimits (address space, data, processes, open files, file size, CPU, no core dumps),
  enforces the deadline, keeps draining output past the caps, kills *every* other process in the namespace
  when the program ends, and wipes ``/tmp`` and ``/dev/shm`` before the next program.
- **From outside**, the host enforces a backstop deadline (``timeout + grace``): if the fork-server does not
  answer, dies, cannot prove the namespace empty or cannot wipe the work dir, it is SIGKILLed (as pid 1, its
  whole namespace goes with it: the kernel kills every process in it) and a fresh one is started.
- **cgroups where available** (detected, never assumed; :mod:`agentrl_sandboxes._cgroups`): a total memory cap
  covering every process and the tmpfs pages, a process cap, a CPU quota, and OOM-kill counts for ``oom``.

Without bubblewrap, :class:`LocalSandbox` refuses to start and says how to install it, unless the caller
passes ``unsafe_no_bwrap=True``: programs then run on the host as an unprivileged uid (when root) in a
temporary work dir, with the same rlimits, seccomp filters (no network) and kill-everything-it-started
(by process tree, via a child subreaper), but **no filesystem or pid isolation**. Never for untrusted code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl.sandbox import (
    ExecResult,
    Program,
    Sandbox,
    SandboxClosedError,
    SandboxError,
    SandboxFileError,
    SandboxLimits,
    SandboxUnavailableError,
)
from agentrl_sandboxes import _seccomp
from agentrl_sandboxes._cgroups import Cgroup, create_cgroup
from agentrl_sandboxes._process import ServerLost, ServerProcess, bwrap_argv

__all__ = ["LocalSandbox"]

log = logging.getLogger(__name__)
_counter = itertools.count()
_SERVER_SOURCE = Path(__file__).with_name("_forkserver.py")
_START_TIMEOUT = 20.0
_CGROUP_OVERHEAD = 64 * 1024 * 1024  # the fork-server, page tables
_INSTALL = "install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` (Fedora)"


class LocalSandbox(Sandbox):
    """bubblewrap + a warm fork-server. Registered as ``"local"`` in the ``agentrl.sandboxes`` group.

    Args:
        limits: the limits of every program.
        python: the interpreter inside the sandbox; it must live under ``/usr`` (or ``ro_binds``).
        uid / gid: the unprivileged ids the sandbox runs as when the host process is root.
        keep_workdir: keep files in ``/tmp`` from one program to the next (processes are still killed);
            by default the work dir is wiped before each program, except files staged with ``write_file``.
        ro_binds: extra host paths to expose read-only (e.g. a virtualenv with the packages programs need).
        cgroups: use cgroups where the machine offers them.
        grace: seconds the host waits past ``timeout`` before it kills the whole sandbox itself.
        unsafe_no_bwrap: run without bubblewrap (no filesystem or pid isolation); see the module docstring.
        bwrap: the bubblewrap executable (found on ``PATH`` by default).

    Attributes:
        starts: how many fork-servers were started (1 + restarts).
    """

    name = "local"

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        python: str = "/usr/bin/python3",
        uid: int = 65534,
        gid: int = 65534,
        keep_workdir: bool = False,
        ro_binds: Sequence[str] = (),
        cgroups: bool = True,
        grace: float = 5.0,
        unsafe_no_bwrap: bool = False,
        bwrap: str | None = None,
    ) -> None:
        super().__init__(limits)
        self.python, self.uid, self.gid = python, uid, gid
        self.keep_workdir, self.ro_binds, self.use_cgroups = keep_workdir, tuple(ro_binds), cgroups
        self.grace, self.unsafe_no_bwrap = grace, unsafe_no_bwrap
        self.bwrap = bwrap or shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")
        self.starts = 0
        self._lock = asyncio.Lock()
        self._server: ServerProcess | None = None
        self._cgroup: Cgroup | None = None
        self._workdir: str | None = None  # the host dir used as work dir in the unsafe mode
        self._staged: dict[str, tuple[bytes, bool]] = {}  # write_file()s since the last program, for restarts
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start bubblewrap and the fork-server now (``exec`` also starts them on demand).

        Raises:
            SandboxUnavailableError: bubblewrap or the interpreter is missing, or user namespaces are off.
            SandboxClosedError: the sandbox was closed.
        """
        async with self._lock:
            await self._ensure_server()

    async def close(self) -> None:
        """Kill everything in the sandbox, wait until its pid namespace is gone, and remove its cgroup.

        Raises:
            Nothing: cleanup problems are logged. A cancel during close still leaves everything killed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_server()
        finally:
            if self._cgroup is not None:
                self._cgroup.kill()
                self._cgroup.remove()
                self._cgroup = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __del__(self) -> None:  # last resort when a caller forgot to close; --die-with-parent covers exits
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
        req, blobs = _exec_request(program, stdin, files, timeout)
        async with self._lock:
            server = await self._ensure_server()
            oom_before = self._cgroup.oom_kills() if self._cgroup else None
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
                return ExecResult(
                    exit_code=None, signal=signal.SIGKILL, stdout="", stderr="",
                    wall_time=time.monotonic() - started, timed_out=isinstance(exc, asyncio.TimeoutError),
                    oom=self._oom_since(oom_before), sandbox_restarted=True,
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
                reply, out = await asyncio.wait_for(server.call(req, blobs), _START_TIMEOUT)
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
        cpu_killed = reply["signal"] in (signal.SIGXCPU, signal.SIGKILL) and reply["cpu"] >= self.limits.cpu_time
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
            timed_out=reply["timed_out"] or cpu_killed,
            oom=self._oom_since(oom_before),
            sandbox_restarted=not reply["clean"],
        )

    def _oom_since(self, before: int | None) -> bool:
        after = self._cgroup.oom_kills() if self._cgroup else None
        return before is not None and after is not None and after > before

    async def _ensure_server(self) -> ServerProcess:
        """The running fork-server, (re)started as needed, with the staged files written again after a restart."""
        if self._closed:
            raise SandboxClosedError("this sandbox is closed; open a new one")
        if self._server is not None and not self._server.died():
            return self._server
        await self._stop_server()
        try:
            server = await self._start_server()
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
            if self._cgroup is not None:
                self._cgroup.kill()
            await server.stop()

    def _check_host(self) -> None:
        if self.unsafe_no_bwrap:
            log.warning("LocalSandbox(unsafe_no_bwrap=True): no filesystem or pid isolation; not for untrusted code")
        elif self.bwrap is None or not os.access(self.bwrap, os.X_OK):
            raise SandboxUnavailableError(
                f"the local sandbox needs bubblewrap (`bwrap`), which is not installed: {_INSTALL}. "
                "To run trusted code without isolation, pass unsafe_no_bwrap=True."
            )
        if not os.access(self.python, os.X_OK):
            raise SandboxUnavailableError(
                f"the sandbox interpreter {self.python!r} is missing: `apt-get install python3-minimal`, "
                "or pass python=... (a path under /usr or under one of ro_binds)"
            )

    def _make_argv(self, workdir: str, seccomp_fd: int) -> list[str]:
        source = _SERVER_SOURCE.read_text()
        if self.unsafe_no_bwrap:
            return [self.python, "-I", "-c", source]
        assert self.bwrap is not None
        return bwrap_argv(self.bwrap, self.python, source, self.limits, workdir=workdir, seccomp_fd=seccomp_fd,
                          ro_binds=self.ro_binds)

    async def _start_server(self) -> ServerProcess:
        self._check_host()
        limits, root = self.limits, os.geteuid() == 0
        workdir = "/tmp"
        if self.unsafe_no_bwrap:
            if self._workdir is None:
                self._workdir = tempfile.mkdtemp(prefix="agentrl-sandbox-")
                if root:
                    os.chown(self._workdir, self.uid, self.gid)
            workdir = self._workdir
        server = self._server = await ServerProcess.spawn(
            lambda fd: self._make_argv(workdir, fd), seccomp=_seccomp.sandbox_filter(network=limits.network),
            cwd=workdir if self.unsafe_no_bwrap else "/", unsafe=self.unsafe_no_bwrap,
            ids={"user": self.uid, "group": self.gid, "extra_groups": []} if root else {},
            reply_limit=2 * limits.output_bytes + limits.file_size + (1 << 20),
        )
        self.starts += 1
        try:
            await asyncio.wait_for(server.recv(), _START_TIMEOUT)  # "ready"
            server.find_supervisors()
        except (asyncio.TimeoutError, ServerLost, RuntimeError) as exc:
            raise SandboxUnavailableError(_start_failure(server.error_output() or str(exc))) from exc
        self._join_cgroup(server)
        filters = [_seccomp.program_filter(server_pid=server.proc.pid if self.unsafe_no_bwrap else 1)]
        if self.unsafe_no_bwrap:
            filters.append(_seccomp.sandbox_filter(network=limits.network))
        config = {
            "work": workdir, "kill_mode": "descendants" if self.unsafe_no_bwrap else "namespace",
            "keep_workdir": self.keep_workdir, "limits": limits.to_dict(),
        }
        reply, _ = await asyncio.wait_for(server.call(config, filters), _START_TIMEOUT)
        if not reply.get("ok"):
            raise SandboxUnavailableError(f"the fork-server refused its configuration: {reply}")
        return server

    def _join_cgroup(self, server: ServerProcess) -> None:
        limits = self.limits
        if self.use_cgroups and self._cgroup is None:
            self._cgroup = create_cgroup(
                f"agentrl-{os.getpid()}-{next(_counter)}", memory=limits.memory + limits.disk + limits.shm
                + _CGROUP_OVERHEAD, processes=limits.processes + 8, cpus=limits.cpus,
            )
        if self._cgroup is not None:
            for pid in server.supervisors:  # nothing has forked yet: the fork-server waits for its config
                self._cgroup.add(pid)


def _start_failure(message: str) -> str:
    hint = ""
    if "namespace" in message or "Operation not permitted" in message:
        hint = (" Unprivileged user namespaces look disabled: `sysctl -w kernel.unprivileged_userns_clone=1` "
                "(Debian) or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu 24.04+).")
    return f"the local sandbox failed to start: {message or 'no error output'}.{hint}"


def _exec_request(
    program: Program, stdin: str | bytes | None, files: Mapping[str, str | bytes] | None, timeout: float
) -> tuple[dict[str, Any], list[bytes]]:
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
