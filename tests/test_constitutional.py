"""Constitutional critique-and-revise on the tiny model: complete records, what each step's request holds,
failures marked and skipped, and the revisions training with the SFT and preference learners."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.errors import ConfigError
from agentrl.learners.constitutional import (
    CRITIQUE_TEMPLATE,
    REVISION_TEMPLATE,
    Revision,
    assign_principles,
    critique_and_revise,
    critique_conversation,
    revision_conversation,
    to_preference_pairs,
    to_sft_examples,
    train_constitutional,
)
from agentrl.learners.dpo import DPOConfig, train_dpo
from agentrl.learners.sft import Demonstration, SFTConfig, train_sft
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.rollout.hf import HFPolicy
from agentrl.rollout.policy import SamplingParams

PROMPTS = ["What is 2+3?", "Name a colour.", "Say hi.", "Count to 3."]
PRINCIPLES = ["Be honest about what you do not know.", "Be brief (strict)."]
SAMPLING = SamplingParams(max_tokens=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def policy(tokenizer):
    return HFPolicy("tiny", tokenizer)


class Recording:
    """The tiny model's hf backend, recording each request's decoded prompt and failing those ``fails`` picks."""

    name = "recording"

    def __init__(self, inner: HFPolicy, tokenizer, fails=lambda text: False):
        self.inner, self.tokenizer, self.fails = inner, tokenizer, fails
        self.version, self.max_context = inner.version, inner.max_context
        self.requests: list[str] = []

    async def generate(self, prompt, sampling, *, tools=None):
        text = self.tokenizer.decode(list(prompt))
        self.requests.append(text)
        if self.fails(text):
            raise RuntimeError("backend down")
        return await self.inner.generate(prompt, sampling)


def test_each_step_sees_the_previous_ones_and_the_records_are_complete(policy, tokenizer):
    recording = Recording(policy, tokenizer)
    records = critique_and_revise(recording, ChatRenderer(tokenizer), PROMPTS, PRINCIPLES, sampling=SAMPLING)
    assert len(recording.requests) == 3 * len(PROMPTS)  # draft, critique, revision per prompt
    assert [r.principle for r in records] == [PRINCIPLES[i % 2] for i in range(4)]  # round-robin
    for record, text in zip(records, PROMPTS, strict=True):
        assert record.ok and record.error is None and record.failed_step is None
        assert record.prompt == ({"role": "user", "content": text},)
        assert all(isinstance(x, str) and x for x in (record.draft, record.critique, record.revision))
        assert len({record.draft, record.critique, record.revision}) == 3
        # The critique request holds the prompt, the draft and the principle; the revision request the critique.
        critique_ask = CRITIQUE_TEMPLATE.format(principle=record.principle, draft="", request="")
        (critique_request,) = [
            r for r in recording.requests if record.draft in r and r.endswith(_asking(critique_ask))
        ]
        assert text in critique_request
        revise_ask = REVISION_TEMPLATE.format(principle=record.principle, draft="", request="", critique="")
        (revision_request,) = [r for r in recording.requests if record.critique in r]
        assert revision_request.endswith(_asking(revise_ask))
        assert revision_request.startswith(critique_request)  # one conversation, continued
        assert record.revision not in "".join(recording.requests)  # the last step's answer is asked of no one

    pairs = to_preference_pairs(records)
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        (r.revision, r.draft) for r in records
    ]
    examples = to_sft_examples(records)
    assert [e.messages for e in examples] == [
        (*r.prompt, {"role": "assistant", "content": r.revision}) for r in records
    ]


def _asking(request: str) -> str:
    """How a user turn asking ``request`` ends a rendered prompt (ChatML)."""
    return f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n"


def test_failed_steps_are_marked_and_skipped(policy, tokenizer):
    renderer = ChatRenderer(tokenizer)
    # The strict principle's critique requests fail, and so does the revision of the "Say hi." prompt.
    revise_ask = REVISION_TEMPLATE.split("(")[0]

    def fails(text):
        asks_critique = "Critique your last response" in text and revise_ask not in text
        return (asks_critique and "(strict)" in text) or ("Say hi." in text and revise_ask in text)

    records = critique_and_revise(Recording(policy, tokenizer, fails), renderer, PROMPTS, PRINCIPLES,
                                  sampling=SAMPLING)  # fmt: skip
    steps = [(r.failed_step, r.error) for r in records]
    assert steps == [(None, None), ("critique", "RuntimeError: backend down"),
                     ("revision", "RuntimeError: backend down"), ("critique", "RuntimeError: backend down")]  # fmt: skip
    assert records[1].draft and records[1].critique is None and records[1].revision is None
    assert records[2].critique and records[2].revision is None
    assert [p.prompt for p in to_preference_pairs(records)] == [records[0].prompt]
    assert [e.messages[0]["content"] for e in to_sft_examples(records)] == [PROMPTS[0]]

    # A request that runs out of time fails its record at the draft; nothing is left to train on.
    timed_out = critique_and_revise(
        policy, renderer, PROMPTS[:2], PRINCIPLES, sampling=SAMPLING, timeout_s=1e-4
    )
    assert [(r.failed_step, r.draft) for r in timed_out] == [("draft", None)] * 2
    assert all(r.error == "timed out after 0.0001 s" for r in timed_out)
    assert to_preference_pairs(timed_out) == [] and to_sft_examples(timed_out) == []


def test_identical_or_empty_revisions_give_no_pair():
    prompt = ({"role": "user", "content": "hi"},)
    same = Revision(prompt, "p", "hello", "fine", "hello")
    empty = Revision(prompt, "p", "hello", "too long", "  ")
    blank_draft = Revision(prompt, "p", "", "empty", "hello")
    assert to_preference_pairs([same, empty, blank_draft]) == []
    assert [e.messages[-1]["content"] for e in to_sft_examples([same, empty, blank_draft])] == [
        "hello",
        "hello",
    ]


def test_revisions_train_with_the_preference_and_sft_learners(policy, tokenizer):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    renderer = ChatRenderer(tokenizer, tools)
    records = critique_and_revise(policy, renderer, PROMPTS, PRINCIPLES, sampling=SAMPLING)
    assert all(r.tools == tuple(tools) for r in records)
    start = dict(load_model("tiny").named_parameters())

    pairs = to_preference_pairs(records)
    assert len(pairs) == 4 and all(p.tools == tuple(tools) for p in pairs)
    dpo = train_dpo(DPOConfig(max_steps=2, warmup_steps=0, batch_size=4), pairs)
    sft = train_sft(SFTConfig(max_steps=2, warmup_steps=0, batch_size=4), to_sft_examples(records))
    for result in (dpo, sft):
        assert all(math.isfinite(log.loss) for log in result.history) and len(result.history) == 2
        assert any(not torch.equal(p, start[name]) for name, p in result.model.named_parameters())
    assert sft.history[1].loss < sft.history[0].loss


def test_train_constitutional_generates_with_the_model_it_trains(tmp_path):
    config = SFTConfig(max_steps=2, warmup_steps=0, batch_size=4, output_dir=tmp_path)
    result = train_constitutional(config, PROMPTS, PRINCIPLES, sampling=SAMPLING, order="random", seed=1)
    assert [r.principle for r in result.extras["revisions"]] == assign_principles(4, PRINCIPLES, "random", 1)
    assert result.checkpoint == tmp_path / "step-000002" and result.extras["num_rows"] == 4
    with pytest.raises(
        ConfigError, match=r"none of the 4 critique-and-revise records gave training data \(4 failed"
    ):
        train_constitutional(DPOConfig(max_steps=1, warmup_steps=0), PROMPTS, PRINCIPLES, sampling=SAMPLING,
                             timeout_s=1e-4)  # fmt: skip


def test_conversations_templates_and_principles():
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Is {x} a set?"}]
    template = "Judge '{draft}' for '{request}' by: {principle}. Braces: {{ok}}"
    critique = critique_conversation(prompt, "Yes.", "Be exact.", template)
    assert critique[:2] == prompt and critique[2] == {"role": "assistant", "content": "Yes."}
    assert critique[3] == {
        "role": "user",
        "content": "Judge 'Yes.' for 'Is {x} a set?' by: Be exact.. Braces: {ok}",
    }
    revision = revision_conversation(prompt, "Yes.", "Be exact.", "Too vague.", template, "Fix: {critique}")
    assert revision[:4] == critique
    assert revision[4:] == [
        {"role": "assistant", "content": "Too vague."},
        {"role": "user", "content": "Fix: Too vague."},
    ]

    assert assign_principles(5, ["a", "b"]) == ["a", "b", "a", "b", "a"]
    drawn = assign_principles(50, ["a", "b", "c"], "random", seed=7)
    assert drawn == assign_principles(50, ["a", "b", "c"], "random", seed=7) and set(drawn) == {"a", "b", "c"}
    with pytest.raises(ConfigError, match="at least one principle"):
        assign_principles(1, [])
    with pytest.raises(ConfigError, match=r"revision_template does not format \(KeyError: 'answer'\)"):
        critique_and_revise(None, None, ["hi"], ["a"], revision_template="{answer}")  # type: ignore[arg-type]


def test_sft_examples_are_demonstrations():
    record = Revision(({"role": "user", "content": "hi"},), "p", "yo", "rude", "Hello!", tools=({"x": 1},))
    assert to_sft_examples([record]) == [
        Demonstration(
            ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}), ({"x": 1},)
        )
    ]
