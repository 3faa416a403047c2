"""Reward models and process reward models: train them on conversations, then use them as rewards.

Both are the LM trunk with a scalar head (:class:`~agentrl.models.value_head.ValueModel`: the trunk plus
``value_head.safetensors``) read (:func:`~agentrl.rewards.learned.end_scores`) on the token ledger a rollout
would have recorded (:func:`~agentrl.models.chat.demonstration_ledger`), at sampled tokens only:

- **Reward model (ORM)**: at the last assistant turn's end-of-turn token, trained Bradley–Terry on
  chosen/rejected pairs. Later messages are dropped and attention is causal: no tool result or user turn
  after it moves the score.
- **Process reward model (PRM)**: at the end of every assistant turn, or of every step inside one (split
  at ``step_separator``, e.g. ``"\\n\\n"``; a step ends with its separator, the last with the end-of-turn
  token), trained with binary cross-entropy on step labels.

Usage (the scorers, in :mod:`agentrl.rewards.learned`, plug into :mod:`agentrl.rewards.base`)::

    result = train_reward_model(RewardModelConfig(output_dir="runs/rm"), read_preference_jsonl("p.jsonl"))
    rm = RewardModelScorer.from_pretrained(result.checkpoint)
    reward = WeightedReward([RewardSpec("correct", exact_match), RewardSpec("rm", rm, weight=0.1)])
    prm = ProcessRewardScorer.from_pretrained("runs/prm/step-000200")
    env = ToolEnv(tools, tasks, reward, process_reward=prm)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from agentrl.data.buffer import PreferencePair
from agentrl.data.jsonl import jsonl_records
from agentrl.errors import ConfigError
from agentrl.learners import checkpoints, optim
from agentrl.learners.config import TrainConfig
from agentrl.learners.dpo import LabelledConversation, PreferenceConversation
from agentrl.learners.result import TrainResult
from agentrl.models.chat import ChatRenderer
from agentrl.models.value_head import ValueModel
from agentrl.rewards import learned
from agentrl.types import Message, ToolSchema

__all__ = [
    "ProcessRewardConfig",
    "RewardModelConfig",
    "RewardModelStepLog",
    "StepLabelledConversation",
    "bradley_terry_loss",
    "read_step_labels_jsonl",
    "step_bce_loss",
    "train_process_reward_model",
    "train_reward_model",
]


# ---- losses -------------------------------------------------------------------------------------
def bradley_terry_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor, margin_B: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-pair Bradley–Terry loss ``-log σ(r_c - r_r - m) + center_coef · (r_c + r_r)²``.

    ``margin_B`` (default 0) asks the chosen score to win by at least that much; the centring term keeps
    the scores of a pair near 0, so rewards from different runs share a scale.
    """
    delta_B = chosen_B - rejected_B
    if margin_B is not None:
        delta_B = delta_B - margin_B
    loss_B = -torch.nn.functional.logsigmoid(delta_B)
    if center_coef:
        loss_B = loss_B + center_coef * (chosen_B + rejected_B) ** 2
    return loss_B


def step_bce_loss(logits_N: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Per-step binary cross-entropy of ``sigmoid(logit)`` against a label in [0, 1] (1: a good step)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits_N, labels_N, reduction="none")


# ---- configuration --------------------------------------------------------------------------------
class _ScoreModelConfig(TrainConfig):
    """The fields both reward-model runs add to TrainConfig."""

    batch_size: int = Field(8, ge=1, description="pairs (PRM: conversations) per optimizer step, e.g. 8")
    max_seq_len: int = Field(
        2048, ge=2, description="tokens per conversation; what is scored beyond it is dropped, e.g. 2048"
    )

    @model_validator(mode="after")
    def _no_lora(self) -> _ScoreModelConfig:
        if self.lora is not None:
            raise ValueError("lora is not supported for reward models; set lora=None")
        return self


class RewardModelConfig(_ScoreModelConfig):
    """A Bradley–Terry reward-model run (shared fields: :class:`~agentrl.learners.config.TrainConfig`)."""

    margin_scale: float = Field(
        0.0, ge=0, description="subtracts margin_scale × a mined pair's reward gap inside the sigmoid"
    )
    center_coef: float = Field(
        0.0, ge=0, description="weight of (r_chosen + r_rejected)², keeping scores near 0, e.g. 0.01"
    )


