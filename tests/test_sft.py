"""SFT tool-format learner: exact masks, no gradient into tool results, learning, checkpoints, resume, config."""

from __future__ import annotations

import json
import time

import pytest
import torch

import agentrl
from agentrl.algos import sft_nll_loss
from agentrl.data.batch import collate
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints, optim
from agentrl.learners.logprobs import policy_logprobs
from agentrl.learners.sft import (
    Demonstration,
    SFTConfig,
    _rows,
    digit_token_ids,
    env_demonstrations,
    ledger_from_mask,
    read_messages_jsonl,
    train_sft,
)
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.models.loading import load_model, load_tokenizer

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def demos():
    """Math demonstrations with calculator calls: 1-2 tool turns, then the worked answer."""
    env = agentrl.make("math-v0", tools=["calculator"])
    try:
        return env_demonstrations(env, range(5, 13))
    finally:
        env.close()


def mask_runs(tokenizer, trajectory):
    out, start, mask = [], 0, trajectory.loss_mask
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((tokenizer.decode(trajectory.token_ids[start:i]), mask[start]))
            start = i
    return out


# ---- the ledger -----------------------------------------------------------------------------------
def test_mask_is_exact_on_a_multi_turn_demonstration_with_tool_calls(tokenizer, demos):
    demo = next(d for d in demos if sum(m["role"] == "tool" for m in d.messages) >= 2)
    renderer = ChatRenderer(tokenizer, demo.tools)
    ledger = demonstration_ledger(renderer, demo.messages)
    assistant = [m["content"] for m in demo.messages if m["role"] == "assistant"]
    tool_results = [m["content"] for m in demo.messages if m["role"] == "tool"]
    runs = mask_runs(tokenizer, ledger)
    assert [m for _, m in runs] == [0] + [1, 0] * (len(assistant) - 1) + [1]
    # Mask 1 is exactly each assistant turn's text plus its end-of-turn token, tool-call markup included.
    assert [text for text, m in runs if m] == [a + IM_END for a in assistant]
    assert assistant[0].startswith("<tool_call>")
    # Mask 0 between turns: closing glue, the tool's answer, the next generation prompt.
    for (text, _), result in zip(runs[2::2], tool_results, strict=True):
        assert (
            text
            == f"\n<|im_start|>user\n<tool_response>\n{result}\n</tool_response>{IM_END}\n<|im_start|>assistant\n"
        )
    # The ledger is the tokenization of the whole conversation: the rollout's tokens, not a re-rendering.
    whole = renderer.encode(renderer.render(list(demo.messages), add_generation_prompt=False))
    assert list(ledger.token_ids) == whole[: len(ledger.token_ids)]
    assert whole[len(ledger.token_ids) :] == renderer.encode("\n")


def test_an_assistant_turn_of_weight_0_is_context_not_a_target(tokenizer, demos):
    demo = next(d for d in demos if sum(m["role"] == "tool" for m in d.messages) >= 2)
    first = next(i for i, m in enumerate(demo.messages) if m["role"] == "assistant")
    messages = [dict(m) for m in demo.messages]
    messages[first]["weight"] = 0
    renderer = ChatRenderer(tokenizer, demo.tools)
    plain, weighted = demonstration_ledger(renderer, demo.messages), demonstration_ledger(renderer, messages)
    assert weighted.token_ids == plain.token_ids  # the same conversation, token for token
    trained = [text for text, m in mask_runs(tokenizer, weighted) if m]
    assistant = [m["content"] for m in demo.messages if m["role"] == "assistant"]
    assert trained == [a + IM_END for a in assistant[1:]]  # every assistant turn but the first
    messages[first]["weight"] = 0.5
    with pytest.raises(ConfigError, match=r"weight must be 0 \(context only\) or 1"):
        demonstration_ledger(renderer, messages)


def test_openai_structured_tool_calls_from_jsonl_give_the_same_ledger(tmp_path, tokenizer, demos):
    demo = demos[0]
    structured = []
    for n, m in enumerate(demo.messages):
        if m["role"] == "assistant" and m["content"].startswith("<tool_call>"):
            call = json.loads(m["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
            function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
            m = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"c{n}", "type": "function", "function": function}],
            }
        structured.append(m)
    path = tmp_path / "demos.jsonl"
    path.write_text(
        json.dumps({"messages": structured, "tools": list(demo.tools)}) + "\n\n", encoding="utf-8"
    )
    (loaded,) = read_messages_jsonl(path)
    assert loaded.messages[2]["content"] is None
    renderer = ChatRenderer(tokenizer, loaded.tools)
    assert (
        demonstration_ledger(renderer, loaded.messages).token_ids
        == demonstration_ledger(ChatRenderer(tokenizer, demo.tools), demo.messages).token_ids
    )


