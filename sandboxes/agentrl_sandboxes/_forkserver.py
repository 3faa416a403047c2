"""The fork-server: runs *inside* the sandbox (standard library only) and forks one child per program.

The host starts it as ``python3 -I -c <this file>`` under ``bwrap --as-pid-1``, where it is pid 1 of the
sandbox's pid namespace: the kernel drops any signal a program sends it, orphans are reparented to it, and
when it dies the kernel kills everything in the namespace. It talks to the host over its stdin/stdout with
length-prefixed messages: a 4-byte big-endian length, a JSON header, then the raw byte blobs whose sizes the
header lists.

Per program it: wipes the work dir (keeping files staged since the last program), writes the given files,
forks, and in the child sets a new session, rlimits, ``oom_score_adj=1000``, the per-program seccomp filter,
then runs the Python source in the forked interpreter (no interpreter start-up) or ``execve``s an argv. It
drains stdout/stderr to the caps while they flow, enforces the wall-clock deadline, and when the program
ends or times out it kills *every* other process: ``kill(-1, SIGKILL)`` from pid 1 reaches every process in
the namespace (forks racing the kill are aborted by the kernel). It then reaps them all and checks that
``/proc`` lists nothing else. Without a pid namespace (the host's explicitly unsafe mode) it is a child
subreaper and kills its descendants by scanning ``/proc`` instead.

It is non-dumpable, so programs (same uid) cannot open its ``/proc/1/fd`` or ``/proc/1/mem``. The address-space
rlimit (``memory``) also applies to argv programs: runtimes that reserve large virtual ranges up front (JVM,
Node, Go) need a larger ``memory`` than their real use.
"""

import ctypes
import io
import json
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

from agentrl_sandboxes._forkparts import MemoryWatch, clear_dir  # stripped when shipped

PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 4, 38, 22, 36
SECCOMP_MODE_FILTER = 2
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}


class StagingError(Exception):
    """A file given with the program could not be written (the host reports it as the caller's error)."""


class WipeError(Exception):
    """The work dir could not be emptied; only a fresh sandbox can guarantee an empty one."""


