"""Reward models and process reward models: train them on conversations, then use them as rewards.

Both are the LM trunk with a scalar head (:class:`~agentrl.models.value_head.ValueModel`: the trunk plus
``value_head.safetensors``) read on the token ledger a rollout would have recorded
(:func:`~agentrl.learners.sft.demonstration_ledger`), at sampled tokens only:

- **Reward model (ORM)**: at the last assistant turn's end-of-turn token, trained Bradley–Terry on
  chosen/rejected pairs. Later messages are dropped and attention is causal: no tool result or user turn
  after it moves the score.
- **Process reward model (PRM)**: at the end of every assistant turn, or of every step inside one (split
  at ``step_separator``, e.g. ``"\\n\\n"``; a step ends with its separator, the last with the end-of-turn
  token), trained with binary cross-entropy on step labels.

Usage (the scorers, in :mod:`agentrl.learners.reward_scorers`, plug into :mod:`agentrl.rewards.base`)::

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
from typing import Any, NamedTuple

import torch
from pydantic import Field, model_validator

from agentrl.data.buffer import PreferencePair
from agentrl.data.jsonl import jsonl_records
from agentrl.errors import ConfigError, TemplateError
from agentrl.learners import checkpoints, optim
from agentrl.learners.config import TrainConfig
from agentrl.learners.dpo import LabelledConversation, PreferenceConversation
from agentrl.learners.sft import demonstration_ledger
from agentrl.models.chat import ChatRenderer
from agentrl.models.value_head import ValueModel
from agentrl.types import Message, ToolSchema

__all__ = [
    "ProcessRewardConfig",
    "RewardModelConfig",
    "RewardModelResult",
    "StepLabelledConversation",
    "StepLog",
    "bradley_terry_loss",
    "read_step_labels_jsonl",
    "step_bce_loss",
    "train_process_reward_model",
    "train_reward_model",
]

_LEARNERS = {"orm": "reward-model", "prm": "process-reward-model"}


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
    """A Bradley–Terry reward-model run (shared fields: :class:`~agentrl.learners._config.TrainConfig`)."""

    margin_scale: float = Field(
        0.0, ge=0, description="subtracts margin_scale × a mined pair's reward gap inside the sigmoid"
    )
    center_coef: float = Field(
        0.0, ge=0, description="weight of (r_chosen + r_rejected)², keeping scores near 0, e.g. 0.01"
    )


class ProcessRewardConfig(_ScoreModelConfig):
    """A process-reward-model run (shared fields: :class:`~agentrl.learners._config.TrainConfig`)."""

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


def _step_cuts(content: str, separator: str | None) -> list[int]:
    """Where each step of ``content`` ends (after its separator), as character offsets; one step at least."""
    if separator is None:
        return [len(content)]
    cuts, pos = [], 0
    pieces = content.split(separator)
    for i, piece in enumerate(pieces):
        pos += len(piece) + (len(separator) if i + 1 < len(pieces) else 0)
        if piece.strip():
            cuts.append(pos)
    return cuts or [len(content)]


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _check_labels(example: StepLabelledConversation, separator: str | None) -> None:
    """Raises ValueError (with the fix) unless there is one valid label per step."""
    counts = [len(_step_cuts(_content(m), separator)) for m in example.messages
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


class _Row(NamedTuple):
    """Token ids of one conversation, the positions the head is read at, and their labels (PRM)."""

    ids: tuple[int, ...]
    ends: tuple[int, ...]
    labels: tuple[float, ...] = ()


def _step_ends(
    renderer: ChatRenderer, messages: Sequence[Message], separator: str | None
) -> tuple[tuple[int, ...], list[list[int]]]:
    """The conversation's ledger ids (to its last assistant token) and, per assistant turn, the position of
    each step's last token.

    Raises:
        TemplateError: with a separator, the template does not render an assistant message's content verbatim.
    """
    ledger = demonstration_ledger(renderer, messages)
    assistants = [m for m in messages if m.get("role") == "assistant"]
    ends: list[list[int]] = []
    for span, message in zip(ledger.turns, assistants, strict=True):
        cuts, ids = _step_cuts(_content(message), separator), ledger.token_ids[span.start : span.end]
        turn_ends = [span.end - 1]  # the last step ends with the end-of-turn token
        if len(cuts) > 1:
            offset = renderer.decode(ids).find(_content(message))
            if offset < 0:
                raise TemplateError(
                    "the chat template does not render an assistant message's content verbatim, so its steps "
                    "cannot be found; set step_separator=None (one score per turn) or pass template='chatml'"
                )
            turn_ends[:0] = [span.start + _token_at(renderer, ids, offset + cut) for cut in cuts[:-1]]
        ends.append(turn_ends)
    return tuple(ledger.token_ids[: ledger.turns[-1].end]), ends


def _token_at(renderer: ChatRenderer, ids: Sequence[int], chars: int) -> int:
    """Index of the token that completes the first ``chars`` characters of ``decode(ids)``."""
    lo, hi = 1, len(ids)
    while lo < hi:  # the shortest prefix whose text reaches ``chars`` characters
        mid = (lo + hi) // 2
        if len(renderer.decode(ids[:mid])) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _conversation_row(renderer: ChatRenderer, messages: Sequence[Message]) -> _Row:
    """The ledger of ``messages`` cut after its last assistant token, which the head reads."""
    ids, ends = _step_ends(renderer, messages, None)
    return _Row(ids, (ends[-1][-1],))


def _pair_rows(tokenizer: Any, template: str | None, example: Any) -> tuple[_Row, _Row, float]:
    """``(chosen, rejected, reward gap)`` of a conversation pair (gap 0) or a mined PreferencePair."""
    if isinstance(example, PreferencePair):
        chosen, rejected = (_Row(tuple(t.token_ids[: t.turns[-1].end]), (t.turns[-1].end - 1,))
                            for t in (example.chosen, example.rejected))  # fmt: skip
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
    return (_conversation_row(renderer, [*example.prompt, *example.chosen]),
            _conversation_row(renderer, [*example.prompt, *example.rejected]), 0.0)  # fmt: skip


def _collate(rows: Sequence[_Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids_B_T, attention_B_T)``."""
    width = max(len(r.ids) for r in rows)
    ids_B_T = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_B_T = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_B_T[b, : len(row.ids)], attention_B_T[b, : len(row.ids)] = torch.tensor(row.ids), 1
    return ids_B_T.to(device), attention_B_T.to(device)


