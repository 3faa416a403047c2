"""Importing plug-in objects named ``"package.module:attr"``, shared by the env and sandbox registries."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from agentrl.errors import PluginError

__all__ = ["load_object"]


def load_object(target: str | Callable[..., Any], what: str) -> Callable[..., Any]:
    """Import ``"module:attr"`` (or return a callable as is) and check it is callable.

    Args:
        target: the entry point's value, or the object itself.
        what: names the plug-in in errors, e.g. ``"environment 'code-sandbox-v0' (entry point of pkg)"``.

    Raises:
        PluginError: the import failed (naming ``what``, the target and the cause) or the object is not callable.
    """
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginError(
            f"{what} failed to load from {target!r}: {type(exc).__name__}: {exc}. "
            "Reinstall or fix the package that provides it; nothing else is affected."
        ) from exc
    if not callable(obj):
        raise PluginError(f"{what}: {target!r} is not a class or factory")
    return obj
