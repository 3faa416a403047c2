"""Constitutional critique-and-revise: the model improves its own answers against written principles, and the
revisions become training data (SFT on the revisions, or preference pairs of revision over draft).

For each prompt, in one conversation the model continues::

    draft     the model's answer to the prompt
    critique  a user turn asks it to critique that answer against one principle (``CRITIQUE_TEMPLATE``);
              the principle is chosen per prompt, round-robin over the list or by a seeded RNG
    revise    a user turn asks it to rewrite the answer to meet the critique (``REVISION_TEMPLATE``)

Each step runs as one batch over all prompts (the backend batches the requests). A step that fails for a
prompt (the backend raised, or the request ran out of time) ends that prompt's record with ``error`` set
and the failed step named; such records are skipped when training data is built, never a crash.

Usage::

    from agentrl.learners.constitutional import critique_and_revise, to_preference_pairs, to_sft_examples
    from agentrl.learners.dpo import DPOConfig, train_dpo

    records = critique_and_revise(policy, renderer, prompts, ["Be honest about uncertainty.", "Be concise."])
    train_dpo(DPOConfig(model=path, max_steps=100), to_preference_pairs(records))

or both steps at once with :func:`train_constitutional`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentrl.errors import ConfigError
from agentrl.learners.dpo import DPOConfig, train_dpo
from agentrl.learners.preference_data import PreferenceConversation
from agentrl.learners.result import TrainResult
from agentrl.learners.sft import Demonstration, SFTConfig, train_sft
from agentrl.rollout.complete import Completion, acomplete
from agentrl.rollout.policy import Policy, SamplingParams
from agentrl.types import Message, ToolSchema

__all__ = [
    "CRITIQUE_TEMPLATE",
    "DEFAULT_SAMPLING",
    "REVISION_TEMPLATE",
    "Revision",
    "acritique_and_revise",
    "assign_principles",
    "critique_and_revise",
    "critique_conversation",
    "revision_conversation",
    "to_preference_pairs",
    "to_sft_examples",
    "train_constitutional",
]

CRITIQUE_TEMPLATE = (
    "Critique your last response against this principle: {principle}\n"
    "Point out each specific way in which it falls short of the principle. If it already follows the "
    "principle, say so."
)
"""The user turn asking for a critique of the draft. Fields: ``{principle}``, ``{draft}`` (the draft's text,
which the conversation already holds as the assistant's turn) and ``{request}`` (the prompt's last user
message)."""

REVISION_TEMPLATE = (
    "Rewrite your response so that it follows the principle ({principle}) and fixes what the critique "
    "found. Reply with the rewritten response only."
)
"""The user turn asking for the revision, after the critique. Fields: those of :data:`CRITIQUE_TEMPLATE`
and ``{critique}``."""

DEFAULT_SAMPLING = SamplingParams(max_tokens=512, temperature=1.0)
"""How each step samples unless told otherwise."""

Step = Literal["draft", "critique", "revision"]


@dataclass(frozen=True)
class Revision:
    """One prompt's critique-and-revise record.

    Attributes:
        prompt: the conversation the draft answers.
        principle: the principle the draft was critiqued against.
        draft, critique, revision: each step's text; None from the step that failed on.
        error: why a step failed (None when all three ran); ``failed_step`` names it.
        tools: the tools the prompt offered (the renderer's), kept for training on the record.
    """

    prompt: tuple[Message, ...]
    principle: str
    draft: str | None
    critique: str | None = None
    revision: str | None = None
    error: str | None = None
    failed_step: Step | None = None
    tools: tuple[ToolSchema, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


# ---- the conversations ----------------------------------------------------------------------------
def _fields(prompt: Sequence[Message], draft: str, principle: str) -> dict[str, str]:
    request = next((m.get("content") or "" for m in reversed(prompt) if m.get("role") == "user"), "")
    return {"principle": principle, "draft": draft, "request": request}


def critique_conversation(
    prompt: Sequence[Message], draft: str, principle: str, template: str = CRITIQUE_TEMPLATE
) -> list[Message]:
    """The prompt, the draft as the assistant's answer, and the critique request."""
    request = template.format(**_fields(prompt, draft, principle))
    return [*prompt, {"role": "assistant", "content": draft}, {"role": "user", "content": request}]


def revision_conversation(
    prompt: Sequence[Message],
    draft: str,
    principle: str,
    critique: str,
    critique_template: str = CRITIQUE_TEMPLATE,
    revision_template: str = REVISION_TEMPLATE,
) -> list[Message]:
    """The critique conversation, the critique as the assistant's answer, and the revision request."""
    request = revision_template.format(**_fields(prompt, draft, principle), critique=critique)
    return [*critique_conversation(prompt, draft, principle, critique_template),
            {"role": "assistant", "content": critique}, {"role": "user", "content": request}]  # fmt: skip


def assign_principles(
    n: int, principles: Sequence[str], order: Literal["round-robin", "random"] = "round-robin", seed: int = 0
) -> list[str]:
    """The principle of each of ``n`` prompts: ``principles[i % len]``, or drawn by ``random.Random(seed)``.

    Raises:
        ConfigError: no principle, or an unknown ``order``.
    """
    if not principles:
        raise ConfigError("critique-and-revise needs at least one principle, e.g. ['Be honest.']")
    if order == "round-robin":
        return [principles[i % len(principles)] for i in range(n)]
    if order == "random":
        rng = random.Random(seed)
        return [rng.choice(list(principles)) for _ in range(n)]
    raise ConfigError(f"order must be 'round-robin' or 'random', got {order!r}")


def _check_templates(critique_template: str, revision_template: str) -> None:
    fields = {"principle": "p", "draft": "d", "request": "r"}
    for name, template, extra in (("critique_template", critique_template, {}),
                                  ("revision_template", revision_template, {"critique": "c"})):  # fmt: skip
        try:
            template.format(**fields, **extra)
        except (KeyError, IndexError, ValueError) as exc:
            allowed = ", ".join(f"{{{k}}}" for k in [*fields, *extra])
            raise ConfigError(
                f"{name} does not format ({type(exc).__name__}: {exc}); it may use {allowed}, and literal "
                "braces must be doubled ({{ }})"
            ) from None


# ---- the steps ------------------------------------------------------------------------------------
async def acritique_and_revise(
    policy: Policy,
    renderer: Any,
    prompts: Sequence[str | Sequence[Message]],
    principles: Sequence[str],
    *,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    critique_template: str = CRITIQUE_TEMPLATE,
    revision_template: str = REVISION_TEMPLATE,
    order: Literal["round-robin", "random"] = "round-robin",
    seed: int = 0,
    timeout_s: float | None = None,
) -> list[Revision]:
    """Draft, critique and revise an answer to each prompt; see the module docstring.

    Args:
        policy: any backend (a token-id backend needs ``renderer``).
        renderer: the policy tokenizer's :class:`~agentrl.models.chat.ChatRenderer` (its tools are offered
            in every step and kept on the records), or None for a text-only backend.
        prompts: a user message's text, or a conversation ending where the assistant answers.
        principles: the principles to critique against; see :func:`assign_principles` for ``order``/``seed``.
        sampling: how every step samples.
        critique_template, revision_template: the user turns asking for the critique and the revision.
        timeout_s: the most seconds per request (None: no limit).

    Returns:
        One :class:`Revision` per prompt, in order.

    Raises:
        ConfigError: no principle, or a template that does not format.
    """
    _check_templates(critique_template, revision_template)
    conversations = [_conversation(p) for p in prompts]
    chosen = assign_principles(len(conversations), principles, order, seed)
    tools = tuple(getattr(renderer, "tools", None) or ())
    records = [Revision(c, p, None, tools=tools) for c, p in zip(conversations, chosen, strict=True)]

    def critique(r: Revision) -> list[Message]:
        return critique_conversation(r.prompt, r.draft or "", r.principle, critique_template)

    def revision(r: Revision) -> list[Message]:
        return revision_conversation(r.prompt, r.draft or "", r.principle, r.critique or "",
                                     critique_template, revision_template)  # fmt: skip

    # A record reaches a step only when the steps before it gave text, so its draft and critique are set.
    steps: list[tuple[Step, Callable[[Revision], Sequence[Message]]]] = [
        ("draft", lambda r: r.prompt), ("critique", critique), ("revision", revision)
    ]  # fmt: skip
    for name, build in steps:
        alive = [i for i, r in enumerate(records) if r.ok]
        requests = [build(records[i]) for i in alive]
        answers = await acomplete(policy, requests, sampling, renderer, timeout_s=timeout_s)
        for i, answer in zip(alive, answers, strict=True):
            records[i] = _advance(records[i], name, answer)
    return records


def _conversation(prompt: str | Sequence[Message]) -> tuple[Message, ...]:
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},)
    return tuple(prompt)


