"""Environments by string id: ``register``, ``make``, ``spec``, ``list_envs``.

Ids look like ``code-sandbox-v0``; the bare ``code-sandbox`` means its latest version. Every id is also
registered with Gymnasium as ``agentrl/<id>``, so ``gymnasium.make("agentrl/code-sandbox-v0")`` works.

Plug-ins (the bundled ``agentrl_envs`` among them) declare environments in the ``agentrl.envs``
entry-point group: the entry point's *name* is the env id and its *value* (``"module:attr"``) an
:class:`~agentrl.core.Env` subclass or a factory returning one::

    [project.entry-points."agentrl.envs"]
    my-task-v0 = "my_package.envs:MyTaskEnv"

Entry-point metadata is read on a registry miss, never at ``import agentrl`` (reading it costs tens of
milliseconds on a large site-packages). A plug-in's code is imported only when its env is made or listed,
so one broken plug-in is reported by name and never breaks another env. Gymnasium has no such hook, so a
plain ``gymnasium.make("agentrl/<plug-in id>")`` needs one registry read first; ``agentrl.make``,
``agentrl.list_envs()`` or ``agentrl.register_plugins()`` each do it.

Environments from other ecosystems are made by *loaders*, addressed as ``<scheme>:<target>``, e.g.
``verifiers:my-env`` or ``openenv:http://127.0.0.1:8000``: the scheme names a loader registered with
:func:`register_loader` (``"module:function"``, imported on first use), the target is the loader's own
address for one environment. ``make``, ``spec``, ``agentrl check``, ``train`` and ``eval`` accept such ids
like any other; Gymnasium does not (its ids cannot hold every target).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentrl._plugins import load_object
from agentrl.errors import EnvNotFoundError, PluginError, RegistryError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EnvSpec",
    "list_envs",
    "list_loaders",
    "make",
    "register",
    "register_loader",
    "register_plugins",
    "spec",
]

ENTRY_POINT_GROUP = "agentrl.envs"
GYM_NAMESPACE = "agentrl"
_ID_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?:-v(?P<version>\d+))?$")

EnvFactory = Callable[..., Any]


@dataclass(frozen=True)
class EnvSpec:
    """How to build one registered environment.

    Attributes:
        id: ``name-vN`` (or ``name`` for an unversioned env).
        entry_point: ``"module:attr"`` (imported on first ``make``) or the class/factory itself.
        kwargs: default keyword arguments for the factory; ``make(id, **kw)`` overrides them.
        description: one line for ``agentrl envs``; defaults to the env's own ``description`` or docstring.
        max_turns: the default turn limit for runners (also Gymnasium's ``max_episode_steps``).
        source: where the registration came from: ``"register"`` or ``"entry point <dist>"``.
    """

    id: str
    entry_point: str | EnvFactory
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    max_turns: int | None = None
    source: str = "register"

    @property
    def name(self) -> str:
        return self.id if _scheme(self.id) else _parse_id(self.id)[0]

    @property
    def version(self) -> int | None:
        return None if _scheme(self.id) else _parse_id(self.id)[1]

    def load(self) -> EnvFactory:
        """Import and return the entry point. Raises :class:`PluginError` naming the env and its source."""
        return load_object(self.entry_point, f"environment {self.id!r} ({self.source})")

    def summary(self) -> str:
        """The description, loading the entry point if none was registered."""
        if self.description:
            return self.description
        target = self.load()
        text = getattr(target, "description", "") or (target.__doc__ or "")
        return text.strip().splitlines()[0] if text.strip() else ""


_REGISTRY: dict[str, EnvSpec] = {}
_plugins_read = False
_broken: dict[str, str] = {}
# scheme -> ("module:function" taking (target, **kwargs) and returning an Env, one-line description)
_LOADERS: dict[str, tuple[str | EnvFactory, str]] = {}
_SCHEME_RE = re.compile(r"^(?P<scheme>[a-z][a-z0-9_-]*):(?P<target>.+)$", re.DOTALL)


def _scheme(env_id: str) -> tuple[str, str] | None:
    """``(scheme, target)`` for a loader id like ``verifiers:my-env``; None for a registered-style id."""
    match = _SCHEME_RE.match(env_id)
    return (match.group("scheme"), match.group("target")) if match else None


def register_loader(scheme: str, entry_point: str | EnvFactory, *, description: str = "") -> None:
    """Make ids ``<scheme>:<target>`` build envs with ``entry_point(target, **kwargs)``.

    Raises:
        RegistryError: the scheme is not lowercase letters, digits, '-' or '_'.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", scheme):
        raise RegistryError(f"loader scheme {scheme!r} must be lowercase letters, digits, '-' or '_'")
    _LOADERS[scheme] = (entry_point, description)


def list_loaders() -> dict[str, str]:
    """Registered loader schemes with their descriptions."""
    return {scheme: description for scheme, (_, description) in sorted(_LOADERS.items())}


def _loader_spec(scheme: str, target: str) -> EnvSpec:
    if scheme not in _LOADERS:
        close = difflib.get_close_matches(scheme, list(_LOADERS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c + ':') for c in close)}?" if close else ""
        raise EnvNotFoundError(
            f"no environment loader for {scheme + ':'!r}.{hint} Known loaders: "
            f"{', '.join(s + ':' for s in sorted(_LOADERS)) or 'none'}; a registered env id has no ':'."
        )
    entry_point, description = _LOADERS[scheme]
    loader = load_object(entry_point, f"environment loader {scheme!r}")
    return EnvSpec(
        f"{scheme}:{target}",
        functools.partial(loader, target),
        description=description or None,
        source=f"loader {scheme}",
    )


