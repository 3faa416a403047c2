"""Conversations in, assistant texts out, over any policy backend: what judges, critique-and-revise and
self-play use when they need a model's words rather than a token ledger.

Token-id backends (``hf``, ``vllm``, an OpenAI-compatible ``/completions`` server) get each conversation
rendered with a :class:`~agentrl.models.chat.ChatRenderer`; text-only backends (``openai`` chat) get the
messages. All requests are sent at once, so the backend batches them; each one may carry a time limit, and
a request that fails or runs out of time is an item with ``error`` set, never an exception of the batch.

Usage::

    from agentrl.rollout.complete import complete

    texts = complete(policy, [[{"role": "user", "content": "2+2?"}]], SamplingParams(max_tokens=8), renderer)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.rollout.policy import Generation, Policy, SamplingParams
from agentrl.types import Message

__all__ = ["Completion", "acomplete", "complete"]


@dataclass(frozen=True)
class Completion:
    """One answer: its text without the stop token, and the generation (None when the request failed, then
    ``error`` says why)."""

    text: str | None
    generation: Generation | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _text(generation: Generation, renderer: Any) -> str:
    if generation.text is not None:
        return generation.text
    return renderer.assistant_message(renderer.decode(generation.token_ids))["content"]


async def _one(policy: Policy, conversation: Sequence[Message], sampling: SamplingParams, renderer: Any,
               timeout_s: float | None) -> Completion:  # fmt: skip
    prompt: Any = renderer.prompt_ids(conversation) if renderer is not None else list(conversation)
    try:
        generation = await asyncio.wait_for(policy.generate(prompt, sampling), timeout_s)
    except asyncio.TimeoutError:
        return Completion(None, None, f"timed out after {timeout_s} s")
    except Exception as error:  # one failed request is that item's result, not the whole batch's
        return Completion(None, None, f"{type(error).__name__}: {error}")
    return Completion(_text(generation, renderer), generation)


async def acomplete(
    policy: Policy,
    conversations: Sequence[Sequence[Message]],
    sampling: SamplingParams,
    renderer: Any = None,
    *,
    timeout_s: float | None = None,
) -> list[Completion]:
    """One assistant answer per conversation, in order.

    Args:
        policy: any backend; a token-id backend needs ``renderer``.
        conversations: message lists, each ending where the assistant should answer.
        sampling: how to sample (one ``SamplingParams`` for all; its ``seed`` applies to each request).
        renderer: the policy tokenizer's :class:`~agentrl.models.chat.ChatRenderer`; None sends messages.
        timeout_s: the most seconds per request (None: no limit).
    """
    return list(
        await asyncio.gather(*(_one(policy, c, sampling, renderer, timeout_s) for c in conversations))
    )


def complete(
    policy: Policy,
    conversations: Sequence[Sequence[Message]],
    sampling: SamplingParams,
    renderer: Any = None,
    *,
    timeout_s: float | None = None,
) -> list[Completion]:
    """:func:`acomplete` from synchronous code (not from inside a running event loop)."""
    return asyncio.run(acomplete(policy, conversations, sampling, renderer, timeout_s=timeout_s))