def _advance(record: Revision, step: Step, answer: Completion) -> Revision:
    """``record`` with ``step``'s text filled in, or marked failed at ``step``."""
    if not answer.ok or answer.text is None:
        return dataclasses.replace(record, error=answer.error or "no text", failed_step=step)
    if step == "draft":
        return dataclasses.replace(record, draft=answer.text)
    if step == "critique":
        return dataclasses.replace(record, critique=answer.text)
    return dataclasses.replace(record, revision=answer.text)


def critique_and_revise(
    policy: Policy,
    renderer: Any,
    prompts: Sequence[str | Sequence[Message]],
    principles: Sequence[str],
    **options: Any,
) -> list[Revision]:
    """:func:`acritique_and_revise` from synchronous code (not from inside a running event loop); the same
    keyword options."""
    return asyncio.run(acritique_and_revise(policy, renderer, prompts, principles, **options))


# ---- training data --------------------------------------------------------------------------------
def _usable(record: Revision) -> bool:
    return record.ok and bool(record.revision and record.revision.strip())


def to_preference_pairs(records: Sequence[Revision]) -> list[PreferenceConversation]:
    """Revision (chosen) over draft (rejected) for each complete record; failed records, empty drafts or
    revisions, and revisions identical to their draft give no pair."""
    pairs = []
    for r in records:
        if _usable(r) and (r.draft or "").strip() and r.revision != r.draft:
            chosen: Message = {"role": "assistant", "content": r.revision or ""}
            rejected: Message = {"role": "assistant", "content": r.draft or ""}
            pairs.append(PreferenceConversation(r.prompt, (chosen,), (rejected,), r.tools))
    return pairs


