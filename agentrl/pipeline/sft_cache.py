"""A finished SFT phase kept by the digest of everything that decides its result, so a run whose SFT phase
would be the same (a second seed of the RL settings, an ablation, a rerun) takes it instead of training again.

The key covers the SFT settings (all but where checkpoints go), the demonstrations token for token as
messages and tools, the starting model (its id, or a local directory's file sizes and times), and the source
of the agentrl package itself, so an edit to the learner, the chat template code or the env's demonstrations
makes a new key. The entry holds the final checkpoint and the phase's metric records (the report's SFT
curve). A phase that its time budget (``max_seconds``) ended is kept as it ended: where it stopped depended
on the machine that ran it, which the key does not name. Entries live under ``$AGENTRL_CACHE/sft`` (default ``$XDG_CACHE_HOME/agentrl`` or
``~/.cache/agentrl``); delete the directory to drop them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CacheEntry", "cache_root", "lookup", "sft_key", "store"]

_VOLATILE = {"output_dir", "save_every", "keep_last", "resume_from"}
"""SFT settings that change where a result is written, not what it is."""


def cache_root() -> Path:
    """``$AGENTRL_CACHE``, else ``$XDG_CACHE_HOME/agentrl``, else ``~/.cache/agentrl``."""
    if os.environ.get("AGENTRL_CACHE"):
        return Path(os.environ["AGENTRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentrl"


def _source_digest() -> str:
    """The digest of agentrl's own Python source (any edit to it is a new key)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _model_identity(model: str) -> Any:
    """A hub id or built-in name as it is; a local directory by its files' names, sizes and times."""
    path = Path(model)
    if not path.is_dir():
        return model
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())


def sft_key(settings: Mapping[str, Any], demonstrations: Iterable[Any]) -> str:
    """The cache key of an SFT phase: ``settings`` (the SFT config as JSON data) and its demonstrations
    (objects with ``messages`` and ``tools``), plus the starting model and agentrl's source."""
    digest = hashlib.sha256()
    kept = {k: v for k, v in settings.items() if k not in _VOLATILE}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    digest.update(json.dumps(_model_identity(str(settings.get("model", ""))), default=str).encode())
    digest.update(_source_digest().encode())
    for demo in demonstrations:
        digest.update(json.dumps([list(demo.messages), list(demo.tools)], sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


class CacheEntry:
    """A stored SFT phase: its final ``checkpoint`` directory, the step it was saved at, and its records."""

    def __init__(self, path: Path):
        self.path = path
        meta = json.loads((path / "entry.json").read_text(encoding="utf-8"))
        self.step: int = int(meta["step"])
        self.checkpoint = path / "checkpoint"

    def records(self) -> list[dict[str, Any]]:
        """The phase's metric records, each ``{"step": ..., "metrics": {...}}``, in order."""
        lines = (self.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def lookup(key: str, root: Path | None = None) -> CacheEntry | None:
    """The entry stored under ``key``, or None (never stored, or a store that did not finish)."""
    path = (root or cache_root()) / "sft" / key
    if not (path / "entry.json").is_file() or not (path / "checkpoint").is_dir():
        return None
    return CacheEntry(path)


def store(key: str, checkpoint: Path, step: int, records: Sequence[Mapping[str, Any]], root: Path | None = None) -> Path:
    """Keep ``checkpoint`` (copied) and the phase's ``records`` under ``key``; an existing entry stays.

    The copy is written beside the entry and renamed into place, so a reader never sees half of one.
    """
    final = (root or cache_root()) / "sft" / key
    if (final / "entry.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        shutil.copytree(checkpoint, staging / "checkpoint")
        lines = "".join(json.dumps(dict(r), default=str) + "\n" for r in records)
        (staging / "metrics.jsonl").write_text(lines, encoding="utf-8")
        (staging / "entry.json").write_text(json.dumps({"step": step, "from": str(checkpoint)}), encoding="utf-8")
        os.replace(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / "entry.json").is_file():
            raise
    return final
