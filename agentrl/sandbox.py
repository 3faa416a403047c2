"""The Sandbox protocol: run untrusted programs with explicit limits, and get an :class:`ExecResult` back.

::

    async with open_sandbox("local", SandboxLimits(wall_time=5)) as sb:
        result = await sb.exec("print(input())", stdin="hi")
        assert result.stdout == "hi\\n"

A sandbox is the project's security boundary: the programs it runs are written by a policy that is rewarded
for passing tests and will use every loophole it is given. Every backend promises the same things:

- nothing outside the sandbox's work dir is writable, and no host secret (files, environment) is readable;
- no network unless :attr:`SandboxLimits.network` asks for it;
- every process a program started is dead when ``exec`` returns, when the sandbox closes, and when the
  ``exec`` or the owner is cancelled;
- a program's failure (crash, timeout, memory, output flood) is *data* in the :class:`ExecResult`, never an
  exception; exceptions (:class:`SandboxError`) mean the sandbox itself could not do its job.

Backends are found by name through the ``agentrl.sandboxes`` entry-point group (read lazily, on first use),
or registered in-process with :func:`register_sandbox`::

    [project.entry-points."agentrl.sandboxes"]
    local = "agentrl_sandboxes.local:LocalSandbox"
"""

from __future__ import annotations

import abc
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from agentrl._plugins import load_object
from agentrl.errors import AgentRLError, ConfigError, PluginError

if TYPE_CHECKING:
    from agentrl.sandbox_tests import TestRun

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExecResult",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxFileError",
    "SandboxLimits",
    "SandboxNotFoundError",
    "SandboxUnavailableError",
    "has_sandbox",
    "list_sandboxes",
    "open_sandbox",
    "register_sandbox",
    "sandbox_class",
]

ENTRY_POINT_GROUP = "agentrl.sandboxes"
MiB = 1024 * 1024


class SandboxError(AgentRLError, RuntimeError):
    """The sandbox itself failed (not the program it ran); the message names the cause and the fix."""


class SandboxNotFoundError(SandboxError, LookupError):
    """No sandbox backend is registered under the requested name."""


class SandboxUnavailableError(SandboxError):
    """The backend cannot run on this machine (a system package or kernel feature is missing)."""


class SandboxClosedError(SandboxError):
    """The sandbox was used after ``close()``."""


