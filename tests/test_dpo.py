"""Offline preference learner: every loss learns held-out pairs, tool tokens get no gradient, data, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from agentrl.data.batch import SHARED_SEGMENT, collate_shared
from agentrl.data.buffer import PreferencePair
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints
from agentrl.learners.dpo import (
    DPOConfig,
    LabelledConversation,
    PreferenceConversation,
    SequenceLogps,
    _batch_loss,
    _dataset,
    _reference_logps,
    _sequence_logps,
    evaluate_preferences,
    read_preference_jsonl,
    train_dpo,
)
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.models.loading import load_model, load_tokenizer


def sum_pairs(n: int, seed: int) -> list[PreferenceConversation]:
    """``a+b`` questions: the chosen answer is ``<answer>a+b</answer>``, the rejected one letter noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        junk = "".join(rng.choice("qzxvkj ") for _ in range(rng.randint(6, 14)))
        out.append(
            PreferenceConversation(
                [{"role": "user", "content": f"What is {a}+{b}?"}],
                [{"role": "assistant", "content": f"<answer>{a + b}</answer>"}],
                [{"role": "assistant", "content": junk}],
            )
        )
    return out


def tool_pair(result: str) -> PreferenceConversation:
    """Two-turn conversations that call a tool, get ``result`` back, then answer (right or wrong)."""
    call = {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "calc", "arguments": {"e": "2+3"}}\n</tool_call>',
    }
    tool = {"role": "tool", "content": result}
    return PreferenceConversation(
        [{"role": "user", "content": "What is 2+3?"}],
        [call, tool, {"role": "assistant", "content": "<answer>5</answer>"}],
        [call, tool, {"role": "assistant", "content": "<answer>7</answer>"}],
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def start_model():
    return load_model("tiny").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def train_pairs():
    return sum_pairs(60, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return sum_pairs(20, seed=1)


# ---- learning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "ipo", "robust", "hinge", "kto", "orpo", "simpo"])
def test_each_loss_learns_to_prefer_the_answer_on_held_out_pairs(loss, train_pairs, held_out, start_model):
    smoothing = {"robust": 0.1, "simpo": 0.05}.get(loss, 0.0)
    config = DPOConfig(loss=loss, max_steps=6, warmup_steps=0, lr=2e-3, label_smoothing=smoothing, seed=3)
    result = train_dpo(config, train_pairs)
    before = evaluate_preferences(config, start_model, result.tokenizer, held_out, start_model)
    after = evaluate_preferences(config, result.model, result.tokenizer, held_out, start_model)
    print(f"{loss}: held-out accuracy {before.accuracy:.2f} -> {after.accuracy:.2f}, "
          f"margin {before.margin:.3f} -> {after.margin:.3f}")  # fmt: skip
    assert after.accuracy >= 0.9
    assert after.margin > before.margin + 0.05
    if loss not in ("orpo", "simpo"):  # the policy starts as the reference: every margin is exactly 0
        assert (before.accuracy, before.margin) == (0.0, 0.0)
    assert result.extras["num_examples"] == (120 if loss == "kto" else 60)
    assert [log.step for log in result.history] == list(range(1, 7))
    assert result.history[-1].loss < result.history[0].loss
    assert all(0.0 <= log.accuracy <= 1.0 for log in result.history)


# ---- multi-turn: only policy tokens count ---------------------------------------------------------
@pytest.mark.parametrize("result_text", ["5", "The calculator says: 5 (two plus three is five) " * 3])
def test_tool_results_change_neither_the_counted_tokens_nor_receive_gradient(tokenizer, result_text):
    config = DPOConfig(loss="dpo", beta=0.5, max_steps=1, warmup_steps=0)
    dataset = _dataset(config, tokenizer, [tool_pair(result_text)])
    rows = [dataset.chosen[0], dataset.rejected[0]]
    # Counted: both assistant turns of each completion (call, then answer), never the tool's answer.
    counted = [tokenizer.decode([i for i, m in zip(r.token_ids, r.loss_mask, strict=True) if m]) for r in rows]
    call = tool_pair(result_text).chosen[0]["content"] + "<|im_end|>"
    assert counted == [call + "<answer>5</answer><|im_end|>", call + "<answer>7</answer><|im_end|>"]
    assert result_text.strip() in tokenizer.decode(rows[0].token_ids)

    model = load_model("tiny")
    reference = load_model("tiny").eval()
    with torch.no_grad():  # make the reference differ from the policy, so the loss is not log 2
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cached = _reference_logps(reference, model, rows, tokenizer.pad_token_id, config)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: out.retain_grad() or captured.append(out))
    loss, _ = _batch_loss(config, model, None, dataset, [0], cached, tokenizer.pad_token_id)
    hook.remove()
    loss.backward()
    (logits_N_V,) = captured
    # The head runs at the positions that predict a mask-1 token and nowhere else (a tool result's logits
    # are never computed, so nothing reaches them), in the pair's prompt-shared row; each gets gradient.
    batch = collate_shared(rows, pad_id=tokenizer.pad_token_id).to_torch()
    assert bool((batch.segment_ids_B_T == SHARED_SEGMENT).any())
    predicts_B_T = batch.loss_mask_B_T[:, 1:] != 0  # position t predicts token t + 1
    assert logits_N_V.shape[0] == int(predicts_B_T.sum()) == sum(sum(r.loss_mask) for r in rows)
    assert (logits_N_V.grad.abs().sum(-1) > 0).all()

    # The loss by hand: full log-softmax, summed over each conversation's mask-1 tokens, -log sigmoid(beta * h).
    logp = torch.log_softmax(logits_N_V.detach(), -1)
    picked_N = logp.gather(-1, batch.token_ids_B_T[:, 1:][predicts_B_T][:, None]).squeeze(-1)
    segment_N = batch.segment_ids_B_T[:, 1:][predicts_B_T]
    policy_c, policy_r = picked_N[segment_N == 0].sum(), picked_N[segment_N == 1].sum()
    h = (policy_c - policy_r) - (cached.sum_N[0] - cached.sum_N[1])
    assert loss.item() == pytest.approx(-F.logsigmoid(0.5 * h).item(), rel=1e-5)
    assert abs(h.item()) > 1e-3


# ---- data -----------------------------------------------------------------------------------------
def test_preference_pairs_from_a_buffer_give_the_same_rows_as_their_conversations(tokenizer):
    pair = tool_pair("5")
    renderer = ChatRenderer(tokenizer)
    chosen = demonstration_ledger(renderer, [*pair.prompt, *pair.chosen])
    rejected = demonstration_ledger(renderer, [*pair.prompt, *pair.rejected])
    mined = PreferencePair(chosen, rejected, split_turn=1, prefix_length=chosen.turns[1].start)
    # The same pair as messages, split at the divergent turn: the shared call and its result are prompt.
    split = PreferenceConversation([*pair.prompt, *pair.chosen[:2]], pair.chosen[2:], pair.rejected[2:])
    config = DPOConfig()
    from_messages, from_buffer = _dataset(config, tokenizer, [split]), _dataset(config, tokenizer, [mined])
    assert sum(from_buffer.chosen[0].loss_mask) == len(tokenizer.encode("<answer>5</answer><|im_end|>"))
    assert (from_buffer.chosen, from_buffer.rejected) == (from_messages.chosen, from_messages.rejected)
    # KTO splits each pair into a desirable and an undesirable example, mismatched rows beside them.
    kto = _dataset(DPOConfig(loss="kto"), tokenizer, [mined, pair])
    assert kto.desirable == [True, False, True, False]
    assert kto.mismatched[1].token_ids[-3:] == kto.chosen[0].token_ids[-3:]


def test_read_preference_jsonl_reads_pairs_and_labelled_conversations(tmp_path):
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    lines = [
        {
            "prompt": [user],
            "chosen": [answer],
            "rejected": [{"role": "assistant", "content": "go"}],
            "tools": [],
        },
        {"messages": [user, answer], "label": True},
        {"prompt": [user], "completion": [answer], "label": False},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    pair, good, bad = read_preference_jsonl(path)
    assert pair == PreferenceConversation((user,), (answer,), ({"role": "assistant", "content": "go"},))
    assert good == LabelledConversation((), (user, answer), True)
    assert bad == LabelledConversation((user,), (answer,), False)
    with pytest.raises(ConfigError, match=r"needs chosen/rejected pairs.*use loss='kto'"):
        train_dpo(DPOConfig(max_steps=1, warmup_steps=0), [good])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"prefs.jsonl:2: not JSON"),
        ('{"prompt": [], "chosen": "hi", "rejected": []}', r"prefs.jsonl:2: 'chosen' must be a list"),
        ('{"messages": [], "label": "yes"}', r"prefs.jsonl:2: 'label' must be true or false"),
        ('{"msgs": []}', r"prefs.jsonl:2: expected one of"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"messages": [], "label": true}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_preference_jsonl(path)


def test_nothing_within_max_seq_len_is_a_config_error(train_pairs):
    with pytest.raises(ConfigError, match="raise max_seq_len"):
        train_dpo(DPOConfig(max_steps=1, warmup_steps=0, max_seq_len=4), train_pairs[:2])


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss": "cpo"}, r"DPOConfig.loss: got 'cpo'; Input should be 'dpo', 'ipo'"),
        ({"beta": 0.0}, r"DPOConfig.beta: got 0.0; Input should be greater than 0 \(beta: KL strength"),
        ({"label_smoothing": 0.5}, r"DPOConfig.label_smoothing: got 0.5;.*label-noise rate"),
        ({"loss": "ipo", "label_smoothing": 0.1}, r"label_smoothing applies to loss in .*not 'ipo'"),
        ({"batch_size": 0}, r"DPOConfig.batch_size: got 0;"),
        ({"kto_desirable_weight": -1}, r"DPOConfig.kto_desirable_weight: got -1;"),
        ({"max_steps": 5, "warmup_steps": 5}, r"warmup_steps \(5\) must be fewer than max_steps \(5\)"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**fields)


def test_beta_defaults_follow_the_loss():
    assert DPOConfig().loss_beta == 0.1
    assert DPOConfig(loss="simpo").loss_beta == 2.0
    assert DPOConfig(loss="simpo", beta=1.5).loss_beta == 1.5


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_resume_from_a_checkpoint_continues_exactly(tmp_path, train_pairs, loss):
    common = {"loss": loss, "max_steps": 4, "batch_size": 4, "warmup_steps": 1, "lr": 2e-3}
    pairs = train_pairs[:10]
    straight = train_dpo(DPOConfig(**common), pairs)
    train_dpo(DPOConfig(**common, output_dir=tmp_path, save_every=2), pairs)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000004"]
    torch.manual_seed(12345)  # a different global RNG state: the checkpoint's must be restored
    resumed = train_dpo(DPOConfig(**common, resume_from=tmp_path / "step-000002"), pairs)
    assert [log.step for log in resumed.history] == [3, 4]
    assert [log.loss for log in resumed.history] == [log.loss for log in straight.history[2:]]
    assert [log.lr for log in resumed.history] == [log.lr for log in straight.history[2:]]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_per_batch_reference_gives_the_precomputed_runs_losses(train_pairs):
    common = {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "lr": 2e-3}
    cached = train_dpo(DPOConfig(**common), train_pairs[:8])
    live = train_dpo(DPOConfig(**common, precompute_reference=False), train_pairs[:8])
    assert [log.loss for log in live.history] == pytest.approx([log.loss for log in cached.history], abs=1e-5)


@pytest.mark.parametrize("multi_turn", [False, True])
def test_pairs_sharing_their_prompt_in_one_row_give_each_conversations_own_logprobs(tokenizer, train_pairs, multi_turn):
    # The training path runs each pair's prompt once (one row, 4-D mask); it must equal one row per conversation.
    model = load_model("tiny")
    config = DPOConfig()
    examples = [tool_pair("5"), tool_pair("a longer tool answer")] if multi_turn else train_pairs[:6]
    dataset = _dataset(config, tokenizer, examples)
    rows = [*dataset.chosen, *dataset.rejected]
    assert bool((collate_shared(rows).segment_ids_B_T == SHARED_SEGMENT).any())
    shared = _sequence_logps(model, rows, 0, config)
    alone = [_sequence_logps(model, [row], 0, config) for row in rows]
    plain = SequenceLogps(torch.cat([a.sum_N for a in alone]), torch.cat([a.mean_N for a in alone]))
    torch.testing.assert_close(shared.sum_N, plain.sum_N, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared.mean_N, plain.mean_N, atol=1e-5, rtol=1e-5)
