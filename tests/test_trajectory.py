"""The token ledger, token by token, with the tiny model's real tokenizer (loaded through from_pretrained)."""

from __future__ import annotations

import json

import pytest

from agentrl.data.trajectory import LedgerBuilder, Trajectory, TurnSpan, read_jsonl, write_jsonl
from agentrl.errors import TemplateError
from agentrl.models.chat import ChatRenderer, check_template
from agentrl.tools import Tool
from agentrl.types import StopReason


def run_python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: the program.
    """
    raise NotImplementedError


TOOLS = [Tool.from_function(run_python).schema()]
OPENING = [
    {"role": "system", "content": "Solve the task. Use the tool to check your work."},
    {"role": "user", "content": "What is (1 + 1) * 2?"},
]
CALL_1 = '<tool_call>\n{"name": "run_python", "arguments": {"code": "print(1 + 1)"}}\n</tool_call>'
CALL_2 = 'Now double it.\n<tool_call>\n{"name": "run_python", "arguments": {"code": "print(2 * 2)"}}\n</tool_call>'
ANSWER = "The answer is 4."
TOOL_RESULTS = [
    [{"role": "tool", "content": "2\n", "tool_call_id": "call_0", "name": "run_python"}],
    [{"role": "tool", "content": "4\n", "tool_call_id": "call_0", "name": "run_python"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny model's tokenizer as a user gets it: built into a cache dir, loaded by from_pretrained."""
    from agentrl.models.loading import load_tokenizer
    from agentrl.models.tiny import build_tiny_model

    return load_tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


def play(tokenizer, texts, *, eos=True):
    """Drive the ledger as the runner does: sampled ids from a scripted policy, env answers in between."""
    renderer = ChatRenderer(tokenizer, TOOLS)
    history = list(OPENING)
    ledger = LedgerBuilder(renderer.prompt_ids(history), history)
    sampled = []
    for turn, text in enumerate(texts):
        ids = renderer.encode(text) + ([tokenizer.eos_token_id] if eos else [])
        sampled.append(ids)
        ledger.add_sampled(ids, [-0.5] * len(ids))
        ledger.set_reward(0.1 * turn, {"progress": 0.1 * turn})
        if turn < len(TOOL_RESULTS):
            ledger.add_observation(renderer.observation_ids(history, renderer.decode(ids), TOOL_RESULTS[turn]))
            history += [renderer.assistant_message(renderer.decode(ids)), *TOOL_RESULTS[turn]]
            ledger.add_messages(history[-2:])
    return ledger.finish(StopReason.TERMINATED, policy_version=3), sampled, renderer


def runs(tokenizer, trajectory):
    """Maximal runs of equal mask, decoded: [(text, mask), ...]."""
    out, start = [], 0
    mask = trajectory.loss_mask
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((tokenizer.decode(trajectory.token_ids[start:i]), mask[start]))
            start = i
    return out


