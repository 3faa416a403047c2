"""Whether a file descriptor is readable, for any descriptor number.

``select.select`` refuses descriptors numbered 1024 or more ("filedescriptor out of range"), which a process
holding a few hundred sandboxes (each with its pidfd, pipes and sockets) reaches; ``poll`` has no such limit.
"""

from __future__ import annotations

import select

__all__ = ["readable"]


def readable(fd: int, timeout_s: float = 0.0) -> bool:
    """True once ``fd`` is readable (or hung up, or in error: a read will not block), waiting at most
    ``timeout_s`` seconds (0: do not wait)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000 + 0.999))))
