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

from agentrl import algos
from agentrl.data.batch import collate
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints, logprobs, optim, policy_model
from agentrl.learners.config import TrainConfig
from agentrl.learners.result import TrainResult
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.types import Message, ToolSchema

__all__ = [
    "Demonstration",
    "SFTConfig",
    "SFTStepLog",
    "digit_token_ids",
    "env_demonstrations",
    "ledger_from_mask",
    "read_messages",
    "read_messages_jsonl",
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
    group_by_length: bool = Field(
        False, description="batch rows of similar length together (each epoch still sees every row once, in "
        "batches drawn in a seeded order), so less of a batch is padding: faster steps when lengths vary",
    )
    max_seconds: float | None = Field(
        None, gt=0, description="stop (and checkpoint) after the step that ends this many seconds into the loop; "
        "the learning rate follows the time spent when it is further along than the steps, so a slow machine "
        "still ends the schedule, e.g. 240. None: run all max_steps",
    )
    digit_weight: float = Field(
        1.0, gt=0, description="loss weight of target tokens that are digits, against 1 for the rest: a number "
        "copied from the prompt or a math answer is a token or two among many the model learns first, e.g. 5",
    )
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


def read_messages(
    source: Any, *, columns: Mapping[str, str] | None = None, split: str = "train", name: str | None = None
) -> list[Demonstration]:
    """Conversations from any data source of :func:`agentrl.data.sources.load_records` (JSONL, Parquet,
    Arrow, a ``save_to_disk`` directory, a Hub id), one per row: ``{"messages": [...], "tools": [...]}``
    (OpenAI chat format; ``tools`` optional), or TRL's ``{"prompt": [...], "completion": [...]}``.

    Args:
        columns: ``{field: the source's column}``, e.g. ``{"messages": "conversation"}``.

    Raises:
        ConfigError: the source cannot be read, or a row has neither form (naming the source and row).
    """
    from agentrl.data.sources import placed_records

    demos = []
    for place, row in placed_records(source, columns=columns, split=split, name=name):
        messages = row.get("messages")
        if messages is None and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
            messages = [*row["prompt"], *row["completion"]]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ConfigError(f'{place}: expected {{"messages": [...], "tools": [...]}} or '
                              f'{{"prompt": [...], "completion": [...]}}; it has {sorted(row)} (map columns '
                              "with columns={'messages': '<column>'} / --columns messages=<column>)")  # fmt: skip
        demos.append(Demonstration(tuple(messages), tuple(row.get("tools") or ())))
    return demos


def read_messages_jsonl(path: str | Path) -> list[Demonstration]:
    """:func:`read_messages` of a JSONL file (kept for its existing callers)."""
    return read_messages(path)


# ---- rows ---------------------------------------------------------------------------------------
def ledger_from_mask(ids: Sequence[int], mask: Sequence[int]) -> Trajectory:
    """Token ids and a loss mask as a ledger (each run of mask-1 tokens one turn): a cut or re-masked
    conversation in the row type :func:`~agentrl.data.batch.collate` lays out."""
    turns, start = [], None
    for t, m in enumerate((*mask, 0)):
        if m and start is None:
            start = t
        elif not m and start is not None:
            turns.append(TurnSpan(start, t))
            start = None
    return Trajectory(tuple(ids), (0.0,) * len(ids), tuple(mask), tuple(turns))


def _rows(ledgers: Sequence[Trajectory], max_len: int, pack: bool, seed: int) -> tuple[list[list[Trajectory]], int]:
    """Cut each ledger to ``max_len`` tokens and group the conversations into rows: one each, or with
    ``pack`` filled greedily up to ``max_len`` tokens in a seeded order.

    Returns the rows and how many conversations were cut. Conversations left with no target are dropped
    (position 0 is never a target: nothing predicts it).
    """
    cut = sum(len(t.token_ids) > max_len for t in ledgers)
    pieces = [ledger_from_mask(t.token_ids[:max_len], (0, *t.loss_mask[1:max_len])) for t in ledgers
              if any(t.loss_mask[1:max_len])]  # fmt: skip
    if not pack:
        return [[piece] for piece in pieces], cut
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[Trajectory]] = [[]]
    for i in order:
        if rows[-1] and sum(len(t.token_ids) for t in rows[-1]) + len(pieces[i].token_ids) > max_len:
            rows.append([])
        rows[-1].append(pieces[i])
    return [row for row in rows if row], cut


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


def digit_token_ids(tokenizer: Any) -> torch.Tensor:
    """The ids of the vocabulary's tokens that decode to digits only (surrounding spaces aside), e.g. ``"7"``,
    ``" 42"``."""
    ids = [i for i in range(len(tokenizer)) if (text := tokenizer.decode([i]).strip()) and text.isdecimal()]
    return torch.tensor(ids, dtype=torch.long)


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
    optim.check_precision(config.precision, config.device)
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
    pad_id = policy_model.pad_id(tokenizer)
    digits = digit_token_ids(tokenizer).to(device) if config.digit_weight != 1.0 else None

    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = optim.make_scheduler(
        optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio, config.max_seconds
    )
    step = 0
    if config.resume_from is not None:
        step = checkpoints.load_training_state(config.resume_from, optimizer, scheduler).step
    meta = {"config": config.model_dump(mode="json"), "learner": "sft"}

    history: list[SFTStepLog] = []
    checkpoint: Path | None = None
    lengths = [sum(len(t.token_ids) for t in row) for row in rows] if config.group_by_length else None
    batches = optim.iterate_batches(len(rows), config.batch_size, config.seed, start_step=step, lengths=lengths)
    loop_started, out_of_time = time.perf_counter(), False
    while step < config.max_steps and not out_of_time:
        started = time.perf_counter()
        conversations = [t for i in next(batches) for t in rows[i]]
        batch = collate(conversations, pad_id=pad_id, packing=config.pack, row_tokens=config.max_seq_len,
                        share_prefix=config.share_prefix).to_torch(device)  # fmt: skip
        with optim.autocast(config.precision, device):
            logprobs_B_T, _ = logprobs.policy_logprobs(model, batch)
            weights = None  # digit targets weigh digit_weight, the rest 1
            if digits is not None:
                weights = torch.isin(batch.token_ids_B_T, digits) * (config.digit_weight - 1) + 1
            loss = algos.sft_nll_loss(logprobs_B_T, batch.loss_mask_B_T, weights_B_T=weights)  # the token mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = optim.clip_and_step(model, optimizer, scheduler, config.grad_clip)
        step += 1

        computed = batch.token_ids_B_T.numel() - batch.shared_prefix * (batch.shape[0] - 1)
        log = SFTStepLog(step, loss.item(), lr, int(batch.loss_mask_B_T.sum()), float(grad_norm),
                         time.perf_counter() - started, computed)  # fmt: skip
        history.append(log)
        if on_step is not None:
            on_step(log)
        out_of_time = config.max_seconds is not None and time.perf_counter() - loop_started >= config.max_seconds
        at_save = config.save_every is not None and step % config.save_every == 0
        if config.output_dir is not None and (at_save or step == config.max_steps or out_of_time):
            checkpoint = checkpoints.save_step(config, model, tokenizer, optimizer, scheduler, step, meta)
    return TrainResult(model, tokenizer, tuple(history), checkpoint, {"num_rows": len(rows), "num_cut": num_cut})