def to_sft_examples(records: Sequence[Revision]) -> list[Demonstration]:
    """The prompt followed by the revision as the assistant's answer, for each complete record with a
    non-empty revision (in the form :func:`~agentrl.learners.sft.train_sft` takes)."""
    return [Demonstration((*r.prompt, {"role": "assistant", "content": r.revision or ""}), r.tools)
            for r in records if _usable(r)]  # fmt: skip


# ---- both at once ---------------------------------------------------------------------------------
def train_constitutional(
    config: SFTConfig | DPOConfig,
    prompts: Sequence[str | Sequence[Message]],
    principles: Sequence[str],
    *,
    tools: Sequence[ToolSchema] = (),
    **options: Any,
) -> TrainResult:
    """Critique and revise with ``config.model`` itself (the ``hf`` backend), then train it on the
    revisions: SFT with an :class:`~agentrl.learners.sft.SFTConfig`, revision-over-draft preference
    learning with a :class:`~agentrl.learners.dpo.DPOConfig`.

    Args:
        config: the training run's settings; its ``model``, ``device`` and ``template`` also generate.
        prompts, principles: as for :func:`acritique_and_revise`.
        tools: tool schemas offered in every prompt.
        options: the keyword options of :func:`acritique_and_revise`.

    Returns:
        The SFT or DPO run's result, with the critique-and-revise records in ``extras["revisions"]``
        beside that learner's own extras.

    Raises:
        ConfigError: no record gave training data (the message counts the failed ones).
    """
    from agentrl.models.chat import ChatRenderer
    from agentrl.models.loading import load_tokenizer
    from agentrl.rollout.hf import HFPolicy

    tokenizer = load_tokenizer(config.model)
    renderer = ChatRenderer(tokenizer, tools, config.template)

    async def run() -> list[Revision]:
        policy = HFPolicy(config.model, tokenizer, device=config.device, seed=config.seed)
        try:
            return await acritique_and_revise(policy, renderer, prompts, principles, **options)
        finally:
            await policy.aclose()

    records = asyncio.run(run())
    preference = isinstance(config, DPOConfig)
    data: Sequence[Any] = to_preference_pairs(records) if preference else to_sft_examples(records)
    if not data:
        failed = sum(not r.ok for r in records)
        raise ConfigError(
            f"none of the {len(records)} critique-and-revise records gave training data ({failed} failed; "
            "the others had empty revisions or revisions equal to their drafts); see each record's error, "
            "or raise sampling.max_tokens"
        )
    training = train_dpo(config, data) if isinstance(config, DPOConfig) else train_sft(config, data)
    return dataclasses.replace(training, extras={**training.extras, "revisions": tuple(records)})