def _end_scores(model: ValueModel, rows: Sequence[_Row], pad_id: int, device: Any, precision: str = "fp32"
                ) -> torch.Tensor:  # fmt: skip
    """The head's value on the hidden state at every row's ``ends``, flattened in row order: ``(N,)``."""
    ids_B_T, attention_B_T = _collate(rows, pad_id, torch.device(device))
    row_N = torch.tensor([b for b, r in enumerate(rows) for _ in r.ends], device=ids_B_T.device)
    end_N = torch.tensor([e for r in rows for e in r.ends], device=ids_B_T.device)
    with optim.autocast(precision, device):
        out = model.backbone(input_ids=ids_B_T, attention_mask=attention_B_T, use_cache=False)
        return model.head(out.last_hidden_state[row_N, end_N]).squeeze(-1).float()


# ---- the loops ------------------------------------------------------------------------------------
_BatchLoss = Callable[[Sequence[int]], tuple[torch.Tensor, dict[str, float]]]
"""The mean loss of one batch's rows (with grad) and its StepLog statistics."""


@dataclass(frozen=True)
class StepLog:
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


@dataclass(frozen=True)
class RewardModelResult:
    """The trained :class:`ValueModel` (train mode), its tokenizer, the log, the last checkpoint (None
    without ``output_dir``), the examples trained on, and how many were longer than ``max_seq_len``."""

    model: ValueModel
    tokenizer: Any
    history: tuple[StepLog, ...]
    checkpoint: Path | None
    num_examples: int
    num_cut: int


