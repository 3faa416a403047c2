"""The host's side of one fork-server: how bubblewrap is launched, the message channel, and the kill.

:class:`ServerProcess` owns one running fork-server (inside bubblewrap, or directly in the unsafe mode) and
speaks its protocol: a 4-byte big-endian length, a JSON header, then the raw blobs the header sizes. It
treats the fork-server as untrusted: replies are size-checked, and anything unexpected is
:class:`ServerLost`, after which the caller kills and replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from agentrl._fd import readable
from agentrl.sandbox import SandboxLimits

__all__ = ["Channel", "ServerLost", "ServerProcess", "bwrap_argv", "descendants"]

log = logging.getLogger(__name__)
_MAX_HEADER = 1 << 20


class ServerLost(Exception):
    """The fork-server stopped answering (it died, or wrote something that is not a reply)."""


class _Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class Channel:
    """The fork-server's wire protocol over any byte stream pair (a pipe, a container's attach socket).

    A message is a 4-byte big-endian length, a JSON header, then the raw blobs whose sizes the header lists.
    Replies are untrusted: a malformed or oversized one is :class:`ServerLost`.
    """

    def __init__(self, writer: _Writer, reader: _Reader, reply_limit: int):
        self.writer, self.reader, self.reply_limit = writer, reader, reply_limit

    async def call(self, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request and read its reply.

        Raises:
            ServerLost: the fork-server is gone or replied with something malformed.
        """
        data = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
        try:
            self.writer.write(b"".join([struct.pack(">I", len(data)), data, *blobs]))
            await self.writer.drain()
        except (ConnectionError, RuntimeError, OSError) as exc:
            raise ServerLost(str(exc)) from exc
        return await self.recv()

    async def recv(self) -> tuple[dict[str, Any], list[bytes]]:
        """Read one message. Raises :class:`ServerLost` on EOF or a malformed or oversized message."""
        reader = self.reader
        try:
            (size,) = struct.unpack(">I", await reader.readexactly(4))
            if size > _MAX_HEADER:
                raise ServerLost(f"oversized reply header ({size} bytes)")
            header = json.loads(await reader.readexactly(size))
            sizes = header.get("blobs", []) if isinstance(header, dict) else None
            if not isinstance(sizes, list) or sum(sizes) > self.reply_limit:
                raise ServerLost("malformed reply")
            return header, [await reader.readexactly(n) for n in sizes]
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, TypeError, AttributeError) as exc:
            raise ServerLost(str(exc)) from exc


