"""Building the docker sandbox's image on a machine that reaches no registry.

The base is a Debian root filesystem made with ``debootstrap --variant=minbase --include=python3`` (the
whole standard library: ``python3-minimal`` lacks ctypes, which the fork-server needs), from the Debian
mirror apt already uses, and turned into an image with ``docker import``; the packaged
``images/python/Dockerfile`` is then built on it with the network off. ``--base IMAGE`` skips debootstrap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentrl.sandbox import SandboxUnavailableError
from agentrl_sandboxes.docker import DOCKERFILE, default_image, docker_client

__all__ = ["build_image", "debian_mirror", "debian_suite"]

_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
         "usr/share/locale")


def debian_suite() -> str:
    """This machine's Debian codename (``bookworm`` where it is not Debian)."""
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return "bookworm"
    if fields.get("ID", "").strip('"') != "debian":
        return "bookworm"
    return fields.get("VERSION_CODENAME", "bookworm").strip('"') or "bookworm"


def debian_mirror() -> str:
    """The Debian mirror apt is configured with here (a proxy or local mirror keeps working), else the CDN."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?m)^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+/debian)/?\s", text):
            return match.group(1)
    return "http://deb.debian.org/debian"


def _image_exists(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _debootstrap_base(client: Any, tag: str, suite: str, mirror: str, echo: Callable[[str], None]) -> None:
    if shutil.which("debootstrap") is None:
        raise SandboxUnavailableError(
            "building the sandbox base image needs debootstrap: `apt-get install debootstrap`, "
            "or pass --base IMAGE (any local image with /usr/bin/python3)"
        )
    if os.geteuid() != 0:
        raise SandboxUnavailableError("debootstrap must run as root (sudo agentrl sandbox build), or pass --base IMAGE")
    with tempfile.TemporaryDirectory(prefix="agentrl-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        echo(f"debootstrap {suite} from {mirror} (minbase + python3) ...")
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", suite, str(root), mirror],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise SandboxUnavailableError(
                f"debootstrap failed (exit {done.returncode}): {(done.stderr or done.stdout)[-1500:]}\n"
                "Check that the Debian mirror is reachable, or pass --mirror URL / --base IMAGE."
            )
        for rel in _TRIM:
            shutil.rmtree(root / rel, ignore_errors=True)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
        echo(f"docker import -> {tag}")
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=version or "latest")


def build_image(
    *,
    tag: str | None = None,
    base: str | None = None,
    suite: str | None = None,
    mirror: str | None = None,
    rebuild: bool = False,
    base_url: str | None = None,
    echo: Callable[[str], None] = print,
) -> str:
    """Build the docker sandbox's image (a no-op when it exists, unless ``rebuild``).

    Args:
        tag: the image to build (default :func:`agentrl_sandboxes.docker.default_image`).
        base: an existing local image with ``/usr/bin/python3`` to build on; by default
            ``agentrl/sandbox-base:<suite>``, made with debootstrap when missing.
        suite / mirror: the Debian release and mirror for debootstrap (default: this machine's).
        rebuild: build again even if the image exists (the debootstrap base is reused).
        base_url: the docker engine (``DOCKER_HOST`` by default).
        echo: where progress lines go.

    Returns:
        The image's tag.

    Raises:
        SandboxUnavailableError: no engine, no debootstrap, or a failed step; the message says what to do.
    """
    import docker.errors

    tag = tag or default_image()
    client = docker_client(base_url)
    try:
        if not rebuild and _image_exists(client, tag):
            echo(f"{tag} is already built")
            return tag
        if base is None:
            suite = suite or debian_suite()
            base = f"agentrl/sandbox-base:{suite}"
            if not _image_exists(client, base):
                _debootstrap_base(client, base, suite, mirror or debian_mirror(), echo)
        elif not _image_exists(client, base):
            raise SandboxUnavailableError(f"base image {base!r} is not on this docker engine (`docker images`)")
        echo(f"docker build {tag} on {base} (network off) ...")
        with tempfile.TemporaryDirectory(prefix="agentrl-image-") as context:
            shutil.copy(DOCKERFILE, Path(context) / "Dockerfile")
            digest = hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()
            try:
                client.images.build(path=context, tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True,
                                    network_mode="none", labels={"agentrl.dockerfile": digest})
            except (docker.errors.BuildError, docker.errors.APIError) as exc:
                raise SandboxUnavailableError(f"docker build of {tag} failed: {exc}") from exc
        echo(f"built {tag}")
        return tag
    finally:
        client.close()
