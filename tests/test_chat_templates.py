"""Real families' chat templates against the ledger: which can append turns, and the two ways out for those
that rewrite history (Qwen3 drops earlier reasoning): ``keep_reasoning`` and turn-split ledgers, through the
runner and into the learner's logprobs and advantages."""

from __future__ import annotations

import numpy as np
import pytest
from _family_tokenizers import FAMILIES, family_tokenizer

from agentrl.data.batch import collate, collate_shared, logprob_mismatch
from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.errors import ConfigError, TemplateError
from agentrl.models.chat import ChatRenderer, check_template
from agentrl.rollout.runner import Runner, rollout
from agentrl.testing import EchoEnv, ScriptedPolicy
from agentrl.types import StopReason

pytestmark = pytest.mark.usefixtures("one_thread")

# Which families' native templates can carry one appended ledger, per history mode (measured on the probe).
APPENDS = {
    "qwen2.5": {"append", "keep_reasoning"},
    "qwen3": {"keep_reasoning"},  # drops reasoning before the last user turn; honours reasoning_content=""
    "qwen3-coder": {"append", "keep_reasoning"},
    "llama3.1": set(),  # trims each message's text
    "mistral": set(),  # puts the system prompt and the tools before the last user turn only
    "gpt-oss": set(),  # wraps text in channels, drops analysis once a final answer follows
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: family_tokenizer(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probe_accepts_exactly_the_templates_that_can_append_and_turn_split_takes_all(tokenizers, family):
    tokenizer = tokenizers[family]
    for history in ("append", "keep_reasoning"):
        if history in APPENDS[family]:
            check_template(tokenizer, history=history)
        else:
            with pytest.raises(TemplateError) as info:
                check_template(tokenizer, history=history)
            if "prefix-stable" in str(info.value):
                assert "history='turn_split'" in str(info.value) and "history='keep_reasoning'" in str(info.value)
    check_template(tokenizer, history="turn_split")


def test_an_unknown_history_mode_is_refused_with_the_choices(tokenizers):
    with pytest.raises(ConfigError, match="history must be one of append, keep_reasoning, turn_split"):
        ChatRenderer(tokenizers["qwen3"], history="split")


def think_and_echo(prompt: str) -> str:
    word = prompt.rsplit("Say: ", 1)[1].split("<", 1)[0].split("\n", 1)[0]
    return f"<think>\nThe word is {word}; I repeat it.\n</think>\n\n{word}"


def harmony_echo(prompt: str) -> str:
    word = prompt.rsplit("Say: ", 1)[1].split("<", 1)[0]
    return f"<|channel|>analysis<|message|>Repeat {word}.<|end|><|start|>assistant<|channel|>final<|message|>{word}"


def native_prompt(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def sequences(trajectory: Trajectory) -> list[tuple[int, int]]:
    starts = list(trajectory.sequence_starts)
    return list(zip(starts, [*starts[1:], len(trajectory.token_ids)], strict=True))


def test_qwen3_refuses_to_append_and_turn_split_renders_each_prompt_as_the_model_saw_it(tokenizers):
    tokenizer = tokenizers["qwen3"]
    policy = ScriptedPolicy(tokenizer, think_and_echo, logprob=-0.25)
    with pytest.raises(TemplateError, match="turn_split"):
        Runner(lambda: EchoEnv(rounds=3), policy, tokenizer)
    (group,) = rollout(lambda: EchoEnv(rounds=3), policy, tokenizer, 1, history="turn_split")
    (trajectory,) = group
    assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.error is None
    assert len(trajectory.turns) == len(trajectory.sequence_starts) == 3
    assistant = [i for i, m in enumerate(trajectory.messages) if m["role"] == "assistant"]
    for (start, end), turn, k in zip(sequences(trajectory), trajectory.turns, assistant, strict=True):
        assert start < turn.start < turn.end == end  # each sequence: its prompt, then its turn
        # The prompt is the native template's rendering of the conversation so far, token for token.
        assert list(trajectory.token_ids[start : turn.start]) == native_prompt(tokenizer, trajectory.messages[:k])
        assert set(trajectory.logprobs[turn.start : turn.end]) == {-0.25}
        assert set(trajectory.loss_mask[start : turn.start]) == {0} and set(trajectory.loss_mask[turn.start : end]) == {1}
    last_prompt = tokenizer.decode(trajectory.token_ids[trajectory.sequence_starts[2] : trajectory.turns[2].start])
    first_word = trajectory.messages[assistant[0]]["content"].rsplit("\n", 1)[1]
    assert f"\n{first_word}<|im_end|>" in last_prompt and "The word is" not in last_prompt  # reasoning dropped
    assert Trajectory.from_json(trajectory.to_json()) == trajectory



def test_a_turn_split_prompt_that_does_not_fit_ends_the_episode_before_it_joins_the_ledger(tokenizers):
    from agentrl.rollout.runner import RolloutLimits

    tokenizer = tokenizers["qwen3"]
    policy = ScriptedPolicy(tokenizer, lambda prompt: think_and_echo(prompt).rsplit("\n", 1)[1])
    (group,) = rollout(lambda: EchoEnv(rounds=3), policy, tokenizer, 1, history="turn_split")
    full = group.trajectories[0]
    second_prompt = full.turns[1].start - full.sequence_starts[1]
    assert full.turns[0].end < second_prompt  # the first turn fits where the second prompt does not
    first_turn = full.turns[0].end - full.turns[0].start
    for limits, reason in ((RolloutLimits(max_context=second_prompt), StopReason.CONTEXT_OVERFLOW),
                           (RolloutLimits(max_sampled_tokens=first_turn), StopReason.MAX_TOKENS)):  # fmt: skip
        (group,) = rollout(lambda: EchoEnv(rounds=3), policy, tokenizer, 1, history="turn_split", limits=limits)
        (cut,) = group
        assert cut.stop_reason is reason
        assert len(cut.turns) == 1 and cut.sequence_starts == () and len(cut.token_ids) == full.turns[0].end

def test_keep_reasoning_gives_qwen3_one_ledger_with_every_turns_reasoning(tokenizers):
    tokenizer = tokenizers["qwen3"]
    policy = ScriptedPolicy(tokenizer, think_and_echo)
    (group,) = rollout(lambda: EchoEnv(rounds=3), policy, tokenizer, 1, history="keep_reasoning")
    (trajectory,) = group
    assert trajectory.sequence_starts == () and len(trajectory.turns) == 3 and trajectory.error is None
    text = tokenizer.decode(trajectory.token_ids)
    assert text.count("The word is") == 3
    # The one ledger is the native template's rendering of the conversation with reasoning kept, up to the
    # last turn's prompt (a conversation ending on an assistant turn is never rendered).
    renderer = ChatRenderer(tokenizer, history="keep_reasoning")
    before_last = list(trajectory.messages[:-1])
    assert before_last[2] == {"role": "assistant", "content": before_last[2]["content"], "reasoning_content": ""}
    prompt = renderer.encode(renderer.render(before_last, add_generation_prompt=True))
    assert list(trajectory.token_ids[: trajectory.turns[-1].start]) == prompt


def test_gpt_oss_turn_split_prompts_render_earlier_turns_as_structured_harmony_messages(tokenizers):
    tokenizer = tokenizers["gpt-oss"]
    policy = ScriptedPolicy(tokenizer, harmony_echo)
    (group,) = rollout(lambda: EchoEnv(rounds=2), policy, tokenizer, 1, history="turn_split")
    (trajectory,) = group
    assert trajectory.error is None and len(trajectory.sequence_starts) == 2
    reply = trajectory.messages[2]
    assert reply["role"] == "assistant" and reply["content"] == trajectory.messages[1]["content"][len("Say: "):]
    start, turn = trajectory.sequence_starts[1], trajectory.turns[1]
    assert list(trajectory.token_ids[start : turn.start]) == native_prompt(tokenizer, trajectory.messages[:4])
    assert "<|channel|>final<|message|>" in tokenizer.decode(trajectory.token_ids[start : turn.start])


# ---------------------------------------------------------------------------------------------- learners


def split_ledger(model, rng: np.random.Generator, prompts: list[int], turns: list[int]) -> Trajectory:
    """A turn-split trajectory of random tokens whose sampler logprobs are ``model``'s, each turn scored on its own
    sequence alone (what a sampler that saw only that prompt reports)."""
    import torch

    ledger = LedgerBuilder(rng.integers(10, 900, prompts[0]).tolist())
    for k, n in enumerate(turns):
        if k:
            ledger.start_sequence(rng.integers(10, 900, prompts[k]).tolist())
        prompt = ledger.ids[ledger.prompt_start :]
        sampled = rng.integers(10, 900, n).tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1 : -1]
        logprobs = logits.log_softmax(-1)[torch.arange(n), torch.tensor(sampled)].tolist()
        ledger.add_sampled(sampled, logprobs)
        ledger.set_reward(float(k))
    return ledger.finish(StopReason.TERMINATED)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from agentrl.models.tiny import tiny_model_path

    return AutoModelForCausalLM.from_pretrained(tiny_model_path()).eval()


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_the_learner_scores_each_turn_on_its_own_sequence_so_the_ratio_starts_at_one(tiny, layout):
    import torch

    from agentrl.learners.logprobs import policy_logprobs

    rng = np.random.default_rng(0)
    split = [split_ledger(tiny, rng, [6, 9, 4], [3, 5, 2]), split_ledger(tiny, rng, [6, 3], [4, 6])]
    plain = split_ledger(tiny, rng, [7], [5])
    trajectories = [split[0], plain, split[1]]
    if layout == "shared":  # a twin opens with the same prompt, so the two share it
        first = split[0].token_ids[: split[0].prompt_length]
        twin = split_ledger(tiny, np.random.default_rng(0), [6, 5], [3, 2])
        assert list(twin.token_ids[: twin.prompt_length]) == list(first)
        trajectories.append(twin)
        batch = collate_shared(trajectories)
    else:
        batch = collate(trajectories, packing=layout == "packed")
    batch = batch.to_torch()
    with torch.no_grad():
        learner_B_T = policy_logprobs(tiny, batch)[0]
    stats = logprob_mismatch(batch.sampler_logprobs_B_T, learner_B_T, batch.loss_mask_B_T)
    assert stats.tokens == sum(t.num_sampled for t in trajectories)
    assert stats.max_abs < 1e-4  # attending across turns, or wrong positions, would move these by far more
    # Without the restarts the same tokens read as one sequence score differently: the check has teeth.
    joined = [Trajectory(t.token_ids, t.logprobs, t.loss_mask, t.turns) for t in trajectories]
    with torch.no_grad():
        wrong_B_T = policy_logprobs(tiny, collate(joined).to_torch())[0]
    assert logprob_mismatch(collate(joined).sampler_logprobs_B_T, wrong_B_T, collate(joined).loss_mask_B_T).max_abs > 0.05


def test_per_trajectory_values_land_on_turn_split_tokens_and_come_back(tiny):
    from agentrl.learners import batching
    from agentrl.learners.grpo import GRPOConfig

    rng = np.random.default_rng(1)
    trajectories = [split_ledger(tiny, rng, [4, 6], [3, 2]), split_ledger(tiny, rng, [5], [4])]
    for packing in (False, True):
        config = GRPOConfig(env="toy-echo-v0", packing=packing)
        batch = batching.to_batch(trajectories, 0, config)
        values = [np.arange(len(t.token_ids), dtype=np.float64) + 100 * i for i, t in enumerate(trajectories)]
        placed = batching.place(batch, values)
        back = batching.per_trajectory(lambda b, p=placed: p, trajectories, 0, config)
        for original, returned in zip(values, back, strict=True):
            np.testing.assert_allclose(returned, original)


def test_advantages_carry_over_to_every_turn_of_a_split_episode(tiny):
    from agentrl.learners.grpo import GRPOConfig, sample_advantages

    rng = np.random.default_rng(2)
    group = TrajectoryGroup("g", (split_ledger(tiny, rng, [4, 5], [3, 2]), split_ledger(tiny, rng, [4, 3, 3], [2, 2, 2])))
    for advantage in ("grpo", "turn"):
        adv = sample_advantages([group], GRPOConfig(env="toy-echo-v0", advantage=advantage))
        for t, a in zip(group, adv, strict=True):
            assert np.all(a[np.asarray(t.loss_mask) == 0] == 0)
            per_turn = [set(np.round(a[s.start : s.end], 9)) for s in t.turns]
            assert all(len(values) == 1 for values in per_turn)  # one advantage per turn, on all its tokens
            if advantage == "grpo":
                assert len({v for values in per_turn for v in values}) == 1  # the episode's, on every turn
    assert sample_advantages([group], GRPOConfig(env="toy-echo-v0"))[0].any()


def test_a_turn_split_ledger_must_keep_each_turn_inside_one_sequence_after_its_prompt():
    from agentrl.data.trajectory import TurnSpan

    with pytest.raises(ValueError, match="must start at 0"):
        Trajectory((1, 2, 3, 4), (0.0, -1.0, 0.0, -1.0), (0, 1, 0, 1), (TurnSpan(1, 2), TurnSpan(3, 4)),
                   sequence_starts=(1,))  # fmt: skip

    with pytest.raises(ValueError, match="not inside one sequence"):
        Trajectory((1, 2, 3, 4), (0.0, -1.0, -1.0, 0.0), (0, 1, 1, 0), (TurnSpan(1, 3),), sequence_starts=(0, 2))
    with pytest.raises(ValueError, match="not inside one sequence"):
        Trajectory((1, 2, 3, 4), (0.0, -1.0, -1.0, -1.0), (0, 1, 1, 1), (TurnSpan(1, 2), TurnSpan(2, 4)),
                   sequence_starts=(0, 2))  # fmt: skip


# ---------------------------------------------------------------------------------------------- agentrl check

RECOMMENDED = {"qwen2.5": "append", "qwen3": "keep_reasoning", "qwen3-coder": "append", "llama3.1": "turn_split",
               "mistral": "turn_split", "gpt-oss": "turn_split"}  # fmt: skip
FORMAT_OF = {"qwen2.5": "hermes", "qwen3": "hermes", "qwen3-coder": "qwen3_coder", "llama3.1": "llama3_json",
             "mistral": "mistral", "gpt-oss": "harmony"}  # fmt: skip


def test_describe_model_names_each_familys_format_and_the_history_it_needs(tokenizers):
    from agentrl.checker import describe_model

    reports = {family: describe_model(tok) for family, tok in tokenizers.items()}
    assert {f: r.tool_format for f, r in reports.items()} == FORMAT_OF
    assert {f: r.recommended for f, r in reports.items()} == RECOMMENDED
    assert {f: {m for m, p in r.history.items() if p is None} - {"turn_split"} for f, r in reports.items()} == APPENDS
    assert "rewrites earlier turns (first difference at character" in reports["qwen3"].history["append"]


def test_agentrl_check_model_prints_the_detected_format_and_template(tmp_path):
    import subprocess
    import sys

    from _family_tokenizers import family_tokenizer_dir

    model = family_tokenizer_dir("qwen3", tmp_path / "qwen3")
    out = subprocess.run([sys.executable, "-m", "agentrl.cli", "check", "--model", str(model)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tool-call format: hermes (from its chat template)" in out.stdout
    assert "history append: refused: the template rewrites earlier turns" in out.stdout
    assert "history turn_split: ok" in out.stdout and "use: history=keep_reasoning" in out.stdout
    nothing = subprocess.run([sys.executable, "-m", "agentrl.cli", "check"], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "--model" in nothing.stderr


def test_hf_sampling_turn_split_matches_the_learners_logprobs_and_grpo_trains_on_it(tmp_path):
    """End to end on the tiny model: the HF backend samples each turn from its own prompt; the learner,
    reading the turn-split ledgers, gives the same logprobs; a GRPO run with ``history="turn_split"`` trains."""
    import torch

    from agentrl.learners.grpo import GRPOConfig, train_grpo
    from agentrl.learners.logprobs import policy_logprobs
    from agentrl.models.loading import load_model, load_tokenizer
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams

    model, tokenizer = load_model("tiny").eval(), load_tokenizer("tiny")
    groups = rollout("toy-guess-v0", HFPolicy(model, tokenizer, seed=0), tokenizer, 2, group_size=3,
                     sampling=SamplingParams(max_tokens=10), env_kwargs={"max_turns": 3}, seed=1,
                     history="turn_split")  # fmt: skip
    trajectories = [t for g in groups for t in g]
    assert all(len(t.sequence_starts) == len(t.turns) == 3 for t in trajectories)
    for batch in (collate(trajectories), collate(trajectories, packing=True), collate_shared(trajectories)):
        batch = batch.to_torch()
        with torch.no_grad():
            learner_B_T = policy_logprobs(model, batch)[0]
        assert logprob_mismatch(batch.sampler_logprobs_B_T, learner_B_T, batch.loss_mask_B_T).max_abs < 1e-3
    config = GRPOConfig(env="toy-guess-v0", env_kwargs={"max_turns": 2}, prompts_per_step=2, group_size=4,
                        max_new_tokens=10, max_steps=2, warmup_steps=0, history="turn_split",
                        output_dir=tmp_path)  # fmt: skip
    logs = train_grpo(config).history
    assert len(logs) == 2 and all(log.trained_samples > 0 for log in logs)
    assert all(np.isfinite(log.update["loss"]) for log in logs)