class ProcessRewardConfig(_ScoreModelConfig):
    """A process-reward-model run (shared fields: :class:`~agentrl.learners.config.TrainConfig`)."""

    step_separator: str | None = Field(
        None, min_length=1, description="splits assistant messages into steps, e.g. '\\n\\n'; None: per turn"
    )


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepLabelledConversation:
    """A conversation with one label per assistant turn (or per step of each, in order).

    A label is 1 (a good step), 0 (a bad one), a probability in between, or None (not scored, e.g. the
    steps after the first mistake).
    """

    messages: Sequence[Message]
    labels: Sequence[float | None]
    tools: Sequence[ToolSchema] = ()


def read_step_labels_jsonl(path: str | Path, separator: str | None = None) -> list[StepLabelledConversation]:
    """Read ``{"messages": [...], "tools": [...], "labels": [1, 0, ...]}`` lines (``tools`` optional).

    ``separator`` is ``ProcessRewardConfig.step_separator``: the labels count the steps it splits
    assistant messages into, or with None the assistant turns.

    Raises:
        ConfigError: a line is not JSON, lacks ``messages`` or ``labels``, or its labels do not match its
            steps; the message names file and line.
    """
    out = []
    for lineno, record in jsonl_records(path):
        form = '{"messages": [...], "labels": [1, 0, ...], "tools": [...]}'
        messages = record.get("messages") if isinstance(record, dict) else None
        if not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
                and isinstance(record.get("labels"), list)):  # fmt: skip
            raise ConfigError(f"{path}:{lineno}: expected {form}, one label per step")
        tools = tuple(record.get("tools") or ())
        example = StepLabelledConversation(tuple(messages), tuple(record["labels"]), tools)
        try:
            _check_labels(example, separator)
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}") from None
        out.append(example)
    return out


def _check_labels(example: StepLabelledConversation, separator: str | None) -> None:
    """Raises ValueError (with the fix) unless there is one valid label per step."""
    counts = [len(learned.step_cuts(m, separator)) for m in example.messages
              if isinstance(m, Mapping) and m.get("role") == "assistant"]  # fmt: skip
    unit = (
        f"steps (assistant messages split at {separator!r})" if separator is not None else "assistant turns"
    )
    if len(example.labels) != sum(counts):
        raise ValueError(
            f"{len(example.labels)} labels for {sum(counts)} {unit}, per turn {counts}; give one label per "
            "step" + (", or set step_separator to how the labels were counted" if separator is None else "")
        )
    for label in example.labels:
        if label is not None and not (isinstance(label, (int, float)) and 0 <= label <= 1):
            raise ValueError(f"label {label!r} must be 1, 0, a probability in between, or null (not scored)")


def _pair_rows(tokenizer: Any, template: str | None, example: Any) -> tuple[learned.ScoreRow, learned.ScoreRow, float]:
    """``(chosen, rejected, reward gap)`` of a conversation pair (gap 0) or a mined PreferencePair."""
    if isinstance(example, PreferencePair):
        chosen, rejected = (learned.score_row(t, [t.turns[-1].last_token]) for t in (example.chosen, example.rejected))
        return chosen, rejected, example.margin
    if not isinstance(example, PreferenceConversation):
        hint = ""
        if isinstance(example, LabelledConversation):
            hint = "; unpaired labelled conversations train with train_dpo(DPOConfig(loss='kto'))"
        raise ConfigError(f"a reward model trains on PreferenceConversation or PreferencePair, got "
                          f"{type(example).__name__}{hint}")  # fmt: skip
    for name, part in (("chosen", example.chosen), ("rejected", example.rejected)):
        if not any(m.get("role") == "assistant" for m in part):
            raise ConfigError(f"a pair's {name} list needs an assistant message to score")
    renderer = ChatRenderer(tokenizer, example.tools, template)
    return (learned.conversation_row(renderer, [*example.prompt, *example.chosen]),
            learned.conversation_row(renderer, [*example.prompt, *example.rejected]), 0.0)  # fmt: skip


