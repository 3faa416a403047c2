"""The Policy protocol every generation backend implements (``hf``, ``vllm``, ``openai``).

The runner hands a backend the exact prompt token ids of an episode and gets back the exact sampled ids and
their logprobs, so the token ledger never re-tokenizes text. A backend that cannot return token ids (an API
model behind an OpenAI-compatible server) returns text and ``trainable=False``; the runner keeps such
trajectories for evaluation only.

Backends are found by name (``make_policy("hf", model=...)``), registered in-process with
:func:`register_policy`; heavy modules (torch, transformers, vllm, httpx) are imported by the backend
modules only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from agentrl._plugins import load_object
from agentrl.errors import ConfigError, RegistryError
from agentrl.types import Message, ToolSchema

__all__ = [
    "Generation",
    "Policy",
    "SamplingParams",
    "list_policies",
    "make_policy",
    "register_policy",
]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation.

    Attributes:
        max_tokens: the most new tokens to sample (the runner lowers it to what is left of the context).
        temperature: softmax temperature; 0 means greedy. Logprobs are those of the distribution sampled
            from (logits / temperature), so an update on them is on-policy for what was sampled.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        stop_token_ids: generation ends after sampling any of these (the tokenizer's EOS is always one).
        seed: per-request seed for reproducible sampling, where the backend supports it.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")


@dataclass(frozen=True)
class Generation:
    """One sampled continuation.

    Attributes:
        token_ids: the sampled ids, exactly as sampled (a stop token included when one ended it).
        logprobs: the sampler's logprob of each sampled id (same length as ``token_ids``), or None where the
            backend does not report them.
        finish_reason: ``"stop"`` (a stop token or the model's end) or ``"length"`` (``max_tokens`` reached).
        text: the decoded text where the backend produced it (always set by text-only backends).
        trainable: False when ids/logprobs are not the policy's own (text-only API models): the trajectory
            is kept for evaluation and never trained on.
        policy_version: the weight version that sampled this (bumped by each weight sync).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: FinishReason
    text: str | None = None
    trainable: bool = True
    policy_version: int = 0
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} sampled tokens")


@runtime_checkable
class Policy(Protocol):
    """A generation backend. Implementations batch concurrent ``generate`` calls themselves.

    Attributes:
        name: the backend's registered name.
        version: the current weight version (incremented by ``update_weights``).
        max_context: the most tokens (prompt + sampled) the model accepts.
    """

    name: str
    version: int
    max_context: int

    async def generate(
        self,
        prompt: Sequence[int] | Sequence[Message],
        sampling: SamplingParams,
        *,
        tools: Sequence[ToolSchema] | None = None,
    ) -> Generation:
        """Sample one continuation of ``prompt`` (token ids; messages only for text-only backends).

        ``tools`` are the env's tool schemas, passed with message prompts only: chat APIs take them as a
        request field. Token-id prompts already hold them, rendered by the chat template.

        Raises:
            ConfigError: the request cannot be served as asked (e.g. messages given to an ids-only backend).
            agentrl.errors.AgentRLError: the backend failed; the runner records it on the trajectory.
        """
        ...

    async def update_weights(self, named_tensors: Any) -> None:
        """Load new weights (an iterable of ``(name, tensor)``) and bump :attr:`version`."""
        ...

    async def aclose(self) -> None:
        """Release the backend. Idempotent."""
        ...


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, str | PolicyFactory] = {}


def register_policy(name: str, factory: str | PolicyFactory, *, override: bool = False) -> None:
    """Register a backend under ``name`` (a factory, or ``"module:attr"`` imported on first use).

    Raises:
        ConfigError: the name is taken and ``override`` is False.
    """
    if name in _REGISTRY and not override:
        raise ConfigError(f"policy backend {name!r} is already registered; pass override=True to replace it")
    _REGISTRY[name] = factory


def list_policies() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def make_policy(name: str, **options: Any) -> Policy:
    """Build the backend registered as ``name`` with backend-specific ``options``.

    Raises:
        RegistryError: no backend by that name (with close names).
        PluginError: the backend's module failed to import (e.g. a missing extra; the message says which).
    """
    target = _REGISTRY.get(name)
    if target is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise RegistryError(f"no policy backend {name!r}.{hint} Known: {', '.join(list_policies())}")
    return load_object(target, f"policy backend {name!r}")(**options)


register_policy("hf", "agentrl.rollout.hf:HFPolicy")
register_policy("vllm", "agentrl.rollout.vllm:VLLMPolicy")
register_policy("openai", "agentrl.rollout.openai:OpenAIPolicy")
