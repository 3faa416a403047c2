"""Seccomp deny-lists as classic BPF, built with ``struct`` (no libseccomp binding needed).

Two filters are built here, on the host:

- :func:`sandbox_filter` is loaded by bubblewrap (``--seccomp FD``) for everything in the sandbox. It refuses
  the calls a program needs only to attack the kernel or leave the sandbox: ptrace and cross-process memory,
  io_uring, mount and namespace calls (also ``clone`` with namespace flags; ``clone3``, whose flags cannot be
  inspected, answers ENOSYS so libc falls back to ``clone``), bpf, keyrings, perf, kexec and modules,
  ``TIOCSTI``/``TIOCLINUX``, and sockets of any family but ``AF_UNIX`` (``AF_INET``, ``AF_INET6`` and
  ``AF_NETLINK`` too when the network is on).
- :func:`program_filter` is added in each program's process by the fork-server, so a program cannot signal
  it (pid 1 inside; ``kill(-1)`` too) by any route: ``kill``, ``tkill``, ``tgkill``, ``rt_*sigqueueinfo``,
  ``pidfd_open``/``pidfd_send_signal``, or ``F_SETOWN``/``FIOSETOWN`` + ``SIGIO``. The kernel already drops
  such signals to a namespace's init; this also covers the no-namespace mode, where it is an ordinary pid.
  Pids and process groups (negative) are compared as 32-bit two's complement, as the kernel reads them.

A filter is allow-by-default with an explicit deny-list (like Docker's profile, inverted): programs keep
working, and each entry names a known attack surface. Refused calls fail with EPERM, which programs report
cleanly, rather than killing them. A foreign architecture (e.g. the i386 ABI on x86-64) or x32 call is killed.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass

__all__ = ["DENIED", "SeccompUnsupported", "program_filter", "sandbox_filter"]

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_ABS_W, _JEQ, _JSET, _JGE, _RET = 0x20, 0x15, 0x45, 0x35, 0x06
_KILL_PROCESS, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS, _EAFNOSUPPORT = 1, 38, 97
_ARCH_OFFSET, _NR_OFFSET = 4, 0


def _arg(index: int) -> int:
    """Offset of the low 32 bits of syscall argument ``index`` in ``struct seccomp_data`` (little-endian)."""
    return 16 + 8 * index


# Syscall numbers: x86-64 from asm/unistd_64.h; aarch64 from asm-generic/unistd.h (None: not on that arch).
_NR: dict[str, tuple[int | None, int | None]] = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442),
    "unshare": (272, 97), "setns": (308, 268), "bpf": (321, 280),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "perf_event_open": (298, 241),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "userfaultfd": (323, 282), "acct": (163, 89), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "uselib": (134, None), "vhangup": (153, 58), "iopl": (172, None),
    "ioperm": (173, None), "modify_ldt": (154, None), "lookup_dcookie": (212, 18), "nfsservctl": (180, 42),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "fanotify_init": (300, 262),
    "socket": (41, 198), "ioctl": (16, 29), "clone": (56, 220), "clone3": (435, 435), "fcntl": (72, 25),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
}
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7), "arm64": (1, 0xC00000B7)}

_DENIED = [
    "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "mount_setattr", "unshare", "setns", "bpf", "keyctl", "add_key", "request_key",
    "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "userfaultfd", "acct", "swapon", "swapoff", "reboot", "syslog",
    "quotactl", "quotactl_fd", "uselib", "vhangup", "iopl", "ioperm", "modify_ldt", "lookup_dcookie",
    "nfsservctl", "pidfd_getfd", "kcmp", "fanotify_init",
]
DENIED: tuple[str, ...] = tuple(_DENIED)
"""Syscalls refused outright in every sandbox (by name; the docker backend's profile lists them too)."""
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16
_TIOCSTI, _TIOCLINUX, _FIOSETOWN, _SIOCSPGRP = 0x5412, 0x541C, 0x8901, 0x8902
_F_SETOWN, _F_SETOWN_EX = 8, 15
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


class SeccompUnsupported(RuntimeError):
    """No syscall table for this machine's architecture."""


@dataclass
class _Program:
    arch: int
    insns: list[tuple[int, int, int, int]]

    def emit(self, code: int, k: int = 0, jt: int = 0, jf: int = 0) -> None:
        self.insns.append((code, jt, jf, k))

    def ret(self, value: int) -> None:
        self.emit(_RET, value)

    def deny_if_any(self, offset: int, values: tuple[int, ...], errno: int) -> None:
        """Load a 32-bit field and refuse the call when it equals one of ``values``; otherwise allow it."""
        self.emit(_LD_ABS_W, offset)
        for value in values:
            self.emit(_JEQ, value, 0, 1)
            self.ret(_ERRNO | errno)
        self.ret(_ALLOW)

    def block(self, nr: int | None, body: _Program) -> None:
        """Run ``body`` (which always returns) when the syscall number is ``nr``; skip it otherwise."""
        if nr is None:
            return
        if len(body.insns) > 255:
            raise ValueError("seccomp block too long for a BPF jump")
        self.emit(_JEQ, nr, 0, len(body.insns))
        self.insns.extend(body.insns)

    def to_bytes(self) -> bytes:
        return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in self.insns)


