"""YAML for files a user hands us: safe types only, and no aliases.

An alias (``*name``) repeats a node without copying it, so a few lines of nested aliases stand for billions
of values: ``yaml.safe_load`` returns at once, and the first deep copy or validation of the result runs
for hours. Refusing aliases closes that; a run config never needs them.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["AliasError", "describe", "load"]


class AliasError(yaml.YAMLError):
    """The text uses an anchor (``&name``) or an alias (``*name``)."""


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            raise AliasError(f"line {event.start_mark.line + 1}: alias *{event.anchor} (aliases are not allowed, "
                             "so a few lines cannot expand into billions of values); write the value out")  # fmt: skip
        return super().compose_node(parent, index)


def load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing aliases.

    Raises:
        yaml.YAMLError: bad YAML, or an :class:`AliasError`.
    """
    return yaml.load(text, Loader=_NoAliasLoader)


def describe(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())