def test_bad_demonstrations_and_jsonl_lines_name_the_problem(tmp_path, tokenizer):
    renderer = ChatRenderer(tokenizer)
    with pytest.raises(ConfigError, match="at least one assistant"):
        demonstration_ledger(renderer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="unknown message role 'robot'"):
        demonstration_ledger(renderer, [{"role": "robot", "content": "hi"}])
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{"msgs": 1}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected"):
        read_messages_jsonl(path)


def _batch(tokenizer, demos, max_len: int, pack: bool, share_prefix: bool = False):
    """The demonstrations as train_sft lays out one step of them."""
    ledgers = [demonstration_ledger(ChatRenderer(tokenizer, d.tools), d.messages) for d in demos]
    rows, _ = _rows(ledgers, max_len, pack=pack, seed=0)
    conversations = [t for row in rows for t in row]
    return collate(conversations, pad_id=tokenizer.pad_token_id, packing=pack, row_tokens=max_len,
                   share_prefix=share_prefix).to_torch(), len(rows)  # fmt: skip


def _sft_loss(model, batch):
    logprobs_B_T, _ = policy_logprobs(model, batch)
    return sft_nll_loss(logprobs_B_T, batch.loss_mask_B_T)


def test_tool_result_tokens_never_receive_gradient(tokenizer, demos):
    """The loss's gradient w.r.t. each tool-result (mask 0) token's logprob is exactly zero, and nonzero for
    every assistant token; the LM head runs only at the positions that predict an assistant token."""
    model = load_model("tiny")
    batch, _ = _batch(tokenizer, demos[:3], 2048, pack=False)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    logprobs_B_T, _ = policy_logprobs(model, batch)
    hook.remove()
    logprobs_B_T.retain_grad()
    sft_nll_loss(logprobs_B_T, batch.loss_mask_B_T).backward()
    target_B_T = batch.loss_mask_B_T.bool()
    assert (logprobs_B_T.grad[~target_B_T] == 0).all()
    assert (logprobs_B_T.grad[target_B_T] < 0).all()
    (logits_N_V,) = captured
    assert logits_N_V.shape[0] == int(target_B_T.sum())
    # Spot-check by text: a tool result's tokens are not targets.
    ids = batch.token_ids_B_T[0].tolist()
    start = next(i for i in range(len(ids)) if tokenizer.decode(ids[i : i + 1]) == "<tool_response>")
    assert not target_B_T[0, start : start + 4].any()


def test_packing_gives_the_padded_loss(tokenizer, demos):
    model = load_model("tiny")
    padded, padded_rows = _batch(tokenizer, demos, 1024, pack=False)
    packed, packed_rows = _batch(tokenizer, demos, 1024, pack=True)
    assert packed_rows < padded_rows and packed.shape[0] < padded.shape[0]
    torch.testing.assert_close(_sft_loss(model, packed), _sft_loss(model, padded), atol=1e-5, rtol=0)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_collate_shares_the_prefix_up_to_the_earliest_predicting_position():
    rows = [[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 3], [5, 6, 7, 4, 4, 4]]
    masks = [[0, 0, 0, 0, 0, 1] for _ in rows]
    assert collate([ledger_from_mask(r, m) for r, m in zip(rows, masks, strict=True)], share_prefix=True).shared_prefix == 3
    masks[1] = [0, 0, 0, 1, 0, 1]  # row 1's target at 3 is predicted by position 2: positions 0-1 may be shared
    ledgers = [ledger_from_mask(r, m) for r, m in zip(rows, masks, strict=True)]
    assert collate(ledgers, share_prefix=True).shared_prefix == 2
    assert collate(ledgers[:1], share_prefix=True).shared_prefix == 0  # one row: nothing to share
    assert collate(ledgers, share_prefix=False).shared_prefix == 0
    assert collate(ledgers, packing=True, row_tokens=12, share_prefix=True).shared_prefix == 0


def test_a_packed_row_is_attended_per_segment_whichever_segment_comes_first():
    # First-fit decreasing puts trajectory 1 (3 tokens) before trajectory 0 (2 tokens) in the second row.
    ledgers = [ledger_from_mask(list(range(1, n + 1)), [0] + [1] * (n - 1)) for n in (2, 3, 5)]
    batch = collate(ledgers, packing=True, row_tokens=5).to_torch()
    assert batch.segment_ids_B_T[1].tolist() == [1, 1, 1, 0, 0]
    inputs = batch.model_inputs()
    assert set(inputs) == {"position_ids"} and inputs["position_ids"][1].tolist() == [0, 1, 2, 0, 1]
    assert set(collate(ledgers).to_torch().model_inputs()) == {"attention_mask"}


