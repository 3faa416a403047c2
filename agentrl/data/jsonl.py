"""Reading the JSONL data files users hand to the learners (demonstrations, preferences, step labels)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["jsonl_records"]


def jsonl_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line of a JSONL data file.

    Raises:
        ConfigError: a line is not JSON; the message names file and line.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{lineno}: not JSON ({exc}); write one JSON object per line"
                ) from None