def test_three_turns_two_tool_calls_mask_exactly_the_sampled_tokens(tokenizer):
    trajectory, sampled, renderer = play(tokenizer, [CALL_1, CALL_2, ANSWER])
    im_end = "<|im_end|>"
    prompt = renderer.render(OPENING, add_generation_prompt=True)
    assert runs(tokenizer, trajectory) == [
        (prompt, 0),
        (CALL_1 + im_end, 1),
        ("\n<|im_start|>user\n<tool_response>\n2\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        (CALL_2 + im_end, 1),
        ("\n<|im_start|>user\n<tool_response>\n4\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        (ANSWER + im_end, 1),
    ]
    # Token by token: mask 1 exactly where the sampled ids sit, and those ids are stored unchanged.
    table = [(i, tokenizer.convert_ids_to_tokens(t), m) for i, (t, m) in enumerate(zip(trajectory.token_ids, trajectory.loss_mask, strict=True))]
    print("\n".join(f"{i:4d} {m} {tok!r}" for i, tok, m in table))
    trained = [i for i, _, m in table if m == 1]
    spans = [range(t.start, t.end) for t in trajectory.turns]
    assert trained == [i for span in spans for i in span]
    assert [list(trajectory.token_ids[t.start : t.end]) for t in trajectory.turns] == sampled
    assert all(trajectory.token_ids[t.last_token] == tokenizer.eos_token_id for t in trajectory.turns)
    assert trajectory.token_ids[trajectory.turns[0].start - 3 : trajectory.turns[0].start] == tuple(
        tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    )
    # After the prompt (whose tool instructions show the markers), tool-call markers are sampled tokens and
    # tool-response markers are env tokens.
    after_prompt = list(zip(trajectory.token_ids, trajectory.loss_mask, strict=True))[trajectory.prompt_length :]
    for marker, mask in (("<tool_call>", 1), ("</tool_call>", 1), ("<tool_response>", 0), ("</tool_response>", 0)):
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert {m for t, m in after_prompt if t == marker_id} == {mask}
    assert [t.reward for t in trajectory.turns] == pytest.approx([0.0, 0.1, 0.2])
    assert trajectory.logprobs[trajectory.turns[1].start] == -0.5 and trajectory.logprobs[0] == 0.0
    # The ledger is the sequence the chat template gives for the whole conversation.
    history = [*OPENING, {"role": "assistant", "content": CALL_1}, *TOOL_RESULTS[0],
               {"role": "assistant", "content": CALL_2}, *TOOL_RESULTS[1], {"role": "assistant", "content": ANSWER}]
    whole = renderer.encode(renderer.render(history, add_generation_prompt=False))
    assert list(trajectory.token_ids) == whole[: len(trajectory.token_ids)]


def test_a_turn_cut_before_its_stop_token_gets_the_closing_token_as_glue(tokenizer):
    trajectory, _, _ = play(tokenizer, [CALL_1, ANSWER], eos=False)
    first = trajectory.turns[0]
    assert tokenizer.eos_token_id not in trajectory.token_ids[first.start : first.end]
    assert trajectory.token_ids[first.end] == tokenizer.eos_token_id
    assert trajectory.loss_mask[first.end] == 0


def test_jsonl_round_trip_is_exact(tokenizer, tmp_path):
    trajectory, _, _ = play(tokenizer, [CALL_1, CALL_2, ANSWER])
    path = tmp_path / "t.jsonl"
    assert write_jsonl(path, [trajectory, trajectory]) == 2
    back = list(read_jsonl(path))
    assert back == [trajectory, trajectory]
    assert back[0].policy_version == 3 and back[0].stop_reason is StopReason.TERMINATED
    assert back[0].messages[-1] == {"role": "tool", "content": "4\n", "tool_call_id": "call_0", "name": "run_python"}
    assert json.loads(path.read_text().splitlines()[0])["stop_reason"] == "terminated"


def test_bad_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"token_ids": [1]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        list(read_jsonl(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_mask": (0, 1, 0)}, "loss_mask"),
        ({"turns": (TurnSpan(1, 4),)}, "outside"),
        ({"logprobs": (0.0, float("nan"), 0.0)}, "logprobs"),
        ({"logprobs": (-1.0, -1.0, 0.0)}, "logprobs"),
        ({"token_ids": (1, 2)}, "length"),
        ({"turns": (TurnSpan(1, 2), TurnSpan(1, 2)), "loss_mask": (0, 1, 0)}, "order"),
    ],
)
def test_inconsistent_ledgers_are_refused(kwargs, message):
    good = {"token_ids": (1, 2, 3), "logprobs": (0.0, -1.0, 0.0), "loss_mask": (0, 1, 0), "turns": (TurnSpan(1, 2),)}
    Trajectory(**good)
    with pytest.raises(ValueError, match=message):
        Trajectory(**{**good, **kwargs, **({"loss_mask": (0, 1, 1)} if message == "loss_mask" else {})})


DROPS_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_conformance_passes_for_the_tiny_template_and_fails_with_a_diff_otherwise(tokenizer):
    check_template(tokenizer)
    with pytest.raises(TemplateError, match="prefix-stable") as info:
        check_template(tokenizer, template=DROPS_REASONING)
    assert "<think>" in str(info.value) and "template='chatml'" in str(info.value)
    check_template(tokenizer, template="chatml")


def test_text_with_lone_surrogates_becomes_valid_unicode_and_round_trips(tmp_path):
    """Lone surrogates (from a user env's observation or an exception's text) become U+FFFD when the ledger is
    built: the JSONL is valid UTF-8 and reads back to the same trajectory."""
    odd = "a\ud800b\udfff\U0010ffff\x00ü"
    clean = "a\ufffdb\ufffd\U0010ffff\x00ü"
    trajectory = Trajectory(
        token_ids=(1, 2, 3),
        logprobs=(0.0, -0.5, 0.0),
        loss_mask=(0, 1, 0),
        turns=(TurnSpan(1, 2, 1.0, {odd: 1.0}),),
        messages=({"role": "tool", "content": odd},),
        stop_reason=StopReason.ERROR,
        error=f"ValueError: {odd}",
        meta={odd: [odd]},
    )
    assert trajectory.messages == ({"role": "tool", "content": clean},)
    assert trajectory.error == f"ValueError: {clean}" and trajectory.meta == {clean: [clean]}
    assert dict(trajectory.turns[0].reward_components) == {clean: 1.0}
    path = tmp_path / "t.jsonl"
    assert write_jsonl(path, [trajectory]) == 1
    assert "ü" in path.read_bytes().decode("utf-8")  # strict UTF-8, non-ASCII text left readable
    assert list(read_jsonl(path)) == [trajectory]
    trajectory.messages[0]["content"] = odd  # changed after construction: still written, as an escape
    assert "\\ud800" in trajectory.to_json() and Trajectory.from_json(trajectory.to_json()).messages[0]["content"] == clean