def _parse_id(env_id: str) -> tuple[str, int | None]:
    match = _ID_RE.match(env_id)
    if match is None:
        raise RegistryError(
            f"invalid env id {env_id!r}: use letters, digits, '-', '_' or '.', "
            "optionally ending in a version like '-v0' (e.g. 'code-sandbox-v0')"
        )
    version = match.group("version")
    return match.group("name"), None if version is None else int(version)


def register(
    id: str,
    entry_point: str | EnvFactory,
    *,
    kwargs: dict[str, Any] | None = None,
    description: str | None = None,
    max_turns: int | None = None,
    override: bool = False,
    source: str = "register",
) -> EnvSpec:
    """Register an environment under ``id`` (and as ``agentrl/<id>`` with Gymnasium).

    Raises:
        RegistryError: the id is malformed, or already registered and ``override`` is False.
    """
    _parse_id(id)
    if isinstance(entry_point, str) and ":" not in entry_point:
        raise RegistryError(f"entry point {entry_point!r} for {id!r} must look like 'package.module:ClassName'")
    if id in _REGISTRY and not override:
        raise RegistryError(f"environment {id!r} is already registered; pass override=True to replace it")
    env_spec = EnvSpec(id, entry_point, dict(kwargs or {}), description, max_turns, source)
    _REGISTRY[id] = env_spec
    _register_with_gymnasium(env_spec)
    return env_spec


def _register_with_gymnasium(env_spec: EnvSpec) -> None:
    import gymnasium

    gym_id = f"{GYM_NAMESPACE}/{env_spec.id}"
    gymnasium.registry.pop(gym_id, None)
    gymnasium.register(
        id=gym_id,
        entry_point=functools.partial(_make_unchecked, env_spec.id),
        max_episode_steps=env_spec.max_turns,
        # Our envs are checked by agentrl.checker; gymnasium's passive checker warns on every custom space.
        disable_env_checker=True,
    )


def register_plugins(*, reload: bool = False) -> dict[str, str]:
    """Read the ``agentrl.envs`` entry points and register each (code is imported later, on ``make``).

    Returns:
        Entry points that could not even be registered (bad id, clash), by name, with the reason.
    """
    global _plugins_read
    if _plugins_read and not reload:
        return dict(_broken)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY and _REGISTRY[ep.name].source == "register":
            continue  # an explicit register() call wins over a plug-in of the same id
        dist = getattr(ep.dist, "name", None) or "unknown package"
        try:
            register(ep.name, ep.value, source=f"entry point of {dist}", override=True)
        except RegistryError as exc:
            _broken[ep.name] = f"{dist}: {exc}"
    _plugins_read = True
    return dict(_broken)