def train_reward_model(
    config: RewardModelConfig,
    data: Iterable[PreferenceConversation | PreferencePair],
    on_step: Callable[[StepLog], None] | None = None,
) -> RewardModelResult:
    """Train a Bradley–Terry reward model: each step scores ``batch_size`` pairs and minimises
    :func:`bradley_terry_loss` averaged over them; ``on_step`` gets each :class:`StepLog`.

    ``data``: :class:`~agentrl.learners.dpo.PreferenceConversation` s (e.g. from
    :func:`~agentrl.learners.dpo.read_preference_jsonl`) or :class:`~agentrl.data.buffer.PreferencePair` s
    mined from a buffer (scored on their own ledgers).

    Raises:
        ConfigError: an example that is not a pair, or no pair whose both sides fit ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens.
    """
    optim.seed_everything(config.seed)
    model, tokenizer = _load_trainable(config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [_pair_rows(tokenizer, config.template, e) for e in data]
    kept = [p for p in pairs if max(p[0].ends[0], p[1].ends[0]) < config.max_seq_len]
    if not kept:
        raise ConfigError(
            f"none of the {len(pairs)} pairs fits max_seq_len={config.max_seq_len}; raise max_seq_len"
        )

    def batch_loss(index: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [kept[i][0] for i in index] + [kept[i][1] for i in index]
        scores_N = _end_scores(model, rows, pad_id, config.device, config.precision)
        chosen_B, rejected_B = scores_N[: len(index)], scores_N[len(index) :]
        margin_B = config.margin_scale * torch.tensor([kept[i][2] for i in index], device=scores_N.device)
        loss = bradley_terry_loss(chosen_B, rejected_B, margin_B, config.center_coef).mean()
        delta_B = (chosen_B - rejected_B).detach()
        return loss, {"accuracy": float((delta_B > 0).float().mean()), "margin": float(delta_B.mean())}

    history, checkpoint = _fit(config, model, tokenizer, len(kept), batch_loss, _LEARNERS["orm"], on_step)
    return RewardModelResult(model, tokenizer, history, checkpoint, len(kept), len(pairs) - len(kept))


def train_process_reward_model(
    config: ProcessRewardConfig,
    data: Iterable[StepLabelledConversation],
    on_step: Callable[[StepLog], None] | None = None,
) -> RewardModelResult:
    """Train a process reward model on :class:`StepLabelledConversation` s (e.g. from
    :func:`read_step_labels_jsonl`): each step scores every labelled step of ``batch_size`` conversations
    and minimises :func:`step_bce_loss` averaged over those steps; ``on_step`` gets each :class:`StepLog`.

    Raises:
        ConfigError: a label count that does not match (naming the example), or no labelled step within
            ``max_seq_len``.
        TemplateError: the chat template cannot reproduce the rollout's tokens, or (with a separator)
            does not render assistant content verbatim.
    """
    optim.seed_everything(config.seed)
    model, tokenizer = _load_trainable(config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, num_cut = _step_rows(config, tokenizer, list(data))

    def batch_loss(index: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [rows[i] for i in index]
        logits_N = _end_scores(model, batch, pad_id, config.device, config.precision)
        labels_N = torch.tensor([x for r in batch for x in r.labels], device=logits_N.device)
        loss = step_bce_loss(logits_N, labels_N).mean()
        logits, good = logits_N.detach(), labels_N >= 0.5
        both = bool(good.any() and (~good).any())
        margin = float(logits[good].mean() - logits[~good].mean()) if both else math.nan
        return loss, {"accuracy": float(((logits > 0) == good).float().mean()), "margin": margin}

    history, checkpoint = _fit(config, model, tokenizer, len(rows), batch_loss, _LEARNERS["prm"], on_step)
    return RewardModelResult(model, tokenizer, history, checkpoint, len(rows), num_cut)


def _step_rows(config: ProcessRewardConfig, tokenizer: Any, examples: Sequence[StepLabelledConversation]
               ) -> tuple[list[_Row], int]:  # fmt: skip
    """One row per conversation with a labelled step within ``max_seq_len``; and how many were cut."""
    rows, num_cut = [], 0
    for n, example in enumerate(examples):
        try:
            _check_labels(example, config.step_separator)
        except ValueError as exc:
            raise ConfigError(f"example {n}: {exc}") from None
        renderer = ChatRenderer(tokenizer, example.tools, config.template)
        ids, ends = _step_ends(renderer, example.messages, config.step_separator)
        num_cut += len(ids) > config.max_seq_len
        kept = [(e, float(x)) for e, x in zip((e for turn in ends for e in turn), example.labels, strict=True)
                if x is not None and e < config.max_seq_len]  # fmt: skip
        if kept:
            rows.append(_Row(ids[: config.max_seq_len], tuple(e for e, _ in kept), tuple(x for _, x in kept)))
    if not rows:
        raise ConfigError(f"none of the {len(examples)} conversations has a labelled step within max_seq_len="
                          f"{config.max_seq_len}; raise max_seq_len or label some steps")  # fmt: skip
    return rows, num_cut


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
    learner: str, on_step: Callable[[StepLog], None] | None,
) -> tuple[tuple[StepLog, ...], Path | None]:  # fmt: skip
    """AdamW steps on ``batch_loss`` of seeded batches to ``max_steps``, resuming and checkpointing."""
    optimizer = optim.make_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = optim.make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if config.resume_from is not None:
        step = checkpoints.load_training_state(config.resume_from, optimizer, scheduler).step
    meta = {"config": config.model_dump(mode="json"), "learner": learner}

    history: list[StepLog] = []
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
        log = StepLog(step, loss.item(), **stats, lr=lr, grad_norm=grad_norm, seconds=seconds)
        history.append(log)
        if on_step is not None:
            on_step(log)
        at_save = config.save_every is not None and step % config.save_every == 0
        if config.output_dir is not None and (at_save or step == config.max_steps):
            checkpoint = checkpoints.save_step(config, model, tokenizer, optimizer, scheduler, step, meta)
    return tuple(history), checkpoint
