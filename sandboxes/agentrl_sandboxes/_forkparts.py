"""Parts of the fork-server (:mod:`agentrl_sandboxes._forkserver`), standard library only.

Shipped into the sandbox ahead of the fork-server's own source, as one program (see
:func:`agentrl_sandboxes._base.server_source`): the memory watch, and emptying the work dir.
"""

import os
import time


class MemoryWatch:
    """The program's memory: every process of it together, read from ``/proc``, checked every few ms.

    The measure is proportional set size (``Pss_Anon + Pss_Shmem`` from ``smaps_rollup``): a page shared
    by n processes (copy-on-write after a fork, a shared mapping) counts 1/n in each, so the sum is the
    memory the processes hold together. Files in the work dir and ``/dev/shm`` are not in it (they count
    against ``disk`` and ``shm``), except while a program maps one. ``smaps_rollup`` walks page tables, so a
    cheap upper bound comes first: the summed resident pages of ``statm``; only when that passes the limit
    is the exact sum taken. The interval grows with the cost of a scan, so the watch stays a small share
    of one core even with many processes.
    """

    INTERVAL = 0.005

    def __init__(self, pids, limit):
        self.pids, self.limit = pids, limit
        self.interval = self.INTERVAL
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def over(self):
        """True when the program's processes together hold more than the limit."""
        started = time.monotonic()
        pids = self.pids()
        total = sum(self.resident(pid) for pid in pids)
        if total > self.limit:
            total = sum(self.proportional(pid) for pid in pids)
            self.peak = max(self.peak, total)
        self.interval = max(self.INTERVAL, 4 * (time.monotonic() - started))
        return total > self.limit

    def resident(self, pid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * self.page
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def proportional(pid):
        total = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith((b"Pss_Anon:", b"Pss_Shmem:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
        return total


def clear_dir(path, rel, keep):
    """Remove everything under ``path`` except the relative paths in ``keep`` (and directories above them)."""
    with os.scandir(path) as entries:
        for entry in list(entries):
            name = rel + entry.name
            if name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                if any(k.startswith(name + "/") for k in keep):
                    clear_dir(entry.path, name + "/", keep)
                else:
                    remove_tree(entry.path)
            else:
                os.unlink(entry.path)


def remove_tree(top):
    """Delete a directory tree iteratively (a program may leave it deep, or unreadable to its owner)."""
    stack = [top]
    while stack:
        path = stack[-1]
        os.chmod(path, 0o700)
        subdirs = []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                else:
                    os.unlink(entry.path)
        if subdirs:
            stack.extend(subdirs)
        else:
            os.rmdir(path)
            stack.pop()