@pytest.mark.parametrize("pack", [False, True])
def test_policy_logprobs_gives_the_full_logits_loss_and_gradients(tokenizer, demos, pack):
    """The LM head on target positions only, and the shared prefix run once (padded rows), change
    neither the loss nor any parameter's gradient against the plain full-logits NLL."""
    model = load_model("tiny")
    batch, _ = _batch(tokenizer, demos, 1024, pack=pack, share_prefix=True)
    assert batch.shared_prefix == 0 if pack else batch.shared_prefix > 50  # the system prompt with the tool schemas

    def full_logits_nll():
        logits_B_T_V = model(input_ids=batch.token_ids_B_T, use_cache=False, **batch.model_inputs()).logits
        logp_B_T_V = torch.log_softmax(logits_B_T_V[:, :-1].float(), dim=-1)
        picked_B_T = logp_B_T_V.gather(-1, batch.token_ids_B_T[:, 1:, None]).squeeze(-1)
        mask_B_T = batch.loss_mask_B_T[:, 1:].float()
        return -(picked_B_T * mask_B_T).sum() / mask_B_T.sum()

    full = _loss_and_grads(model, full_logits_nll)
    fast = _loss_and_grads(model, lambda: _sft_loss(model, batch))
    assert fast[0] == pytest.approx(full[0], abs=1e-5)
    for name, grad in full[1].items():
        torch.testing.assert_close(fast[1][name], grad, atol=1e-5, rtol=0, msg=name)


def test_shared_prefix_runs_give_the_plain_runs_weights(demos):
    common = {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "max_seq_len": 1024}
    shared = train_sft(SFTConfig(**common), demos)
    plain = train_sft(SFTConfig(**common, share_prefix=False), demos)
    assert [log.loss for log in shared.history] == pytest.approx([log.loss for log in plain.history], abs=1e-5)
    assert all(a.computed_tokens < b.computed_tokens for a, b in zip(shared.history, plain.history, strict=True))
    # Adam divides by the gradient's own scale, so a 1e-7 rounding difference can move a weight whose
    # gradient is near zero by up to ~lr; 1e-4 still tells an exact layout from a wrong one (~lr per weight).
    for (name, a), b in zip(shared.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


# ---- training -------------------------------------------------------------------------------------
def test_short_sft_run_lowers_the_loss_and_the_checkpoint_reproduces_the_model(tmp_path, demos):
    config = SFTConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3, output_dir=tmp_path, seed=1)
    started = time.perf_counter()
    result = train_sft(config, demos)
    elapsed = time.perf_counter() - started
    first, last = result.history[0].loss, result.history[-1].loss
    print(
        f"SFT {len(demos)} demos, {config.max_steps} steps: loss {first:.3f} -> {last:.3f} in {elapsed:.1f}s"
    )
    assert last < 0.5 * first
    assert result.checkpoint == tmp_path / "step-000030"
    assert [log.step for log in result.history] == list(range(1, 31))
    assert result.history[0].lr == pytest.approx(3e-3 / 3)
    reloaded = load_model(result.checkpoint).eval()
    result.model.eval()
    ids = torch.tensor(
        [demonstration_ledger(ChatRenderer(result.tokenizer, demos[0].tools), demos[0].messages).token_ids]
    )
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert load_tokenizer(result.checkpoint).encode("<tool_call>") == result.tokenizer.encode("<tool_call>")


