"""agentrl: train and evaluate LLM agents with reinforcement learning in multi-turn environments.

The light core is imported here (the Env contract, the registry, types, errors). Everything heavy (torch,
transformers, vLLM, docker, httpx) is imported by the module that uses it, so ``import agentrl`` stays fast.
"""

from agentrl.core import ChatSpace, Env, ResetResult, StepResult, TextSpace, Wrapper
from agentrl.errors import (
    AgentRLError,
    ConfigError,
    EnvCheckError,
    EnvNotFoundError,
    MissingDependencyError,
    PluginError,
    RegistryError,
    TemplateError,
    ToolCallError,
)
from agentrl.registry import EnvSpec, list_envs, make, register, register_plugins, spec
from agentrl.types import Message, StopReason, ToolCall

__version__ = "0.1.0"

__all__ = [
    "AgentRLError",
    "ChatSpace",
    "ConfigError",
    "Env",
    "EnvCheckError",
    "EnvNotFoundError",
    "EnvSpec",
    "Message",
    "MissingDependencyError",
    "PluginError",
    "RegistryError",
    "ResetResult",
    "StepResult",
    "StopReason",
    "TemplateError",
    "TextSpace",
    "ToolCall",
    "ToolCallError",
    "Wrapper",
    "__version__",
    "list_envs",
    "make",
    "register",
    "register_plugins",
    "spec",
]