def _resolve(env_id: str) -> EnvSpec:
    """Find a spec by exact id or, for a bare name, its latest version; read plug-ins on a miss."""
    scheme = _scheme(env_id)
    if scheme is not None:
        return _loader_spec(*scheme)
    for attempt in range(2):
        if env_id in _REGISTRY:
            return _REGISTRY[env_id]
        name, version = _parse_id(env_id)
        if version is None:
            versions = [s for s in _REGISTRY.values() if s.name == name and s.version is not None]
            if versions:
                return max(versions, key=lambda s: s.version or 0)
        if attempt == 0:
            register_plugins(reload=True)
    raise EnvNotFoundError(_not_found_message(env_id))


def _not_found_message(env_id: str) -> str:
    known = sorted(set(_REGISTRY) | {s.name for s in _REGISTRY.values()})
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"no environment {env_id!r} is registered.{hint} Run `agentrl envs` to list what is installed; "
        f"if it comes from a plug-in package, `pip install` that package so it appears in the "
        f"'{ENTRY_POINT_GROUP}' entry-point group, or call agentrl.register({env_id!r}, 'module:Class')."
    )


def spec(env_id: str) -> EnvSpec:
    """The :class:`EnvSpec` for ``env_id`` (a bare name resolves to its latest version).

    Raises:
        EnvNotFoundError: nothing is registered under that id; the message suggests close ids.
    """
    return _resolve(env_id)


def _make_unchecked(env_id: str, **kwargs: Any) -> Any:
    env_spec = _resolve(env_id)
    env = env_spec.load()(**{**env_spec.kwargs, **kwargs})
    from agentrl.core import Env

    if not isinstance(env, Env):
        raise PluginError(
            f"environment {env_spec.id!r}: {env_spec.entry_point!r} returned {type(env).__name__}, "
            "not an agentrl.Env subclass"
        )
    return env


def make(env_id: str, **kwargs: Any) -> Any:
    """Build the environment registered under ``env_id`` with its default kwargs overridden by ``kwargs``.

    The env's ``spec`` is Gymnasium's spec for ``agentrl/<id>``, so Gymnasium tools (``check_env``,
    ``spec.make``) work on it. No wrappers are added: runners enforce turn limits themselves.

    Raises:
        EnvNotFoundError: unknown id (with a did-you-mean and an install hint).
        PluginError: the env's plug-in failed to import or returned something that is not an Env.
    """
    import dataclasses

    import gymnasium

    env = _make_unchecked(env_id, **kwargs)
    if _scheme(env_id) is not None:
        return env  # a loader's id is not a Gymnasium id
    gym_spec = gymnasium.spec(f"{GYM_NAMESPACE}/{_resolve(env_id).id}")
    env.unwrapped.spec = dataclasses.replace(gym_spec, kwargs={**gym_spec.kwargs, **kwargs})
    return env


def list_envs() -> list[EnvSpec]:
    """Every registered spec, plug-ins included, sorted by id. Loads no plug-in code."""
    register_plugins()
    return sorted(_REGISTRY.values(), key=lambda s: s.id)


def broken_plugins() -> dict[str, str]:
    """Entry points that could not be registered, by name, with the reason."""
    return dict(_broken)


register_loader("mcp", "agentrl.interop.mcp:load_mcp_env", description="tools from MCP servers; target: a YAML/JSON env config")
register_loader("openenv", "agentrl.interop.openenv:load_openenv", description="an OpenEnv server; target: its http://host:port")
register_loader("verifiers", "agentrl.interop.verifiers:load_verifiers_env", description="a verifiers env by id")
register_loader("harbor", "agentrl.interop.harbor:load_harbor_env", description="Harbor task folders, in docker")
