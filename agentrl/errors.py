"""One exception tree for the whole project.

Every error derives from :class:`AgentRLError` *and* the stdlib class a caller would naturally catch
(``ValueError``, ``LookupError``, ``ImportError``), so ``except ValueError`` keeps working. Messages name
the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "AgentRLError",
    "ConfigError",
    "EnvCheckError",
    "EnvNotFoundError",
    "EnvServerError",
    "MissingDependencyError",
    "PluginError",
    "RegistryError",
    "RolloutError",
    "TemplateError",
    "ToolCallError",
    "WeightSyncError",
]


class AgentRLError(Exception):
    """Base class of every error agentrl raises on purpose."""


class ConfigError(AgentRLError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class RegistryError(AgentRLError, ValueError):
    """A registration is malformed or clashes with an existing one."""


class EnvNotFoundError(AgentRLError, LookupError):
    """No environment is registered under the requested id."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class EnvServerError(AgentRLError, ConnectionError):
    """An environment's server (an MCP server, an OpenEnv server) could not be started or reached; the message
    names the server and what to check."""


class PluginError(AgentRLError, ImportError):
    """A plug-in registered through an entry point failed to load; the message names the plug-in."""


class MissingDependencyError(AgentRLError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""


class ToolCallError(AgentRLError, ValueError):
    """The model's tool call is malformed, names an unknown tool, or has invalid arguments.

    Environments turn it into an observation for the model (``str(error)`` is written for the model to
    read); it never escapes ``Env.step``.
    """


class TemplateError(AgentRLError, ValueError):
    """A chat template breaks the token-ledger contract (rendering is not prefix-stable)."""


class RolloutError(AgentRLError, RuntimeError):
    """Every episode of several training steps in a row failed: the env or the backend is broken."""


class WeightSyncError(AgentRLError, RuntimeError):
    """After a weight sync the rollout engine does not score like the learner: it samples with other weights."""


class EnvCheckError(AgentRLError, AssertionError):
    """An environment failed one of :func:`agentrl.checker.check_env`'s checks."""
