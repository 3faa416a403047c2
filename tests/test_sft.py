"""SFT tool-format learner: exact masks, no gradient into tool results, learning, checkpoints, resume, config."""

from __future__ import annotations

import json
import time

import pytest
import torch

import agentrl
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints
from agentrl.learners.sft import (
    Demonstration,
    SFTConfig,
    _collate,
    _forward,
    _rows,
    env_demonstrations,
    masked_nll,
    read_messages_jsonl,
    sft_loss,
    shared_prefix_length,
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


def test_tool_result_tokens_never_receive_gradient(tokenizer, demos):
    """The loss's gradient w.r.t. the logits predicting each tool-result (mask 0) token is exactly zero,
    and nonzero for every assistant token; so no tool token is ever a target."""
    model = load_model("tiny")
    ledgers = [demonstration_ledger(ChatRenderer(tokenizer, d.tools), d.messages) for d in demos[:3]]
    rows, _ = _rows(ledgers, 2048, pack=False, seed=0)
    batch = _collate(rows, tokenizer.pad_token_id, torch.device("cpu"))
    logits = _forward(model, batch, packed=False)
    logits.retain_grad()
    masked_nll(logits, batch["ids_B_T"], batch["mask_B_T"]).backward()
    grad_per_position = logits.grad.abs().sum(-1)  # [B, T]: position t predicts token t + 1
    target = batch["mask_B_T"][:, 1:].bool()
    assert (grad_per_position[:, :-1][~target] == 0).all()
    assert (grad_per_position[:, :-1][target] > 0).all()
    # Spot-check by text: a tool result's tokens are inside the zero-gradient region.
    ids = batch["ids_B_T"][0].tolist()
    start = next(i for i in range(len(ids)) if tokenizer.decode(ids[i : i + 1]) == "<tool_response>")
    assert (grad_per_position[0, start - 1 : start + 3] == 0).all()


def test_packing_gives_the_padded_loss(tokenizer, demos):
    model = load_model("tiny")
    ledgers = [demonstration_ledger(ChatRenderer(tokenizer, d.tools), d.messages) for d in demos]
    padded, _ = _rows(ledgers, 1024, pack=False, seed=0)
    packed, _ = _rows(ledgers, 1024, pack=True, seed=0)
    assert len(packed) < len(padded)
    losses = []
    for rows, pack in ((padded, False), (packed, True)):
        batch = _collate(rows, tokenizer.pad_token_id, torch.device("cpu"))
        losses.append(masked_nll(_forward(model, batch, pack), batch["ids_B_T"], batch["mask_B_T"]).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_shared_prefix_length_stops_before_the_earliest_predicting_position():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 3], [5, 6, 7, 4, 4, 4]])
    mask = torch.zeros_like(ids)
    mask[:, 5] = 1
    assert shared_prefix_length(ids, mask) == 3  # rows agree on 3 tokens
    mask[1, 3] = 1  # row 1's target at 3 is predicted by position 2: positions 0-1 may be shared
    assert shared_prefix_length(ids, mask) == 2
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share


@pytest.mark.parametrize("pack", [False, True])
def test_sft_loss_gives_the_full_logits_loss_and_gradients(tokenizer, demos, pack):
    """The LM head on target positions only, and the shared prefix run once (padded rows), change
    neither the loss nor any parameter's gradient."""
    model = load_model("tiny")
    ledgers = [demonstration_ledger(ChatRenderer(tokenizer, d.tools), d.messages) for d in demos]
    rows, _ = _rows(ledgers, 1024, pack=pack, seed=0)
    batch = _collate(rows, tokenizer.pad_token_id, torch.device("cpu"))
    shared = 0 if pack else shared_prefix_length(batch["ids_B_T"], batch["mask_B_T"])
    assert pack or shared > 50  # the system prompt with the tool schemas
    full = _loss_and_grads(model, lambda: masked_nll(_forward(model, batch, pack), batch["ids_B_T"], batch["mask_B_T"]))
    fast = _loss_and_grads(model, lambda: sft_loss(model, batch, pack, shared))
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
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio.*cosine floor"),
        ({"betas": (0.9, 1.0)}, r"betas \(0.9, 1.0\) must each be in \[0, 1\)"),
        ({"precision": "fp16"}, r"SFTConfig.precision: got 'fp16'; Input should be 'fp32' or 'bf16'"),
        ({"save_every": 5}, r"save_every needs output_dir"),
        ({"learning_rate": 1e-3}, r"SFTConfig.learning_rate: got 0.001; Extra inputs are not permitted"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(**fields)


def test_no_target_within_max_seq_len_is_a_config_error(demos):
    with pytest.raises(ConfigError, match="raise max_seq_len"):
        train_sft(SFTConfig(max_steps=1, warmup_steps=0, max_seq_len=8), demos[:2])


def test_bf16_autocast_trains(demos):
    result = train_sft(SFTConfig(max_steps=4, batch_size=4, warmup_steps=0, precision="bf16"), demos[:4])
    assert all(torch.isfinite(torch.tensor(log.loss)) for log in result.history)
    assert result.model.dtype == torch.float32  # autocast only: weights and optimizer stay fp32


def test_env_without_demonstrations_is_a_config_error():
    with pytest.raises(ConfigError, match="no demonstration"):
        env_demonstrations(object(), [0])
    assert Demonstration([{"role": "user", "content": "x"}]).tools == ()