def test_digit_weight_weighs_the_digit_targets_in_the_loss(tokenizer, demos):
    digits = digit_token_ids(tokenizer)
    assert sorted(tokenizer.decode([i]).strip() for i in digits.tolist()) == list("0123456789")
    model = load_model("tiny").eval()
    num = den = digit_targets = 0.0
    for demo in demos:  # the first step's loss, by hand: the initial model on every demonstration
        ledger = demonstration_ledger(ChatRenderer(tokenizer, demo.tools), demo.messages)
        ids = torch.tensor([ledger.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        target = torch.tensor(ledger.loss_mask[1:]) != 0
        weight = torch.where(torch.isin(ids[0, 1:], digits), 5.0, 1.0) * target
        digit_targets += float((weight == 5.0).sum())
        num, den = num + float((nll * weight).sum()), den + float(weight.sum())
    assert digit_targets > 0  # the worked answers have numbers
    config = SFTConfig(max_steps=1, batch_size=len(demos), warmup_steps=0, digit_weight=5.0)
    weighted, plain = train_sft(config, demos), train_sft(config.model_copy(update={"digit_weight": 1.0}), demos)
    assert weighted.history[0].loss == pytest.approx(num / den, rel=1e-4)
    assert plain.history[0].loss != pytest.approx(num / den, rel=1e-3)


def test_grouping_by_length_computes_fewer_tokens_for_the_same_rows(demos):
    config = SFTConfig(max_steps=len(demos) // 2, batch_size=2, warmup_steps=0, share_prefix=False)
    plain, grouped = train_sft(config, demos), train_sft(config.model_copy(update={"group_by_length": True}), demos)
    assert sum(log.tokens for log in grouped.history) == sum(log.tokens for log in plain.history)  # one epoch
    assert sum(log.computed_tokens for log in grouped.history) < sum(log.computed_tokens for log in plain.history)


def test_a_time_budget_ends_the_phase_early_with_a_checkpoint_at_the_low_rate(tmp_path, demos):
    config = SFTConfig(max_steps=4000, batch_size=2, warmup_steps=0, lr=1e-3, max_seconds=6.0, output_dir=tmp_path)
    result = train_sft(config, demos)
    last = result.history[-1]
    assert last.step < config.max_steps
    assert result.checkpoint is not None and result.checkpoint.name == f"step-{last.step:06d}"
    # The schedule followed the time spent (steps alone would have kept the rate near its start).
    assert last.lr < 0.5 * config.lr < config.lr * optim.warmup_cosine(last.step - 1, 0, 4000, 0.1)


def test_resume_from_a_checkpoint_gives_the_straight_runs_weights(tmp_path, demos):
    common = {"max_steps": 6, "batch_size": 3, "warmup_steps": 2, "pack": True, "max_seq_len": 512}
    straight = train_sft(SFTConfig(**common), demos[:6])
    first_half = train_sft(SFTConfig(**common, output_dir=tmp_path, save_every=3), demos[:6])
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step-000003", "step-000006"]
    torch.manual_seed(12345)  # a different global RNG state: the checkpoint's must be restored
    resumed = train_sft(SFTConfig(**common, resume_from=tmp_path / "step-000003"), demos[:6])
    assert [log.step for log in resumed.history] == [4, 5, 6]
    assert [log.loss for log in resumed.history] == [log.loss for log in straight.history[3:]]
    assert [log.lr for log in resumed.history] == [log.lr for log in straight.history[3:]]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(first_half.model.model.embed_tokens.weight, straight.model.model.embed_tokens.weight)


def test_keep_last_prunes_old_checkpoints(tmp_path, demos):
    train_sft(
        SFTConfig(max_steps=3, batch_size=4, warmup_steps=0, output_dir=tmp_path, save_every=1, keep_last=2),
        demos[:4],
    )
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"lr": -1.0},
            r"SFTConfig.lr: got -1.0; Input should be greater than 0 \(lr: peak AdamW learning rate, e.g. 2e-3",
        ),
        ({"max_steps": 10, "warmup_steps": 10}, r"warmup_steps \(10\) must be fewer than max_steps \(10\)"),
        ({"batch_size": 0}, r"SFTConfig.batch_size: got 0;"),
        ({"digit_weight": 0}, r"SFTConfig.digit_weight: got 0;"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio.*cosine floor"),
        ({"betas": (0.9, 1.0)}, r"betas \(0.9, 1.0\) must each be in \[0, 1\)"),
        ({"precision": "fp16"}, r"SFTConfig.precision: got 'fp16'; Input should be 'auto', 'fp32' or 'bf16'"),
        ({"save_every": 5}, r"save_every needs output_dir"),
        ({"learning_rate": 1e-3}, r"unknown key 'learning_rate': did you mean 'lr'\? .*agentrl.learners.sft.SFTConfig"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(**fields)


def test_no_target_within_max_seq_len_is_a_config_error(demos):
    with pytest.raises(ConfigError, match="raise max_seq_len"):
        train_sft(SFTConfig(max_steps=1, warmup_steps=0, max_seq_len=8), demos[:2])


def test_bf16_autocast_trains(demos):
    if (reason := optim.cpu_bf16_error()) is not None:
        pytest.skip(f"bf16 does not run on this CPU: {reason}")
    result = train_sft(SFTConfig(max_steps=4, batch_size=4, warmup_steps=0, precision="bf16"), demos[:4])
    assert all(torch.isfinite(torch.tensor(log.loss)) for log in result.history)
    assert result.model.dtype == torch.float32  # autocast only: weights and optimizer stay fp32


def test_env_without_demonstrations_is_a_config_error():
    with pytest.raises(ConfigError, match="no demonstration"):
        env_demonstrations(object(), [0])
    assert Demonstration([{"role": "user", "content": "x"}]).tools == ()