def _start(machine: str | None) -> tuple[_Program, int]:
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompUnsupported(f"no seccomp syscall table for architecture {machine!r} (have x86_64, aarch64)")
    column, audit_arch = _ARCHES[machine]
    prog = _Program(audit_arch, [])
    prog.emit(_LD_ABS_W, _ARCH_OFFSET)
    prog.emit(_JEQ, audit_arch, 1, 0)
    prog.ret(_KILL_PROCESS)
    prog.emit(_LD_ABS_W, _NR_OFFSET)
    if column == 0:  # x32 ABI calls share the x86-64 arch value; they are marked by bit 30
        prog.emit(_JGE, 0x40000000, 0, 1)
        prog.ret(_KILL_PROCESS)
    return prog, column


def _sub(arch: int) -> _Program:
    return _Program(arch, [])


def sandbox_filter(*, network: bool = False, machine: str | None = None) -> bytes:
    """The filter for the whole sandbox, as the raw ``struct sock_filter`` array bubblewrap reads.

    Raises:
        SeccompUnsupported: no syscall table for this architecture.
    """
    prog, col = _start(machine)
    for name in _DENIED:
        nr = _NR[name][col]
        if nr is not None:
            prog.emit(_JEQ, nr, 0, 1)
            prog.ret(_ERRNO | _EPERM)
    families = (_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK) if network else (_AF_UNIX,)
    socket = _sub(prog.arch)
    socket.emit(_LD_ABS_W, _arg(0))
    for family in families:
        socket.emit(_JEQ, family, 0, 1)
        socket.ret(_ALLOW)
    socket.ret(_ERRNO | _EAFNOSUPPORT)
    prog.block(_NR["socket"][col], socket)
    ioctl = _sub(prog.arch)
    ioctl.deny_if_any(_arg(1), (_TIOCSTI, _TIOCLINUX), _EPERM)
    prog.block(_NR["ioctl"][col], ioctl)
    clone = _sub(prog.arch)
    clone.emit(_LD_ABS_W, _arg(0))
    clone.emit(_JSET, _CLONE_NAMESPACES, 0, 1)
    clone.ret(_ERRNO | _EPERM)
    clone.ret(_ALLOW)
    prog.block(_NR["clone"][col], clone)
    prog.emit(_JEQ, _NR["clone3"][col] or 0, 0, 1)
    prog.ret(_ERRNO | _ENOSYS)
    prog.ret(_ALLOW)
    return prog.to_bytes()


def program_filter(*, server_pid: int = 1, machine: str | None = None) -> bytes:
    """The filter each program's process adds, protecting the fork-server from its signals.

    Args:
        server_pid: the fork-server's pid (and process group) as programs see it.

    Raises:
        SeccompUnsupported: no syscall table for this architecture.
    """
    prog, col = _start(machine)
    protected = tuple(sorted({server_pid, -server_pid & 0xFFFFFFFF, 0xFFFFFFFF}))
    for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        body = _sub(prog.arch)
        body.deny_if_any(_arg(0), protected, _EPERM)
        prog.block(_NR[name][col], body)
    pidfd_open = _sub(prog.arch)
    pidfd_open.deny_if_any(_arg(0), (server_pid,), _EPERM)
    prog.block(_NR["pidfd_open"][col], pidfd_open)
    prog.emit(_JEQ, _NR["pidfd_send_signal"][col] or 0, 0, 1)  # a /proc/<pid> dir fd works as a pidfd too
    prog.ret(_ERRNO | _EPERM)
    ioctl = _sub(prog.arch)
    ioctl.deny_if_any(_arg(1), (_FIOSETOWN, _SIOCSPGRP), _EPERM)
    prog.block(_NR["ioctl"][col], ioctl)
    fcntl = _sub(prog.arch)
    fcntl.emit(_LD_ABS_W, _arg(1))
    fcntl.emit(_JEQ, _F_SETOWN_EX, 0, 1)  # takes a struct pointer we cannot inspect
    fcntl.ret(_ERRNO | _EPERM)
    fcntl.emit(_JEQ, _F_SETOWN, 0, len(protected) * 2 + 1)
    fcntl.deny_if_any(_arg(2), protected, _EPERM)  # its last instruction, the jump's target, allows
    prog.block(_NR["fcntl"][col], fcntl)
    prog.ret(_ALLOW)
    return prog.to_bytes()