# ---- the loops ------------------------------------------------------------------------------------
_BatchLoss = Callable[[Sequence[int]], tuple[torch.Tensor, dict[str, float]]]
"""The mean loss of one batch's rows (with grad) and its RewardModelStepLog statistics."""


@dataclass(frozen=True)
class RewardModelStepLog:
    """One optimizer step, measured on its batch before the update.

    ``accuracy``: the fraction of pairs whose chosen side scores higher (PRM: of labelled steps whose
    ``sigmoid(logit) > 0.5`` agrees with ``label >= 0.5``). ``margin``: the mean score of the chosen minus
    the rejected sides (PRM: mean logit of good steps minus bad ones, NaN when either is missing).
    """

    step: int
    loss: float
    accuracy: float
    margin: float
    lr: float
    grad_norm: float
    seconds: float


def train_reward_model(
    config: RewardModelConfig,
    data: Iterable[PreferenceConversation | PreferencePair],
    on_step: Callable[[RewardModelStepLog], None] | None = None,
) -> TrainResult:
    """Train a Bradley–Terry reward model: each step scores ``batch_size`` pairs and minimises
    :func:`bradley_terry_loss` averaged over them; ``on_step`` gets each :class:`RewardModelStepLog`.

    ``data``: :class:`~agentrl.learners.dpo.PreferenceConversation` s (e.g. from
    :func:`~agentrl.learners.dpo.read_preference_jsonl`) or :class:`~agentrl.data.buffer.PreferencePair` s
    mined from a buffer (scored on their own ledgers).

    Returns the :class:`ValueModel` (train mode) in a :class:`~agentrl.learners.result.TrainResult`; ``extras``:
    ``num_examples`` (pairs trained on), ``num_too_long`` (pairs dropped: a side is longer than ``max_seq_len``).

    Raises:
        ConfigError: an example that is not a pair, or no pair whose both sides fit ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens.
    """
    optim.seed_everything(config.seed)
    model, tokenizer = _load_trainable(config)
    pairs = [_pair_rows(tokenizer, config.template, e) for e in data]
    kept = [p for p in pairs if max(p[0].ends[-1], p[1].ends[-1]) < config.max_seq_len]
    if not kept:
        raise ConfigError(
            f"none of the {len(pairs)} pairs fits max_seq_len={config.max_seq_len}; raise max_seq_len"
        )

    def batch_loss(index: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [kept[i][0] for i in index] + [kept[i][1] for i in index]
        with optim.autocast(config.precision, config.device):
            scores_N = learned.end_scores(model, rows, config.device)
        chosen_B, rejected_B = scores_N[: len(index)], scores_N[len(index) :]
        margin_B = config.margin_scale * torch.tensor([kept[i][2] for i in index], device=scores_N.device)
        loss = bradley_terry_loss(chosen_B, rejected_B, margin_B, config.center_coef).mean()
        delta_B = (chosen_B - rejected_B).detach()
        return loss, {"accuracy": float((delta_B > 0).float().mean()), "margin": float(delta_B.mean())}

    history, checkpoint = _fit(config, model, tokenizer, len(kept), batch_loss, learned.REWARD_MODEL, on_step)
    extras = {"num_examples": len(kept), "num_too_long": len(pairs) - len(kept)}
    return TrainResult(model, tokenizer, history, checkpoint, extras)


def train_process_reward_model(
    config: ProcessRewardConfig,
    data: Iterable[StepLabelledConversation],
    on_step: Callable[[RewardModelStepLog], None] | None = None,
) -> TrainResult:
    """Train a process reward model on :class:`StepLabelledConversation` s (e.g. from
    :func:`read_step_labels_jsonl`): each step scores every labelled step of ``batch_size`` conversations
    and minimises :func:`step_bce_loss` averaged over those steps; ``on_step`` gets each
    :class:`RewardModelStepLog`.

    Returns a :class:`~agentrl.learners.result.TrainResult` as :func:`train_reward_model` does; ``extras``:
    ``num_examples`` (conversations), ``num_too_long`` (those longer than ``max_seq_len``, scored up to it).

    Raises:
        ConfigError: a label count that does not match (naming the example), or no labelled step within
            ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens, or (with a separator)
            does not render assistant content verbatim.
    """
    optim.seed_everything(config.seed)
    model, tokenizer = _load_trainable(config)
    rows, num_too_long = _step_rows(config, tokenizer, list(data))

    def batch_loss(index: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [rows[i] for i in index]
        with optim.autocast(config.precision, config.device):
            logits_N = learned.end_scores(model, batch, config.device)
        labels_N = torch.tensor([x for r in batch for x in r.labels], device=logits_N.device)
        loss = step_bce_loss(logits_N, labels_N).mean()
        logits, good = logits_N.detach(), labels_N >= 0.5
        both = bool(good.any() and (~good).any())
        margin = float(logits[good].mean() - logits[~good].mean()) if both else math.nan
        return loss, {"accuracy": float(((logits > 0) == good).float().mean()), "margin": margin}

    history, checkpoint = _fit(config, model, tokenizer, len(rows), batch_loss, learned.PROCESS_REWARD_MODEL, on_step)
    extras = {"num_examples": len(rows), "num_too_long": num_too_long}
    return TrainResult(model, tokenizer, history, checkpoint, extras)


def _step_rows(config: ProcessRewardConfig, tokenizer: Any, examples: Sequence[StepLabelledConversation]
               ) -> tuple[list[learned.ScoreRow], int]:  # fmt: skip
    """One row per conversation with a labelled step within ``max_seq_len``; and how many are longer."""
    rows, num_too_long = [], 0
    for n, example in enumerate(examples):
        try:
            _check_labels(example, config.step_separator)
        except ValueError as exc:
            raise ConfigError(f"example {n}: {exc}") from None
        renderer = ChatRenderer(tokenizer, example.tools, config.template)
        ledger, ends = learned.step_ends(renderer, example.messages, config.step_separator)
        num_too_long += ends[-1][-1] >= config.max_seq_len
        kept = [(e, float(x)) for e, x in zip((e for turn in ends for e in turn), example.labels, strict=True)
                if x is not None and e < config.max_seq_len]  # fmt: skip
        if kept:
            rows.append(learned.score_row(ledger, [e for e, _ in kept], [x for _, x in kept]))
    if not rows:
        raise ConfigError(f"none of the {len(examples)} conversations has a labelled step within max_seq_len="
                          f"{config.max_seq_len}; raise max_seq_len or label some steps")  # fmt: skip
    return rows, num_too_long


def _load_trainable(config: _ScoreModelConfig) -> tuple[ValueModel, Any]:
    """The trunk and head to train (from ``resume_from`` when set, else ``model``) and the tokenizer."""
    from agentrl.models.loading import load_tokenizer

    start = config.resume_from if config.resume_from is not None else config.model
    model = ValueModel.from_pretrained(start, config.device).train()
    if config.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, load_tokenizer(start)


def _fit(
    config: _ScoreModelConfig, model: ValueModel, tokenizer: Any, num_rows: int, batch_loss: _BatchLoss,
    learner: str, on_step: Callable[[RewardModelStepLog], None] | None,
) -> tuple[tuple[RewardModelStepLog, ...], Path | None]:  # fmt: skip
    """AdamW steps on ``batch_loss`` of seeded batches to ``max_steps``, resuming and checkpointing."""
    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if config.resume_from is not None:
        step = checkpoints.load_training_state(config.resume_from, optimizer, scheduler).step
    meta = {"config": config.model_dump(mode="json"), "learner": learner}

    history: list[RewardModelStepLog] = []
    checkpoint: Path | None = None
    batches = optim.iterate_batches(num_rows, config.batch_size, config.seed, start_step=step)
    while step < config.max_steps:
        started = time.perf_counter()
        loss, stats = batch_loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = optim.clip_and_step(model, optimizer, scheduler, config.grad_clip)
        step += 1

        seconds = time.perf_counter() - started
        log = RewardModelStepLog(step, loss.item(), **stats, lr=lr, grad_norm=grad_norm, seconds=seconds)
        history.append(log)
        if on_step is not None:
            on_step(log)
        at_save = config.save_every is not None and step % config.save_every == 0
        if config.output_dir is not None and (at_save or step == config.max_steps):
            checkpoint = checkpoints.save_step(config, model, tokenizer, optimizer, scheduler, step, meta)
    return tuple(history), checkpoint
