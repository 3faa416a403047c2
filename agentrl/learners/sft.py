"""Supervised fine-tuning on multi-turn tool-use demonstrations: the tool-format phase before RL.

Each demonstration (OpenAI-style messages plus the ``tools`` offered) becomes a token ledger built the
way the rollout runner builds one: the opening prompt, then per assistant turn the tokens the policy
would have sampled (text, tool-call markup and the end-of-turn token: mask 1), then what the template
puts before the next generation (closing glue, tool results, user turns, the next generation prompt:
mask 0). The loss is the NLL of the mask-1 tokens only, so a tool result never receives gradient.

Usage::

    from agentrl.learners.sft import SFTConfig, env_demonstrations, train_sft

    demos = env_demonstrations(agentrl.make("math-v0", tools=["calculator"]), range(64))
    result = train_sft(SFTConfig(max_steps=200, output_dir="runs/sft"), demos)
    model = load_model(result.checkpoint)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from agentrl.data.jsonl import jsonl_records
from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.errors import ConfigError, TemplateError
from agentrl.learners import checkpoints, logprobs, optim, policy_model
from agentrl.learners.config import TrainConfig
from agentrl.learners.result import TrainResult
from agentrl.models.chat import ChatRenderer
from agentrl.types import Message, StopReason, ToolSchema

__all__ = [
    "Demonstration",
    "SFTConfig",
    "SFTStepLog",
    "demonstration_ledger",
    "env_demonstrations",
    "masked_nll",
    "read_messages_jsonl",
    "sft_loss",
    "shared_prefix_length",
    "train_sft",
]


# ---- configuration --------------------------------------------------------------------------------
class SFTConfig(TrainConfig):
    """Everything an SFT run reads (the shared fields are documented on :class:`TrainConfig`).
    Invalid values raise :class:`~agentrl.errors.ConfigError`."""

    batch_size: int = Field(32, ge=1, description="rows (conversations, or packs of them) per step, e.g. 32")
    max_seq_len: int = Field(
        2048, ge=2, description="tokens per row; longer conversations are cut, e.g. 2048"
    )
    pack: bool = Field(False, description="pack several conversations into each row of max_seq_len tokens")
    share_prefix: bool = Field(
        True,
        description="run the token prefix all rows of a batch share (system prompt, tool schemas) once and "
        "let every row attend to it; the same loss and gradients; padded rows only (not with pack or "
        "gradient_checkpointing)",
    )


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Demonstration:
    """One reference conversation: chat messages (system/user/assistant/tool) and the tools offered."""

    messages: Sequence[Message]
    tools: Sequence[ToolSchema] = ()


def env_demonstrations(
    env: Any, tasks: Iterable[Any], options: Mapping[str, Any] | None = None
) -> list[Demonstration]:
    """The reference demonstrations of ``env`` (its ``demonstration(task, **options)`` method) with its tool
    schemas.

    Raises:
        ConfigError: the env offers no ``demonstration`` method.
    """
    if not callable(getattr(env, "demonstration", None)):
        raise ConfigError(
            f"{type(env).__name__} has no demonstration(task) method; build Demonstration(messages, tools) "
            "lists yourself or read an OpenAI-messages JSONL with read_messages_jsonl"
        )
    tools = env.tool_schemas()
    return [Demonstration(tuple(env.demonstration(task, **(options or {}))), tuple(tools)) for task in tasks]


def read_messages_jsonl(path: str | Path) -> list[Demonstration]:
    """Read ``{"messages": [...], "tools": [...]}`` lines (OpenAI chat format; ``tools`` optional).

    Raises:
        ConfigError: a line is not JSON or lacks a ``messages`` list; the message names file and line.
    """
    demos = []
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ConfigError(f'{path}:{lineno}: expected {{"messages": [...], "tools": [...]}}')
        demos.append(Demonstration(tuple(record["messages"]), tuple(record.get("tools") or ())))
    return demos


def demonstration_ledger(renderer: ChatRenderer, messages: Sequence[Message]) -> Trajectory:
    """Tokenize a conversation into the ledger the rollout runner would have recorded for it.

    Assistant turns (their text, tool-call markup and end-of-turn token) get mask 1; everything else 0.
    Messages after the last assistant turn are dropped (the runner stops there too).

    Raises:
        ConfigError: no assistant message, or an unknown role.
        TemplateError: the template does not render an assistant turn as prefix + text + end-of-turn.
    """
    roles = {"system", "user", "assistant", "tool"}
    bad = [m.get("role") for m in messages if m.get("role") not in roles]
    if bad:
        raise ConfigError(f"unknown message role {bad[0]!r}; use one of {sorted(roles)}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ConfigError("a demonstration needs at least one assistant message to learn from")
    history = list(messages[: turns[0]])
    ledger = LedgerBuilder(renderer.prompt_ids(history), history)
    for n, k in enumerate(turns):
        text = _assistant_text(renderer, history, messages[k])
        ids = renderer.encode(text)
        ledger.add_sampled(ids, None)
        sampled = renderer.decode(ids)
        message = renderer.assistant_message(sampled)  # content text, as the env receives it in a rollout
        if n + 1 == len(turns):
            ledger.add_messages([message])
            break
        answer = list(messages[k + 1 : turns[n + 1]])
        if answer:
            ledger.add_observation(renderer.observation_ids(history, sampled, answer))
        else:  # two assistant turns in a row: only the glue and the next generation prompt
            before = renderer.render(history, add_generation_prompt=True) + sampled
            after = renderer.render([*history, message], add_generation_prompt=True)
            ledger.add_observation(renderer.encode(after[len(before) :]))
        ledger.add_messages([message, *answer])
        history += [message, *answer]
    return ledger.finish(StopReason.TERMINATED, meta={"source": "demonstration"})


def _assistant_text(renderer: ChatRenderer, history: Sequence[Message], message: Message) -> str:
    """What the policy must generate for ``message``: its rendering after the generation prompt, up to and
    including the end-of-turn token (structured ``tool_calls`` come out as the template's markup)."""
    eos = renderer.tokenizer.eos_token or ""
    before = renderer.render(history, add_generation_prompt=True)
    after = renderer.render([*history, message], add_generation_prompt=False)
    end = after.find(eos, len(before)) if eos else -1
    if not after.startswith(before) or end < 0:
        raise TemplateError(
            "the chat template does not render an assistant turn as the generation prompt followed by the "
            f"turn's text and {eos!r}; pass template='chatml' or fix the template"
        )
    return after[len(before) : end + len(eos)]


# ---- loss (moves to agentrl/algos/losses.py once that module offers a masked NLL) ---------------------
def masked_nll(logits_B_T_V: torch.Tensor, ids_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where ``mask_B_T`` is 1 (token-mean over the batch).

    ``mask_B_T[b, t] == 1`` means token ``t`` is a target; it is predicted by the logits at ``t - 1``, so
    position 0 can never be a target. Returns 0 (with a gradient path) when no token is a target.
    """
    logprobs = torch.log_softmax(logits_B_T_V[:, :-1].float(), dim=-1)
    target_logprobs_B_T = logprobs.gather(-1, ids_B_T[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = mask_B_T[:, 1:].to(target_logprobs_B_T.dtype)
    return -(target_logprobs_B_T * mask).sum() / mask.sum().clamp(min=1.0)


# ---- batching -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """One training row: token ids, loss mask and position ids (restarting at each packed conversation)."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]
    positions: tuple[int, ...]


def _rows(ledgers: Sequence[Trajectory], max_len: int, pack: bool, seed: int) -> tuple[list[_Row], int]:
    """Cut each ledger to ``max_len`` tokens and, with ``pack``, fill rows greedily in a seeded order.

    Returns the rows and how many conversations were cut. Conversations left with no target are dropped.
    """
    cut = sum(len(t.token_ids) > max_len for t in ledgers)
    pieces = [(tuple(t.token_ids[:max_len]), tuple(t.loss_mask[:max_len])) for t in ledgers]
    pieces = [(ids, mask) for ids, mask in pieces if any(mask[1:])]
    if not pack:
        return [_Row(ids, mask, tuple(range(len(ids)))) for ids, mask in pieces], cut
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[_Row] = []
    ids_acc: list[int] = []
    mask_acc: list[int] = []
    pos_acc: list[int] = []
    for i in order:
        ids, mask = pieces[i]
        if ids_acc and len(ids_acc) + len(ids) > max_len:
            rows.append(_Row(tuple(ids_acc), tuple(mask_acc), tuple(pos_acc)))
            ids_acc, mask_acc, pos_acc = [], [], []
        ids_acc += ids
        mask_acc += mask
        pos_acc += range(len(ids))
    if ids_acc:
        rows.append(_Row(tuple(ids_acc), tuple(mask_acc), tuple(pos_acc)))
    return rows, cut


def _collate(rows: Sequence[_Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad rows into ``ids_B_T``, ``mask_B_T``, ``positions_B_T`` and ``attention_B_T``."""
    width = max(len(r.ids) for r in rows)

    def pad(values: Sequence[int], fill: int) -> list[int]:
        return [*values, *([fill] * (width - len(values)))]

    return {
        "ids_B_T": torch.tensor([pad(r.ids, pad_id) for r in rows], device=device),
        "mask_B_T": torch.tensor([pad(r.mask, 0) for r in rows], device=device),
        "positions_B_T": torch.tensor([pad(r.positions, 0) for r in rows], device=device),
        "attention_B_T": torch.tensor([pad([1] * len(r.ids), 0) for r in rows], device=device),
    }


def _forward(model: Any, batch: Mapping[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Logits for a batch. Packed rows pass position ids and no attention mask: transformers then builds
    a block-diagonal mask from where the positions restart (only without a KV cache, hence use_cache=False),
    so packed conversations never attend to each other."""
    if packed:
        return model(input_ids=batch["ids_B_T"], position_ids=batch["positions_B_T"], use_cache=False).logits
    return model(input_ids=batch["ids_B_T"], attention_mask=batch["attention_B_T"], use_cache=False).logits


def shared_prefix_length(ids_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> int:
    """How many leading tokens every row has in common and that predict no target.

    A target at ``t`` is predicted by position ``t - 1``, so the prefix stops before the position that
    predicts the earliest target of any row. 0 for a single row (nothing to share).
    """
    if ids_B_T.shape[0] < 2:
        return 0
    same_T = (ids_B_T == ids_B_T[:1]).all(dim=0).long()
    common = int(same_T.cumprod(0).sum())
    has_target_B = mask_B_T.any(dim=1)
    if not bool(has_target_B.any()):
        return common
    first_target = int(mask_B_T[has_target_B].long().argmax(dim=1).min())
    return max(0, min(common, first_target - 1))


def _prefix_cache(decoder: Any, prefix_ids_1_P: torch.Tensor, rows: int, config: Any) -> Any:
    """The shared prefix run once, its keys and values broadcast to ``rows`` rows (gradients flow back)."""
    from transformers.cache_utils import DynamicCache

    cache = decoder(input_ids=prefix_ids_1_P, use_cache=True).past_key_values
    layers = [
        (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=layers, config=config)


def sft_loss(model: Any, batch: Mapping[str, torch.Tensor], packed: bool, shared: int = 0) -> torch.Tensor:
    """:func:`masked_nll` of the batch under ``model``, computing only what the loss reads.

    The LM head and the softmax run only at positions that predict a target. With ``shared`` > 0 (padded
    rows; at most :func:`shared_prefix_length`), the first ``shared`` tokens run once, batch 1, and every
    row attends to their keys and values: the same loss and gradients as the plain layout, for a fraction
    of the compute when a long system prompt opens every row.
    """
    ids_B_T, mask_B_T = batch["ids_B_T"], batch["mask_B_T"]
    split = logprobs.decoder_and_head(model)
    if split is None or (packed and shared):
        return masked_nll(_forward(model, batch, packed), ids_B_T, mask_B_T)
    decoder, head = split
    if packed:
        hidden_B_S_H = decoder(
            input_ids=ids_B_T, position_ids=batch["positions_B_T"], use_cache=False
        ).last_hidden_state
    elif shared:
        cache = _prefix_cache(decoder, ids_B_T[:1, :shared], ids_B_T.shape[0], model.config)
        hidden_B_S_H = decoder(
            input_ids=ids_B_T[:, shared:], attention_mask=batch["attention_B_T"], past_key_values=cache,
            position_ids=batch["positions_B_T"][:, shared:], use_cache=False,
        ).last_hidden_state  # fmt: skip
    else:
        hidden_B_S_H = decoder(
            input_ids=ids_B_T, attention_mask=batch["attention_B_T"], use_cache=False
        ).last_hidden_state
    predicts_B_S = mask_B_T[:, shared + 1 :] != 0  # the hidden state at t predicts token t + 1
    logits_N_V = head(hidden_B_S_H[:, :-1][predicts_B_S]).float()
    targets_N = ids_B_T[:, shared + 1 :][predicts_B_S]
    picked_N = torch.log_softmax(logits_N_V, dim=-1).gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
    return -picked_N.sum() / max(int(predicts_B_S.sum()), 1)


# ---- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTStepLog:
    """One optimizer step: its loss (before the update), learning rate, target tokens, wall seconds and the
    tokens the forward computed."""

    step: int
    loss: float
    lr: float
    tokens: int
    grad_norm: float
    seconds: float
    computed_tokens: int = 0
    """Tokens the forward ran over (padding included; a shared prefix once)."""


def train_sft(
    config: SFTConfig,
    demonstrations: Sequence[Demonstration | Trajectory],
    on_step: Callable[[SFTStepLog], None] | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on the assistant tokens of ``demonstrations``.

    Args:
        config: the run's settings.
        demonstrations: conversations with tool calls, each tokenized with the model's chat template, or
            recorded trajectories (e.g. the best samples of rejection sampling), trained on their ledgers.
        on_step: called after every optimizer step with its :class:`SFTStepLog`.

    Returns:
        The trained model (in train mode), the tokenizer, the log, the final checkpoint's path (None
        without ``output_dir``) and ``extras``: ``num_rows`` (training rows) and ``num_cut`` (conversations
        cut to ``max_seq_len``).

    Raises:
        ConfigError: no demonstration has a target token within ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens.
    """
    optim.seed_everything(config.seed)
    device = torch.device(config.device)
    model, tokenizer = policy_model.load_trainable(config)

    # Tokenize every conversation exactly as a rollout would have recorded it (a recorded one is used as is).
    ledgers = [d if isinstance(d, Trajectory) else
               demonstration_ledger(ChatRenderer(tokenizer, d.tools, config.template), d.messages)
               for d in demonstrations]  # fmt: skip
    rows, num_cut = _rows(ledgers, config.max_seq_len, config.pack, config.seed)
    if not rows:
        raise ConfigError(
            f"none of the {len(ledgers)} demonstrations has an assistant token within max_seq_len="
            f"{config.max_seq_len}; raise max_seq_len or pass demonstrations with assistant turns"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if config.resume_from is not None:
        step = checkpoints.load_training_state(config.resume_from, optimizer, scheduler).step
    meta = {"config": config.model_dump(mode="json"), "learner": "sft"}

    history: list[SFTStepLog] = []
    checkpoint: Path | None = None
    share = config.share_prefix and not config.pack and not config.gradient_checkpointing
    batches = optim.iterate_batches(len(rows), config.batch_size, config.seed, start_step=step)
    while step < config.max_steps:
        started = time.perf_counter()
        batch = _collate([rows[i] for i in next(batches)], pad_id, device)
        shared = shared_prefix_length(batch["ids_B_T"], batch["mask_B_T"]) if share else 0
        with optim.autocast(config.precision, device):
            loss = sft_loss(model, batch, config.pack, shared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = optim.clip_and_step(model, optimizer, scheduler, config.grad_clip)
        step += 1

        computed = batch["ids_B_T"].numel() - shared * (batch["ids_B_T"].shape[0] - 1)
        log = SFTStepLog(step, loss.item(), lr, int(batch["mask_B_T"][:, 1:].sum()), float(grad_norm),
                      time.perf_counter() - started, computed)  # fmt: skip
        history.append(log)
        if on_step is not None:
            on_step(log)
        at_save = config.save_every is not None and step % config.save_every == 0
        if config.output_dir is not None and (at_save or step == config.max_steps):
            checkpoint = checkpoints.save_step(config, model, tokenizer, optimizer, scheduler, step, meta)
    return TrainResult(model, tokenizer, tuple(history), checkpoint, {"num_rows": len(rows), "num_cut": num_cut})