def _parents() -> dict[int, int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parents[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


@functools.cache
def _children_files() -> bool:
    """Whether the kernel lists each task's children (``/proc/<pid>/task/<tid>/children``, CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(child) for child in f.read().split()]
    return found


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root``: from each task's ``children`` list where the kernel keeps one
    (a few reads), else from the parent pid of every process in ``/proc`` (a scan of the whole machine)."""
    found: set[int] = set()
    if _children_files():
        frontier = [root]
        while frontier:
            frontier = [child for pid in frontier for child in _children(pid) if child not in found]
            found.update(frontier)
        return sorted(found)
    parents, level = _parents(), {root}
    while level:
        level = {p for p, pp in parents.items() if pp in level and p not in found}
        found |= level
    return sorted(found)


@functools.cache
def bwrap_supports(bwrap: str, flag: str) -> bool:
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in out.stdout + out.stderr


def bwrap_argv(
    bwrap: str, python: str, source: str, limits: SandboxLimits, *, workdir: str, seccomp_fd: int,
    ro_binds: Sequence[str] = (),
) -> list[str]:
    """The bubblewrap command line that runs ``python -I -c source`` as pid 1 of a fresh sandbox."""
    argv = [bwrap, "--unshare-all", "--unshare-user"]
    if bwrap_supports(bwrap, "--disable-userns"):
        argv.append("--disable-userns")  # older bubblewrap: the seccomp filter still refuses unshare/clone
    argv += ["--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
             "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / top
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    for extra in ro_binds:
        argv += ["--ro-bind", extra, extra]
    if limits.network:
        argv.append("--share-net")
        for etc in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates"):
            argv += ["--ro-bind-try", etc, etc]
    return [
        *argv, "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.disk), "--perms", "0700", "--tmpfs", workdir,
        "--size", str(limits.shm), "--perms", "0700", "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev", "--remount-ro", "/",  # the root and /dev are tmpfs too: no writes there
        "--hostname", "sandbox", "--chdir", workdir, "--seccomp", str(seccomp_fd),
        python, "-I", "-c", source,
    ]


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _privileges_dropped_by_exec(
    make_argv: Callable[[int], list[str]], ids: dict[str, Any]
) -> tuple[Callable[[int], list[str]], dict[str, Any]]:
    """Drop to ``ids`` in util-linux's ``setpriv``, which then execs the command, instead of in the child of a
    ``fork``: Python can start a child with ``vfork`` only when it changes no ids, and a ``fork`` copies the
    page tables of this process (gigabytes with a model loaded), which costs more than the sandbox's start.
    Without ``setpriv``, the ids travel to the ``fork`` unchanged."""
    setpriv = _setpriv()
    if not ids or setpriv is None or ids.get("extra_groups") not in (None, [], ()):
        return make_argv, ids
    drop = [setpriv, f"--reuid={int(ids['user'])}", f"--regid={int(ids['group'])}", "--clear-groups", "--"]
    return (lambda fd: [*drop, *make_argv(fd)]), {}


class ServerProcess:
    """One running fork-server and the channel to it.

    Attributes:
        proc: the process we started (bubblewrap, or the fork-server itself in the unsafe mode).
        supervisors: host pids of the fork-server (pid 1 inside the sandbox).
        pid_ns: the sandbox's pid namespace (``readlink /proc/<pid>/ns/pid``), None in the unsafe mode.
    """

    def __init__(self, proc: asyncio.subprocess.Process, *, unsafe: bool, reply_limit: int):
        self.proc, self.unsafe, self.reply_limit = proc, unsafe, reply_limit
        self.supervisors: tuple[int, ...] = ()
        self.pid_ns: str | None = None
        self._pidfd: int | None = None
        self._stderr_tail: deque[bytes] = deque(maxlen=32)
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())
        assert proc.stdin is not None and proc.stdout is not None
        self.channel = Channel(proc.stdin, proc.stdout, reply_limit)

    @classmethod
    async def spawn(
        cls, make_argv: Callable[[int], list[str]], *, seccomp: bytes, cwd: str, ids: dict[str, Any],
        unsafe: bool, reply_limit: int, extra_fds: Sequence[int] = (),
    ) -> ServerProcess:
        """Start ``make_argv(fd)``, where ``fd`` reads the seccomp filter (for ``bwrap --seccomp fd``).

        Args:
            ids: ``user``/``group``/``extra_groups`` to drop to before the exec (empty when not root).
            extra_fds: more descriptors the fork-server inherits under the same numbers.
        """
        argv_of, ids = _privileges_dropped_by_exec(make_argv, ids)
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, seccomp)  # ~1 KB: fits in the pipe, no reader needed yet
        finally:
            os.close(write_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv_of(read_fd), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(read_fd, *extra_fds), cwd=cwd, env={}, start_new_session=True, **ids,
            )
        finally:
            os.close(read_fd)
        return cls(proc, unsafe=unsafe, reply_limit=reply_limit)

    def find_supervisors(self) -> None:
        """Record the fork-server's host pid; call once it said "ready" (it forks nothing before its config).

        Raises:
            RuntimeError: bubblewrap's process tree is not bubblewrap -> fork-server (e.g. a setuid bwrap).
        """
        if self.unsafe:
            self.supervisors = (self.proc.pid,)
            return
        tree = descendants(self.proc.pid)
        if len(tree) != 1:
            raise RuntimeError(f"unexpected bubblewrap process tree {tree}; is bwrap setuid?")
        self.supervisors = (tree[0],)
        self.pid_ns = os.readlink(f"/proc/{tree[0]}/ns/pid")
        self._pidfd = os.pidfd_open(tree[0])

    def died(self) -> bool:
        """The fork-server exited, even if asyncio has not noticed yet."""
        if self.proc.returncode is not None:
            return True
        return self._pidfd is not None and readable(self._pidfd)

    def host_pids(self) -> list[int]:
        """Host pids of every process in the sandbox (by pid namespace; by process tree when unsafe)."""
        if self.unsafe:
            return [self.proc.pid, *descendants(self.proc.pid)]
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{name}/ns/pid") == self.pid_ns:
                        found.append(int(name))
        return sorted(found)

    async def call(self, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request and read its reply (see :meth:`Channel.call`)."""
        return await self.channel.call(header, blobs)

    async def recv(self) -> tuple[dict[str, Any], list[bytes]]:
        """Read one message (see :meth:`Channel.recv`)."""
        return await self.channel.recv()

    def error_output(self) -> str:
        """The end of what bubblewrap or the fork-server wrote to stderr (for start-up errors)."""
        return b"".join(self._stderr_tail).decode("utf-8", "replace").strip()[-2000:]

    async def _drain_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await stderr.read(4096):
                self._stderr_tail.append(chunk)

    def kill_now(self) -> None:
        """SIGKILL everything, synchronously: safe inside a cancellation, before any await."""
        if self.proc.returncode is not None:
            return
        if self.unsafe:  # no namespace takes the programs down with the server: kill the tree first
            for _ in range(100):
                pids = descendants(self.proc.pid)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        # Killing the fork-server (pid 1 inside) makes the kernel kill everything in its namespace; bubblewrap
        # outside then reaps it and exits. Killing bubblewrap first would leave that reaping to the host's init.
        for pid in self.supervisors or (self.proc.pid,):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Kill everything and wait until the sandbox's pid namespace is gone (at most ~10 s, then log)."""
        self.kill_now()
        pidfd, self._pidfd = self._pidfd, None
        try:
            if pidfd is not None:
                await _wait_readable(pidfd, 10)  # readable once pid 1, and so the whole namespace, is gone
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                os.kill(self.proc.pid, signal.SIGKILL)
                await asyncio.wait_for(self.proc.wait(), 5)
        except (asyncio.TimeoutError, ProcessLookupError):
            log.warning("sandbox processes did not exit within 10 s of SIGKILL")
        finally:
            if pidfd is not None:
                os.close(pidfd)
            self._stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stderr_task


async def _wait_readable(fd: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)
