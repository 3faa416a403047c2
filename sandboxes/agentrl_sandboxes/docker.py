"""The docker sandbox: one warm container per sandbox, with the fork-server as its only long-lived process.

Design (the fork-server, :mod:`agentrl_sandboxes._forkserver`, is the same one the local backend runs):

- **One container per sandbox**, created through the docker SDK from ``agentrl/sandbox-python`` (built
  locally by ``agentrl sandbox build``; see ``images/python/Dockerfile``). Its main process is the
  fork-server, as pid 1 of the container's pid namespace: the kernel drops signals programs send it, and
  ``kill(-1)`` from it reaches every other process. No ``--init``: docker's init forwards the signals it
  receives to its child, which would let a program kill the fork-server; the fork-server reaps orphans itself.
- **Flags**: network ``none`` (``bridge`` only when ``limits.network``), ``cap-drop ALL``,
  ``no-new-privileges``, a seccomp profile that denies what the local backend's filter denies (ptrace,
  io_uring, mount and namespace calls, bpf, keyrings, ...), pids / memory (= memory+swap, so no swap) / CPU
  limits, a read-only root, sized tmpfs ``/tmp`` (the work dir) and ``/dev/shm``, uid 65534, ulimits, log
  driver ``none`` (the default json log copies every byte a program prints onto the host's disk), no volumes
  (never the docker socket), and labels naming the owner process so :meth:`DockerSandbox.reap` (``agentrl
  sandbox gc``) removes containers whose owner died. Each program's process also gets the local backend's
  seccomp filters, and the fork-server enforces the wall-clock deadline *inside* the container.
- **The channel** is the container's attached stdin/stdout (``StdinOnce``): when the owner dies its socket
  closes, the fork-server reads EOF and exits, and the container (``AutoRemove``) goes away by itself;
  ``gc`` is the backstop. A program's output never crosses it except as a capped reply.
- **From outside**, the host enforces a backstop deadline (``timeout + grace``): a fork-server that does not
  answer is SIGKILLed (pid 1: the kernel kills the rest of the container) and a fresh container started.
  The host never signals a pid number: it signals through a pidfd verified to be the container's init
  (:func:`container_pidfd`), or, where it cannot verify one (the caller runs in another pid namespace, a
  remote engine, gVisor), has the engine kill and remove the container.
- ``runtime="runsc"`` runs the container under gVisor where it is installed (``apt-get install runsc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentrl._fd import readable
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
from agentrl_sandboxes._cgroups import cgroup_of
from agentrl_sandboxes._process import Channel, ServerLost

__all__ = ["DOCKERFILE", "DockerSandbox", "container_pidfd", "default_image", "docker_client", "owner_label"]

log = logging.getLogger(__name__)
DOCKERFILE = Path(__file__).with_name("images") / "python" / "Dockerfile"
_LABEL = "agentrl.sandbox"
_OWNER = "agentrl.owner"
_OVERHEAD = 64 * 1024 * 1024  # the fork-server, page tables
_GVISOR_THREADS = 256  # gVisor's own threads count against the container's pids cgroup
_INSTALL = ("install and start a docker engine (Debian: `apt-get install docker.io && dockerd &`), "
            "and the SDK with `pip install 'agentrl[docker]'`")


def default_image() -> str:
    """``agentrl/sandbox-python:<hash of the Dockerfile>``: a changed Dockerfile needs a fresh build."""
    return f"agentrl/sandbox-python:{hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()[:12]}"


def docker_client(base_url: str | None = None) -> Any:
    """A docker SDK client for ``base_url`` (the environment's ``DOCKER_HOST`` by default), checked with a ping.

    Raises:
        SandboxUnavailableError: the SDK is missing or no engine answers; the message says how to fix it.
    """
    try:
        import docker
    except ImportError as exc:
        raise SandboxUnavailableError(f"the docker sandbox needs the docker SDK: {_INSTALL}") from exc
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except Exception as exc:
        raise SandboxUnavailableError(f"no docker engine answers ({type(exc).__name__}: {exc}): {_INSTALL}") from exc
    return client


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")
    except OSError:
        return ""


def owner_label(pid: int | None = None) -> str:
    """``host/pid-namespace:pid:start-time`` of the owner: a recycled pid does not look like a live owner,
    and an owner in another pid namespace (a container, ``unshare --pid``) is not judged by its pid here."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_pid_namespace()}:{pid}:{_start_time(pid)}"


def _owner_alive(label: str) -> bool | None:
    """Whether the labelled owner still runs; None when it ran on another host or in another pid namespace."""
    place, _, rest = label.partition(":")
    pid, _, start = rest.partition(":")
    if place != f"{socket.gethostname()}/{_pid_namespace()}":
        return None
    return pid.isdigit() and _start_time(int(pid)) == start


def container_pidfd(pid: int, container_id: str) -> int | None:
    """A pidfd for ``pid`` only if, as this process sees it, that pid is the container's init; else None.

    The engine reports ``State.Pid`` in *its* pid namespace; from a caller in another one (a container, a
    hardened CI runner, ``unshare --pid``) that number is no pid at all, or an unrelated process's. So the
    pid is opened as a pidfd first, then checked through ``/proc``: it is in a pid namespace other than
    ours where it is pid 1 (``NSpid`` ends in 1), and its cgroup path names the container. The pidfd still
    being live after the checks proves they read the same process (a pid is reused only after its owner
    is gone). Signals then go through the pidfd, never a pid number.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        verified = (
            len(nspid) >= 2 and nspid[-1] == "1"
            and os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
            and container_id in Path(f"/proc/{pid}/cgroup").read_text()
            and not readable(pidfd)  # still the same, live process
        )
    except OSError:
        verified = False
    if verified:
        return pidfd
    os.close(pidfd)
    return None


def seccomp_profile(*, network: bool) -> dict[str, Any]:
    """Docker's JSON seccomp profile with the local backend's deny-list (allow by default, like its BPF)."""
    rules: list[dict[str, Any]] = [
        {"names": list(_seccomp.DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},  # so libc falls back to clone
    ]
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        # clone() creating any namespace (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET)
        rules.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                      "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    if not network:
        rules.append({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
                      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_NE"}]})
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}


class _Demux:
    """Reads a container's stdout out of docker's multiplexed attach stream (8-byte frame headers).

    stderr frames (the fork-server's own crash output) are kept, capped, for error messages.
    """

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self.buffer = bytearray()
        self.stderr_tail: deque[bytes] = deque(maxlen=32)
        self.eof = False

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                header = await self.reader.readexactly(8)
                kind, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = await self.reader.readexactly(size)
            except asyncio.IncompleteReadError:
                self.eof = True
                raise
            if kind == 1:
                self.buffer += payload
            elif kind == 2:
                self.stderr_tail.append(payload[-4096:])
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class ContainerServer:
    """One container running the fork-server, and the channel to it.

    Attributes:
        container_id: the docker id.
        supervisors: the fork-server's pid as this process sees it, where :func:`container_pidfd` verified it
            (a local engine, the caller in the engine's pid namespace, not gVisor); else (). Only watched and
            signalled through its pidfd; without one, the engine kills the container.
    """

    def __init__(self, client: Any, container_id: str, sock: socket.socket, engine_pid: int | None,
                 reply_limit: int):
        self.client, self.container_id, self.sock = client, container_id, sock
        self._pidfd = container_pidfd(engine_pid, container_id) if engine_pid else None
        self.supervisors: tuple[int, ...] = (engine_pid,) if self._pidfd is not None and engine_pid else ()
        self.pid_ns: str | None = None
        if self.supervisors:
            with contextlib.suppress(OSError):  # gone already: host_pids() is then empty
                self.pid_ns = os.readlink(f"/proc/{engine_pid}/ns/pid")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._demux: _Demux | None = None
        self.channel: Channel | None = None
        self.reply_limit = reply_limit

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)
        self._demux = _Demux(self._reader)
        self.channel = Channel(self._writer, self._demux, self.reply_limit)

    async def call(self, header: dict[str, Any], blobs: Any = ()) -> tuple[dict[str, Any], list[bytes]]:
        if self.channel is None:
            raise ServerLost("not connected")
        return await self.channel.call(header, blobs)

    async def recv(self) -> tuple[dict[str, Any], list[bytes]]:
        if self.channel is None:
            raise ServerLost("not connected")
        return await self.channel.recv()

    def error_output(self) -> str:
        tail = self._demux.stderr_tail if self._demux else ()
        return b"".join(tail).decode("utf-8", "replace").strip()[-2000:]

    def died(self) -> bool:
        if self._demux is not None and self._demux.eof:
            return True
        return self._pidfd is not None and readable(self._pidfd)

    def host_pids(self) -> list[int]:
        """Host pids of every process in the container (by pid namespace; [] for a remote engine)."""
        found = []
        for name in os.listdir("/proc") if self.pid_ns else ():
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/{name}/ns/pid") == self.pid_ns:
                    found.append(int(name))
        return sorted(found)

    def kill_now(self) -> None:
        """SIGKILL the fork-server through its verified pidfd (pid 1: the kernel kills the rest) and close the
        channel; no await. Without a pidfd, :meth:`stop` has the engine kill the container."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()

    async def stop(self) -> None:
        """Kill the container and wait until docker has removed it (at most ~10 s, then log)."""
        self.kill_now()
        try:
            await asyncio.shield(asyncio.to_thread(_remove_container, self.client, self.container_id))
        finally:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


def _close_quietly(*objects: Any) -> None:
    """Close the SDK's HTTP response and socket objects of an attach (innermost last), ignoring errors."""
    for obj in objects:
        if obj is not None:
            with contextlib.suppress(Exception):
                obj.close()


def _remove_container(client: Any, container_id: str, timeout: float = 10.0) -> None:
    import docker.errors

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:  # 409: docker is already removing it (AutoRemove)
            if exc.status_code != 409:
                log.warning("could not remove sandbox container %s: %s", container_id[:12], exc)
        time.sleep(0.02)
    log.warning("sandbox container %s still exists 10 s after removal; `agentrl sandbox gc` reaps it",
                container_id[:12])


class DockerSandbox(ForkServerSandbox):
    """A warm container with the fork-server inside. Registered as ``"docker"`` in ``agentrl.sandboxes``.

    Args:
        limits: the limits of every program.
        image: the image to run (default :func:`default_image`, built by ``agentrl sandbox build``).
        runtime: a docker runtime such as ``"runsc"`` (gVisor); the engine's default when None.
        base_url: the docker engine (``DOCKER_HOST`` by default).
        python: the interpreter inside the image.
        uid / gid: the unprivileged ids everything in the container runs as.
        keep_workdir: keep files in ``/tmp`` from one program to the next (processes are still killed).
        grace: seconds the host waits past ``timeout`` before it kills the container itself.
        preload: modules the fork-server imports once, before forking programs (see ``_base.PRELOAD``).

    Attributes:
        starts: how many containers were started (1 + restarts).
        container_id: the running container's id (None before start and after close).
    """

    name = "docker"

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        image: str | None = None,
        runtime: str | None = None,
        base_url: str | None = None,
        python: str = "/usr/bin/python3",
        uid: int = 65534,
        gid: int = 65534,
        keep_workdir: bool = False,
        grace: float = 5.0,
        preload: Sequence[str] = PRELOAD,
    ) -> None:
        super().__init__(limits, keep_workdir=keep_workdir, grace=grace, preload=preload)
        self.image, self.runtime, self.base_url = image or default_image(), runtime, base_url
        self.python, self.uid, self.gid = python, uid, gid
        self._client: Any = None

    @property
    def container_id(self) -> str | None:
        server = self._server
        return server.container_id if isinstance(server, ContainerServer) else None

    # ---- the backend's hooks ---------------------------------------------------------------------------------
    def _oom_kills(self) -> int | None:
        pids = self.supervisor_pids
        group = cgroup_of(pids[0]) if pids else None
        return group.oom_kills() if group is not None else None

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def _spawn(self) -> ContainerServer:
        if self._client is None:
            self._client = await asyncio.to_thread(docker_client, self.base_url)
        limits = self.limits
        server = await asyncio.to_thread(self._create, self._client)
        try:
            await server.connect()
            if server.supervisors:  # a pid verified through its pidfd (never a bare number from the engine)
                prioritise(server.supervisors[0])
            try:
                await asyncio.wait_for(server.recv(), START_TIMEOUT)  # "ready"
            except (asyncio.TimeoutError, ServerLost) as exc:
                raise SandboxUnavailableError(
                    f"the docker sandbox's fork-server did not start in {self.image}: "
                    f"{server.error_output() or exc or 'no output'}"
                ) from exc
            filters = [_seccomp.program_filter(server_pid=1), _seccomp.sandbox_filter(network=limits.network)]
            # Under runc every sandbox's uid 65534 shares one host-wide process count, so the pids cgroup caps
            # processes instead of RLIMIT_NPROC; gVisor counts per sandbox in its own kernel: use both there.
            # The container's own memory group is readable inside it: its OOM kills end the whole program.
            events = ["/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"]
            config = {"work": "/tmp", "kill_mode": "namespace", "keep_workdir": self.keep_workdir,
                      "preload": list(self.preload), "memcg": {"events_paths": events},
                      "limits": limits.to_dict(), "nproc_rlimit": self.runtime == "runsc"}
            await configure(server, config, filters)
        except BaseException:
            server.kill_now()
            await server.stop()
            raise
        return server

    def _create(self, client: Any) -> ContainerServer:
        """Create, attach to and start one container (blocking SDK calls; run in a thread)."""
        import docker.errors

        config = self._container_config(client)
        try:
            container_id = client.api.create_container_from_config(config)["Id"]
        except docker.errors.ImageNotFound as exc:
            raise SandboxUnavailableError(
                f"the docker sandbox image {self.image!r} is not built: run `agentrl sandbox build` "
                "(it needs no registry)"
            ) from exc
        except docker.errors.APIError as exc:
            raise SandboxUnavailableError(f"docker refused the sandbox container: {exc.explanation or exc}") from exc
        sock: socket.socket | None = None
        try:
            attached = client.api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1,
                                                                       "stream": 1})
            raw = getattr(attached, "_sock", attached)
            sock = socket.socket(fileno=os.dup(raw.fileno()))  # ours alone; the SDK's objects are closed
            _close_quietly(getattr(attached, "_response", None), attached, raw)
            client.api.start(container_id)
            state = client.api.inspect_container(container_id)["State"]
            # The fork-server's pid in the engine's namespace: used only if container_pidfd() verifies it
            # from here (not for a remote engine, not under gVisor, whose State.Pid is its own process).
            local = str(client.api.base_url).startswith(("http+docker://localhost", "http+unix://"))
            engine_pid = int(state.get("Pid") or 0) if local and self.runtime != "runsc" else None
            sock.setblocking(False)
            limits = self.limits
            return ContainerServer(client, container_id, sock, engine_pid or None,
                                   reply_limit=2 * limits.output_bytes + limits.file_size + (1 << 20))
        except BaseException as exc:
            if sock is not None:
                sock.close()
            _remove_container(client, container_id)
            if isinstance(exc, docker.errors.APIError):
                raise SandboxUnavailableError(f"docker could not start the sandbox container: {exc}") from exc
            if isinstance(exc, OSError):  # the fork-server was gone before we could watch it
                raise SandboxUnavailableError(f"the sandbox container exited at once: {exc}") from exc
            raise

    def _container_config(self, client: Any) -> dict[str, Any]:
        from docker.types import LogConfig, Ulimit

        limits = self.limits
        memory = limits.memory + limits.disk + limits.shm + _OVERHEAD  # tmpfs pages count as memory
        host_config = client.api.create_host_config(
            network_mode="bridge" if limits.network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true", f"seccomp={json.dumps(seccomp_profile(network=limits.network))}"],
            pids_limit=limits.processes + 2 + (_GVISOR_THREADS if self.runtime == "runsc" else 0),
            mem_limit=memory,
            memswap_limit=memory,
            nano_cpus=int(limits.cpus * 1e9),
            read_only=True,
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={limits.disk},mode=0700,uid={self.uid},gid={self.gid}"},
            shm_size=limits.shm,
            ulimits=[Ulimit(name="core", soft=0, hard=0),
                     Ulimit(name="nofile", soft=limits.open_files + 64, hard=limits.open_files + 64)],
            log_config=LogConfig(type="none"),
            auto_remove=True,
            init=False,
            ipc_mode="private",
            runtime=self.runtime,
        )
        return {
            "Image": self.image,
            "Cmd": [self.python, "-I", "-c", server_source()],
            "User": f"{self.uid}:{self.gid}",
            "WorkingDir": "/tmp",
            "Hostname": "sandbox",
            "Env": [],
            "OpenStdin": True, "StdinOnce": True, "AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
            "Tty": False,
            "NetworkDisabled": not limits.network,
            "Labels": {_LABEL: self.name, _OWNER: owner_label(), "agentrl.image": self.image},
            "HostConfig": host_config,
        }

    # ---- maintenance -----------------------------------------------------------------------------------------
    @classmethod
    def reap(cls, *, everything: bool = False, base_url: str | None = None) -> list[str]:
        """Remove sandbox containers whose owner process died (a crash, SIGKILL), or all of them.

        Args:
            everything: remove every agentrl sandbox container, also those of live owners.
            base_url: the docker engine (``DOCKER_HOST`` by default).

        Returns:
            The short ids of the containers removed.

        Raises:
            SandboxUnavailableError: no docker engine answers.
        """
        client = docker_client(base_url)
        removed = []
        try:
            for info in client.api.containers(all=True, filters={"label": _LABEL}):
                owner = (info.get("Labels") or {}).get(_OWNER, "")
                stale = info.get("State") != "running" or _owner_alive(owner) is False
                if everything or stale:
                    _remove_container(client, info["Id"])
                    removed.append(info["Id"][:12])
        finally:
            client.close()
        return removed

    @classmethod
    def build_image(cls, **options: Any) -> str:
        """Build the sandbox image with no registry; see :func:`agentrl_sandboxes._docker_image.build_image`."""
        from agentrl_sandboxes._docker_image import build_image

        return build_image(**options)