class Channel:
    def __init__(self, fd_in, fd_out):
        self.fd_in, self.fd_out = fd_in, fd_out

    def _read_exact(self, n):
        parts = []
        while n:
            chunk = os.read(self.fd_in, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def recv(self):
        (size,) = struct.unpack(">I", self._read_exact(4))
        header = json.loads(self._read_exact(size))
        return header, [self._read_exact(n) for n in header.get("blobs", [])]

    def send(self, header, blobs=()):
        header["blobs"] = [len(b) for b in blobs]
        data = json.dumps(header).encode()
        view = memoryview(b"".join([struct.pack(">I", len(data)), data, *blobs]))
        while view:
            view = view[os.write(self.fd_out, view):]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def prctl(libc, option, arg2=0, arg3=0):
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


class Server:
    def __init__(self, channel, config, filters, libc):
        self.channel, self.config, self.libc = channel, config, libc
        self.work = os.path.realpath(config["work"])
        self.limits = config["limits"]
        self.own_namespace = config["kill_mode"] == "namespace"
        self.memcg = config.get("memcg")  # {"fd", "join_fd", "events_fd", "events_paths", "reserve"}
        self.memcg_limit = None
        for path in (self.memcg or {}).get("events_paths", ()):  # a container: its own group, read-only
            try:
                self.memcg["events_fd"] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except OSError:
                continue
        self.staged = set()
        self.filters = []  # kept alive: the child passes their addresses to prctl
        for blob in filters:
            buf = ctypes.create_string_buffer(blob, len(blob))
            self.filters.append((buf, SockFprog(len(blob) // 8, ctypes.addressof(buf))))

    # ---- paths and files -------------------------------------------------------------------------------
    def resolve(self, path):
        full = os.path.normpath(os.path.join(self.work, path))
        real = os.path.realpath(full)
        if not full.startswith(self.work + "/") or not real.startswith(self.work + "/"):
            raise PermissionError(f"{path!r} is outside the work dir {self.work}")
        return full

    def write(self, path, data, executable=False):
        full = self.resolve(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(full, flags, 0o755 if executable else 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(f"{path!r} is not a regular file")
            os.fchmod(fd, 0o755 if executable else 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.staged.add(os.path.relpath(full, self.work))

    def read(self, path, limit):
        fd = os.open(self.resolve(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(f"{path!r} is not a regular file")
            parts, size = [], 0
            while size <= limit:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
                size += len(chunk)
            raise ValueError(f"{path!r} is larger than the file_size limit ({limit} bytes)")
        finally:
            os.close(fd)

    def wipe(self):
        clear_dir(self.work, "", self.staged)
        if self.own_namespace:
            clear_dir("/dev/shm", "", set())
        self.staged = set()

    # ---- killing -------------------------------------------------------------------------------------
    def others(self):
        """Pids of every process but this server (namespace mode), or of our descendants."""
        me = os.getpid()
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        if self.own_namespace:
            return [p for p in pids if p not in (1, me)]
        parents = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    parents[pid] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        found, frontier = set(), {me}
        while frontier:
            frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
            found |= frontier
        return sorted(found)

    def kill_all(self):
        if self.own_namespace:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        for _ in range(1000):
            pids = self.others()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            reap(block=False)

    def oom_kills(self):
        """The memory cgroup's OOM-kill count (read through the host's descriptor), or None."""
        fd = (self.memcg or {}).get("events_fd")
        if fd is None:
            return None
        try:
            for line in os.pread(fd, 4096, 0).decode().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None

    def probe_memcg_join(self):
        """Whether a forked child can move itself into the memory cgroup through ``join_fd`` (the kernel
        checks the opener's credentials on cgroup v1 since Linux 5.16); if not, the host puts us in it."""
        fd = (self.memcg or {}).get("join_fd")
        if fd is None:
            return False
        pid = os.fork()
        if pid == 0:
            try:
                os.write(fd, b"0")
            except OSError:
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if not ok:
            self.memcg["join_fd"] = None
        return ok

    def files_bytes(self):
        """Bytes of files in the work dir and /dev/shm (tmpfs: charged to the memory cgroup, never ``memory``)."""
        total = 0
        for path in (self.work, "/dev/shm"):
            try:
                info = os.statvfs(path)
                total += (info.f_blocks - info.f_bfree) * info.f_frsize
            except OSError:
                pass
        return total

    def hold_memcg(self, running):
        """Set the memory cgroup's limit: ``memory`` + files now + reserve while a program runs, else the most."""
        if not (self.memcg or {}).get("fd"):
            return
        limits = self.limits
        files = self.files_bytes() if running else limits["disk"] + limits["shm"]
        value = limits["memory"] + files + self.memcg["reserve"]
        if self.memcg_limit is not None and abs(value - self.memcg_limit) < (1 << 20):
            return
        try:
            os.write(self.memcg["fd"], str(value).encode())
            self.memcg_limit = value
        except OSError:  # v1 refuses a limit under the usage (EBUSY): the watch, then the next tick, decide
            pass

    def full_filesystems(self):
        """Which of the program's filesystems (``disk``: the work dir, ``shm``: /dev/shm) have no room left."""
        full = []
        for name, path in (("disk", self.work), ("shm", "/dev/shm")):
            try:
                info = os.statvfs(path)
            except OSError:
                continue
            if info.f_bavail * info.f_frsize < 64 * 1024:
                full.append(name)
        return full

    def clean_up(self):
        """Kill and reap everything the program started; True when nothing is left."""
        for _ in range(5):
            self.kill_all()
            reap(block=self.own_namespace)
            if not self.others():
                return True
            time.sleep(0.01)
        return False

    # ---- running programs -----------------------------------------------------------------------------
    def exec(self, req, blobs):
        t0 = time.monotonic()
        if not self.config["keep_workdir"]:
            try:
                self.wipe()
            except OSError as exc:  # e.g. a tree nested past PATH_MAX; the host restarts us on a fresh tmpfs
                raise WipeError(f"{type(exc).__name__}: {exc}") from exc
        self.staged = set()
        stdin_data, file_blobs = blobs[0], blobs[1:]
        try:
            for (path, executable), data in zip(req["files"], file_blobs, strict=True):
                self.write(path, data, executable)
        except (OSError, ValueError) as exc:
            raise StagingError(f"{type(exc).__name__}: {exc}") from exc
        stdin_fd = os.memfd_create("stdin")  # a file, so a large stdin never blocks on a full pipe
        view = memoryview(stdin_data)
        while view:
            view = view[os.write(stdin_fd, view):]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.hold_memcg(running=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            self.child(req, stdin_fd, out_w, err_w)
        for fd in (stdin_fd, out_w, err_w):
            os.close(fd)
        clean = False
        try:
            result, outputs = self.supervise(pid, {out_r: 1, err_r: 2}, start, req["timeout"])
        finally:
            os.close(out_r)
            os.close(err_r)
            ended = time.monotonic()
            clean = self.clean_up()
            self.hold_memcg(running=False)
        result["clean"] = clean
        result["full"] = self.full_filesystems()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        # Where the fork-server's time went (seconds): the host adds the channel's share (``agentrl bench``).
        result["phases"] = {"prepare": start - t0, "program": ended - start, "kill": time.monotonic() - ended}
        return result, [bytes(outputs[1]), bytes(outputs[2])]

    def supervise(self, pid, streams, start, timeout):
        cap = self.limits["output_bytes"]
        outputs, totals = {1: bytearray(), 2: bytearray()}, {1: 0, 2: 0}
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # a kernel without pidfds (e.g. gVisor): poll the child's exit every 10 ms instead
            pidfd = None
        poller = select.poll()
        for fd in (*streams, *([pidfd] if pidfd is not None else [])):
            poller.register(fd, select.POLLIN)
        open_streams, status, rusage, limit, wall = set(streams), None, None, None, None
        deadline, drain_until = start + timeout, None
        watch = MemoryWatch(self.others, self.limits["memory"])
        oom_before = self.oom_kills()
        next_watch = start + watch.interval
        try:
            while open_streams or status is None:
                now = time.monotonic()
                if status is None and limit is None and now >= next_watch:
                    self.hold_memcg(running=True)  # files the program wrote raise it, deleted ones lower it
                    # The kernel's OOM kill of one process passed the same limit: the whole program ends.
                    if watch.over() or (oom_before is not None and (self.oom_kills() or 0) > oom_before):
                        limit = "memory"
                        self.kill_all()
                    next_watch = time.monotonic() + watch.interval
                if status is None and now >= deadline and limit is None:
                    limit = "wall_time"
                    self.kill_all()
                if drain_until is not None and now >= drain_until:
                    break  # writers are dead; only an unkillable holder could keep a pipe open
                until = drain_until if status is not None else (None if limit else min(deadline, next_watch))
                wait_ms = -1 if until is None else max(0, int((until - now) * 1000) + 1)
                if pidfd is None and status is None:
                    wait_ms = 10 if wait_ms < 0 else min(wait_ms, 10)
                events = poller.poll(wait_ms)
                if status is None and (pidfd is None or any(fd == pidfd for fd, _ in events)):
                    done, status_now, usage = os.wait4(pid, os.WNOHANG if pidfd is None else 0)
                    if done:
                        status, rusage, wall = status_now, usage, time.monotonic() - start
                        if pidfd is not None:
                            poller.unregister(pidfd)
                        self.kill_all()  # the program is over: nothing it started may outlive it
                        drain_until = time.monotonic() + 2.0
                for fd, _ in events:
                    if fd == pidfd:
                        continue
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        poller.unregister(fd)
                        open_streams.discard(fd)
                        continue
                    stream = streams[fd]
                    room = cap - len(outputs[stream])
                    if room > 0:
                        outputs[stream] += chunk[:room]
                    totals[stream] += len(chunk)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        result = {
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "wall": wall,
            "maxrss": rusage.ru_maxrss * 1024,
            "limit": limit,
            "memory_peak": watch.peak,
            "stdout_total": totals[1],
            "stderr_total": totals[2],
        }
        return result, outputs

    def child(self, req, stdin_fd, out_w, err_w):
        """In the forked child: confine, then run the program. Never returns."""
        try:
            os.setsid()
            join_fd = (self.memcg or {}).get("join_fd")
            if join_fd is not None:  # into the memory cgroup; the server stays out, so its watch never stalls
                os.write(join_fd, b"0")
            os.dup2(stdin_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, 1 << 16)
            prctl(self.libc, PR_SET_DUMPABLE, 1)  # ours again (own /proc/self); the server's fds are closed
            if os.getpriority(os.PRIO_PROCESS, 0) < 0:  # the host raised the server's priority, not the program's
                os.setpriority(os.PRIO_PROCESS, 0, 0)
            limits = self.limits
            cpu = max(1, int(limits["cpu_time"] + 0.999))
            caps = [("RLIMIT_CORE", 0), ("RLIMIT_AS", limits["memory"]), ("RLIMIT_DATA", limits["memory"]),
                    ("RLIMIT_FSIZE", limits["file_size"]), ("RLIMIT_NOFILE", limits["open_files"])]
            if self.config.get("nproc_rlimit", True):  # counted per uid in a user namespace; off where a
                caps.append(("RLIMIT_NPROC", limits["processes"] + 2))  # pids cgroup caps the sandbox instead
            for name, value in caps:
                resource.setrlimit(getattr(resource, name), (value, value))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # the OOM killer takes programs first, never the sandbox's own processes
            prctl(self.libc, PR_SET_NO_NEW_PRIVS, 1)
            for _, fprog in self.filters:
                prctl(self.libc, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
            os.chdir(self.work)
            os.environ.clear()
            os.environ.update(CHILD_ENV)
        except BaseException as exc:
            os.write(2, f"sandbox: could not confine the program: {exc!r}\n".encode())
            os._exit(125)
        if req.get("argv"):
            exec_argv(req["argv"])
        run_source(req["code"], self.work)


def exec_argv(argv):
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, CHILD_ENV)
    except OSError as exc:
        os.write(2, f"sandbox: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
    os._exit(127)


def run_source(code, work):
    """Run Python source the way ``python -c`` would, in this forked interpreter, then exit."""
    import builtins
    import linecache

    sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    # Unbuffered (like ``python -u``): output printed before a timeout or a crash is not lost.
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), encoding="utf-8",
                                  errors="surrogateescape", write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
    main = type(sys)("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    sys.path.insert(0, work)
    linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
    status = 0
    try:
        exec(compile(code, "<program>", "exec"), main.__dict__)
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:  # as python would print it: without this function's frame
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 120
    os._exit(status)


def exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def reap(block):
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def warm_up(preload=()):
    """Do once here what every child would otherwise pay for after its fork (lazy AST types, codecs, and
    importing the modules in ``preload``: a program's ``import`` of one is then a dictionary lookup, and
    its changes to the module stay in its own copy-on-write memory)."""
    import gc
    import importlib

    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # not in this interpreter: the program imports it (or fails to) itself
            pass

    exec(compile("x = [str(1)]", "<warm-up>", "exec"), {})
    with open(os.devnull, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("x")
    gc.collect()
    gc.freeze()  # children's collections then skip (and never touch) everything inherited from here


def main():
    channel = Channel(os.dup(0), os.dup(1))
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl(libc, PR_SET_DUMPABLE, 0)
    prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
    channel.send({"op": "ready", "pid": os.getpid()})
    try:
        config, filters = channel.recv()
    except EOFError:
        return
    server = Server(channel, config, filters, libc)
    warm_up(config.get("preload", ()))
    channel.send({"ok": True, "memcg_join": server.probe_memcg_join()})
    while True:
        try:
            req, blobs = channel.recv()
        except EOFError:
            return
        reply_blobs = []
        try:
            if req["op"] == "exec":
                reply, reply_blobs = server.exec(req, blobs)
            elif req["op"] == "write":
                server.write(req["path"], blobs[0], req.get("executable", False))
                reply = {}
            elif req["op"] == "read":
                reply_blobs = [server.read(req["path"], req["limit"])]
                reply = {}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            reply["ok"] = True
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": type(exc).__name__}
            reply_blobs = []
        channel.send(reply, reply_blobs)


if __name__ == "__main__":
    main()