class SandboxFileError(SandboxError, OSError):
    """``write_file`` / ``read_file`` failed: no such file, not a regular file, too large, outside the work dir."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandbox may use. Every field is enforced by every backend unless its docstring says otherwise.

    Attributes:
        wall_time: seconds of wall-clock time per ``exec`` (the default ``timeout``).
        cpu_time: seconds of CPU time per process.
        memory: bytes of memory held by all the program's processes *together* (its children, their
            children, threads): the proportional set size of anonymous and shared-memory pages, so a page
            shared after ``fork`` counts once. Passing it ends the whole program (``ExecResult.limit ==
            "memory"``). Enforced on every backend by the sandbox's supervisor, which sums ``/proc`` every
            5 ms or so (a fast allocator can overshoot by what it allocates in that time); where a memory
            cgroup is available the kernel also caps it, with no delay: the local backend at ``memory`` +
            the bytes of files now in tmpfs + 64 MiB while a program runs, docker at memory + ``disk`` +
            ``shm`` + 64 MiB; an OOM kill there ends the whole program too. Each process is also capped at
            ``memory`` of address space (``RLIMIT_AS``): one allocation larger than that fails inside the
            program (``MemoryError``) instead of ending it. Files written do not count here.
        processes: processes and threads alive at once.
        open_files: open file descriptors per process.
        output_bytes: bytes of stdout and of stderr kept per ``exec`` (each); the rest is drained and
            counted, so a flooding program neither blocks nor fills the host.
        file_size: largest file a program may write, and the largest ``read_file`` returns.
        disk: bytes of files in the work dir (``/tmp``), a size-capped filesystem: a write past it fails
            with ``ENOSPC`` (``ExecResult.limit == "disk"`` when the program then fails).
        shm: bytes of files in ``/dev/shm`` (POSIX shared memory), likewise (``limit == "shm"``).
        cpus: CPU cores the whole sandbox may keep busy, where the backend has a CPU cgroup.
        network: allow network access (off by default; even loopback services of the host are unreachable).
    """

    wall_time: float = 10.0
    cpu_time: float = 10.0
    memory: int = 512 * MiB
    processes: int = 64
    open_files: int = 256
    output_bytes: int = 1 * MiB
    file_size: int = 64 * MiB
    disk: int = 256 * MiB
    shm: int = 16 * MiB
    cpus: float = 1.0
    network: bool = False

    def __post_init__(self) -> None:
        for name in ("wall_time", "cpu_time", "cpus"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"SandboxLimits.{name} must be a positive number of seconds/cores, got {value!r}")
        minimum = {"memory": 16 * MiB, "processes": 1, "open_files": 16, "output_bytes": 0, "file_size": 0,
                   "disk": 64 * 1024, "shm": 64 * 1024}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"SandboxLimits.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.network, bool):
            raise ConfigError(f"SandboxLimits.network must be True or False, got {self.network!r}")

    def to_dict(self) -> dict[str, Any]:
        """The limits as plain JSON-serialisable values."""
        return asdict(self)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program. A crash, timeout or flood is recorded here, never raised.

    Attributes:
        exit_code: the program's exit status, or None when a signal ended it.
        signal: the signal that ended the program (e.g. 9 for SIGKILL after a timeout), or None.
        stdout / stderr: the output, decoded as UTF-8 (undecodable bytes replaced), at most
            ``output_bytes`` bytes each.
        stdout_truncated / stderr_truncated: the program wrote more than was kept.
        wall_time: seconds from start to the end of the program.
        cpu_time: CPU seconds used by the program and every process it started.
        peak_memory: peak resident bytes of the program's largest process (``ru_maxrss`` of the main process
            and the children it waited for), or None where unknown.
        timed_out: the wall-clock or CPU-time limit ended the program (``limit`` says which).
        oom: the ``memory`` limit ended the program: its processes together passed it (an allocation refused
            under the per-process address-space cap shows up as the program's own error instead, e.g.
            ``MemoryError``). Files never cause it: a full ``disk`` or ``shm`` is ``limit`` alone.
        limit: which limit ended the program, or None: ``"wall_time"``, ``"cpu_time"``, ``"memory"``;
            or ``"disk"`` / ``"shm"`` when the program failed with that filesystem full.
        sandbox_restarted: the sandbox had to be rebuilt after this program (its supervisor was lost or
            did not answer in time); files left in the work dir are gone.
    """

    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time: float = 0.0
    cpu_time: float = 0.0
    peak_memory: int | None = None
    timed_out: bool = False
    oom: bool = False
    sandbox_restarted: bool = False
    limit: str | None = None

    @property
    def output_truncated(self) -> bool:
        """Either stream was cut at ``output_bytes``."""
        return self.stdout_truncated or self.stderr_truncated

    @property
    def ok(self) -> bool:
        """The program exited with status 0 within its limits."""
        return self.exit_code == 0 and not self.timed_out and not self.oom


Program = str | Sequence[str]
"""Python source (run by the sandbox's interpreter), or an argv list executed directly."""


class Sandbox(abc.ABC):
    """One isolated place to run programs, used as an async context manager.

    ``__aenter__`` starts it (backends may start lazily) and ``__aexit__`` closes it, also when the body
    raises or is cancelled. Calls on one sandbox run one at a time (concurrent calls wait their turn); run
    several sandboxes for parallelism.

    Attributes:
        name: the backend's registered name.
        limits: the limits every program in this sandbox runs under.
    """

    name: ClassVar[str] = "sandbox"
    limits: SandboxLimits

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits if limits is not None else SandboxLimits()

    async def start(self) -> None:
        """Make the sandbox ready (a no-op where the backend starts lazily).

        Raises:
            SandboxUnavailableError: the backend cannot run here; the message says what to install.
            SandboxClosedError: the sandbox was closed.
        """
        return None

    @abc.abstractmethod
    async def exec(
        self,
        program: Program,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, str | bytes] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run one program to completion and kill everything it started.

        Args:
            program: Python source, or an argv list (``["python3", "test.py"]``) run in the work dir.
            stdin: the program's standard input (empty when None).
            files: files to create in the work dir first, by path relative to it.
            timeout: wall-clock seconds; defaults to ``limits.wall_time``.

        Returns:
            The program's :class:`ExecResult`; crashes, timeouts and floods are recorded there.

        Raises:
            SandboxFileError: one of ``files`` could not be written (bad path, no space).
            SandboxClosedError: the sandbox was closed.
            SandboxError: the sandbox could not run programs (and could not be restarted).
        """

    async def run_tests(
        self,
        program: str,
        tests: str,
        *,
        timeout: float | None = None,
        files: Mapping[str, str | bytes] | None = None,
    ) -> TestRun:
        """Run ``program`` then ``tests``; passed only if the tests ran to their end (see :mod:`agentrl.sandbox_tests`).

        ``sys.exit(0)``, ``os._exit(0)``, ``atexit`` hooks or a self-kill before the tests end never pass: the
        verdict needs a per-call token that only reaches the sandbox's harness after the tests finished.

        Args:
            program: Python source of the code under test.
            tests: Python source of the tests (``assert`` lines, calls), run in the program's namespace.
            timeout: wall-clock seconds for both; defaults to ``limits.wall_time``.
            files: files to create in the work dir first.

        Returns:
            A :class:`~agentrl.sandbox_tests.TestRun`: ``passed``, ``status``, ``detail`` and the raw result.

        Raises:
            ConfigError: ``program`` or ``tests`` is not a string.
            SandboxClosedError / SandboxError: as from :meth:`exec`.
        """
        from agentrl.sandbox_tests import run_tests

        return await run_tests(self, program, tests, timeout=timeout, files=files)

    @abc.abstractmethod
    async def write_file(self, path: str, data: str | bytes, *, executable: bool = False) -> None:
        """Create or replace a file in the work dir; it is kept for the next ``exec``.

        Raises:
            SandboxFileError: the path leaves the work dir, or the file cannot be written (no space).
            SandboxClosedError: the sandbox was closed.
        """

    @abc.abstractmethod
    async def read_file(self, path: str) -> bytes:
        """The bytes of a regular file in the work dir (what the last program left there).

        Raises:
            SandboxFileError: no such regular file, larger than ``limits.file_size``, or outside the work dir.
            SandboxClosedError: the sandbox was closed.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill everything in the sandbox and release it. Idempotent; completes its kill even when cancelled.

        Raises:
            Nothing: failures to release host resources are logged, never raised.
        """

    @classmethod
    def reap(cls, *, everything: bool = False) -> list[str]:
        """Release what sandboxes of this backend left behind when their owner died (``agentrl sandbox gc``).

        Args:
            everything: also release the sandboxes of owners that are still running.

        Returns:
            What was removed, one short description each (empty where the backend leaves nothing behind).

        Raises:
            SandboxUnavailableError: the backend's service (e.g. the docker engine) cannot be reached.
        """
        return []

    async def __aenter__(self) -> Sandbox:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


SandboxFactory = Callable[..., Sandbox]
_REGISTRY: dict[str, str | SandboxFactory] = {}


def register_sandbox(name: str, factory: str | SandboxFactory, *, override: bool = False) -> None:
    """Register a backend in-process (packages use the ``agentrl.sandboxes`` entry-point group instead).

    Args:
        name: the name ``open_sandbox`` takes.
        factory: a :class:`Sandbox` subclass, a factory returning one, or ``"module:attr"``.
        override: replace an existing registration of the same name.

    Raises:
        ConfigError: the name is taken (and ``override`` is False) or ``factory`` is not ``"module:attr"``.
    """
    if isinstance(factory, str) and ":" not in factory:
        raise ConfigError(f"sandbox factory {factory!r} must look like 'package.module:ClassName'")
    if name in _REGISTRY and not override:
        raise ConfigError(f"sandbox backend {name!r} is already registered; pass override=True to replace it")
    _REGISTRY[name] = factory


_ENTRY_POINTS: dict[str, str] | None = None


def _entry_points(*, reload: bool = False) -> dict[str, str]:
    """The entry-point group, read once per process and again on ``reload``: reading it scans every
    installed distribution (~10 ms), and an env opens its sandboxes once per episode."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None or reload:
        from importlib.metadata import entry_points

        _ENTRY_POINTS = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _ENTRY_POINTS


def list_sandboxes() -> list[str]:
    """Names of every backend, registered in-process or through entry points. Loads no backend code."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _target(name: str) -> str | SandboxFactory | None:
    """What ``name`` is registered as; entry points are read again before saying None, so a package installed
    while this process runs is found."""
    return _REGISTRY.get(name) or _entry_points().get(name) or _entry_points(reload=True).get(name)


def has_sandbox(name: str) -> bool:
    """Whether a backend named ``name`` exists (registered in-process or through an entry point)."""
    return _target(name) is not None


def _load(name: str, target: str | SandboxFactory) -> SandboxFactory:
    return load_object(target, f"sandbox backend {name!r}")


def sandbox_class(name: str) -> SandboxFactory:
    """The class (or factory) registered as ``name``, without building a sandbox.

    Raises:
        SandboxNotFoundError: no backend by that name (the message suggests close names and how to install).
        PluginError: the backend's package failed to import.
    """
    target = _target(name)
    if target is None:
        known = list_sandboxes()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise SandboxNotFoundError(
            f"no sandbox backend {name!r}.{hint} Installed: {', '.join(map(repr, known)) or 'none'}. "
            f"Backends are found in the '{ENTRY_POINT_GROUP}' entry-point group: `pip install` the package "
            "that provides it (the bundled 'local' and 'docker' backends come with agentrl: reinstall it with "
            "`pip install -e .` if they are missing), or call agentrl.sandbox.register_sandbox(name, 'module:Class')."
        )
    return _load(name, target)


def open_sandbox(name: str, limits: SandboxLimits | None = None, **options: Any) -> Sandbox:
    """Build the sandbox backend registered as ``name``; use it with ``async with``.

    Args:
        name: a backend name such as ``"local"`` or ``"docker"``.
        limits: the limits for every program; defaults to :class:`SandboxLimits()`.
        **options: backend-specific options (see the backend's class docstring).

    Raises:
        SandboxNotFoundError: no backend by that name (the message suggests close names and how to install).
        PluginError: the backend's package failed to import, or its factory returned no :class:`Sandbox`.
    """
    sandbox = sandbox_class(name)(limits=limits, **options)
    if not isinstance(sandbox, Sandbox):
        raise PluginError(f"sandbox backend {name!r} returned {type(sandbox).__name__}, not an agentrl Sandbox")
    return sandbox
