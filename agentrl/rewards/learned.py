"""Trained reward models as rewards: :class:`RewardModelScorer` (an outcome reward, ``fn(task, answer)``) and
:class:`ProcessRewardScorer` (a process reward, ``fn(task, turn)``), loaded from checkpoints written by
:mod:`agentrl.learners.reward_model` and usable in :class:`~agentrl.rewards.base.RewardSpec`,
:class:`~agentrl.rewards.base.WeightedReward` or a ToolEnv's ``process_reward``.
The trainer shares the rest: conversations as :class:`ScoreRow` s, and the head read on a batch of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import torch

from agentrl.data.batch import collate
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.errors import ConfigError, TemplateError
from agentrl.models.chat import ChatRenderer, demonstration_ledger
from agentrl.models.value_head import VALUE_HEAD_FILE, ValueModel
from agentrl.rewards.base import RewardResult, task_prompt
from agentrl.types import Message, ToolSchema

__all__ = [
    "PROCESS_REWARD_MODEL",
    "REWARD_MODEL",
    "ProcessRewardScorer",
    "RewardModelScorer",
    "ScoreRow",
    "conversation_row",
    "default_to_messages",
    "end_scores",
    "score_row",
    "step_cuts",
    "step_ends",
    "turn_to_messages",
]

# The ``learner`` a checkpoint's metadata names, in the file learners.checkpoints writes it to.
REWARD_MODEL, PROCESS_REWARD_MODEL, _STATE_JSON = "reward-model", "process-reward-model", "training_state.json"


# ---- conversations as rows the head reads -------------------------------------------------------
class ScoreRow(NamedTuple):
    """One conversation for the head: its ledger (cut after the last position read), the positions of the
    tokens the head is read at, in order, and their labels (PRM training)."""

    ledger: Trajectory
    ends: tuple[int, ...]
    labels: tuple[float, ...] = ()


def score_row(ledger: Trajectory, ends: Sequence[int], labels: Sequence[float] = ()) -> ScoreRow:
    """The row reading the head at each token of ``ends``: ``ledger`` cut after the last of them."""
    n = max(ends) + 1
    turns = [TurnSpan(t.start, min(t.end, n)) for t in ledger.turns if t.start < n]
    cut = Trajectory(ledger.token_ids[:n], ledger.logprobs[:n], ledger.loss_mask[:n], turns)
    return ScoreRow(cut, tuple(ends), tuple(labels))


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def step_cuts(message: Mapping[str, Any], separator: str | None) -> list[int]:
    """Where each step of an assistant message's content ends (after its separator), as character offsets;
    one step at least, and with ``separator=None`` the whole message is one."""
    content = _content(message)
    if separator is None:
        return [len(content)]
    cuts, pos = [], 0
    pieces = content.split(separator)
    for i, piece in enumerate(pieces):
        pos += len(piece) + (len(separator) if i + 1 < len(pieces) else 0)
        if piece.strip():
            cuts.append(pos)
    return cuts or [len(content)]


def step_ends(
    renderer: ChatRenderer, messages: Sequence[Message], separator: str | None
) -> tuple[Trajectory, list[list[int]]]:
    """The conversation's ledger and, per assistant turn, the position of each step's last token (the last
    step ends with the end-of-turn token).

    Raises:
        ConfigError: no assistant message.
        TemplateError: with a separator, the template does not render an assistant message's content verbatim.
    """
    ledger = demonstration_ledger(renderer, messages)
    assistants = [m for m in messages if m.get("role") == "assistant"]
    ends: list[list[int]] = []
    for span, message in zip(ledger.turns, assistants, strict=True):
        cuts, ids = step_cuts(message, separator), ledger.token_ids[span.start : span.end]
        turn_ends = [span.end - 1]
        if len(cuts) > 1:
            offset = renderer.decode(ids).find(_content(message))
            if offset < 0:
                raise TemplateError(
                    "the chat template does not render an assistant message's content verbatim, so its steps "
                    "cannot be found; set step_separator=None (one score per turn) or pass template='chatml'"
                )
            turn_ends[:0] = [span.start + _token_at(renderer, ids, offset + cut) for cut in cuts[:-1]]
        ends.append(turn_ends)
    return ledger, ends


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


def conversation_row(renderer: ChatRenderer, messages: Sequence[Message]) -> ScoreRow:
    """``messages`` read at its last assistant token; later messages are not part of the row."""
    ledger = demonstration_ledger(renderer, messages)
    return score_row(ledger, (ledger.turns[-1].last_token,))


def end_scores(model: ValueModel, rows: Sequence[ScoreRow], device: Any) -> torch.Tensor:
    """The head's score at every row's ``ends``, flattened in row order: ``(N,)``, from one batch of the
    rows' ledgers (:func:`~agentrl.data.batch.collate`; padding is masked and never read)."""
    scores_B_T = model.scores(collate([r.ledger for r in rows]).to_torch(device))
    row_N = torch.tensor([b for b, r in enumerate(rows) for _ in r.ends], device=scores_B_T.device)
    end_N = torch.tensor([e for r in rows for e in r.ends], device=scores_B_T.device)
    return scores_B_T[row_N, end_N]


# ---- scorers ------------------------------------------------------------------------------------
def default_to_messages(task: Any, answer: Any) -> list[Message]:
    """``[user: task_prompt(task), assistant: str(answer)]``: what an outcome reward's ``(task, answer)``
    becomes. Train the reward model on conversations of this shape, or pass your own ``to_messages`` (e.g.
    one adding the env's system prompt)."""
    return [{"role": "user", "content": task_prompt(task)}, {"role": "assistant", "content": str(answer)}]


def turn_to_messages(task: Any, turn: Any) -> list[Message]:
    """A :class:`~agentrl.toolenv.Turn` as messages: the task's prompt, each earlier turn's text and its
    tool results, then ``turn.text`` (scored). The env's system prompt, parse errors and nudges are not
    rebuilt; pass your own ``to_messages`` when the PRM was trained with them."""
    messages: list[Message] = [{"role": "user", "content": task_prompt(task)}]
    for earlier in getattr(turn, "earlier", ()):
        messages.append({"role": "assistant", "content": earlier.text})
        messages += [{"role": "tool", "content": call.content} for call in earlier.calls]
    return [*messages, {"role": "assistant", "content": turn.text}]


_ToMessages = Callable[[Any, Any], Sequence[Message]]
"""``(task, answer_or_turn) -> messages`` for a scorer."""
_S = TypeVar("_S", bound="_Scorer")


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


class _Scorer:
    """A trained :class:`ValueModel` (put in eval mode) and how conversations are rendered for it."""

    learner = REWARD_MODEL

    def __init__(self, model: ValueModel, tokenizer: Any, *, to_messages: _ToMessages,
                 template: str | None = None, tools: Sequence[ToolSchema] = (), batch_size: int = 16,
                 name: str = "reward_model"):  # fmt: skip
        self.model, self.tokenizer, self.to_messages = model.eval(), tokenizer, to_messages
        self.template, self.tools, self.batch_size, self.name = template, tuple(tools), batch_size, name

    @classmethod
    def from_pretrained(cls: type[_S], path: str | Path, device: Any = "cpu", **options: Any) -> _S:
        """Load a directory written by the matching trainer; ``template`` (and a PRM's ``separator``)
        default to those it was trained with; ``options`` go to the constructor.

        Raises:
            ConfigError: ``path`` holds no trained head, or the other kind of reward model.
        """
        from agentrl.models.loading import load_tokenizer, resolve_model

        resolved = Path(resolve_model(path))
        if not (resolved / VALUE_HEAD_FILE).is_file():
            raise ConfigError(
                f"{path} has no {VALUE_HEAD_FILE}, so it is not a trained reward model; pass a directory written "
                "by train_reward_model or train_process_reward_model (e.g. <output_dir>/step-000200)"
            )
        state = resolved / _STATE_JSON
        meta = json.loads(state.read_text(encoding="utf-8")).get("meta", {}) if state.is_file() else {}
        if meta.get("learner", cls.learner) != cls.learner:
            right = "RewardModelScorer" if meta["learner"] == REWARD_MODEL else "ProcessRewardScorer"
            raise ConfigError(f"{path} holds a {meta['learner']}; load it with {right}.from_pretrained")
        trained = meta.get("config", {})
        options.setdefault("template", trained.get("template"))
        if cls.learner == PROCESS_REWARD_MODEL:
            options.setdefault("separator", trained.get("step_separator"))
        return cls(ValueModel.from_pretrained(resolved, device), load_tokenizer(resolved), **options)

    def _renderer(self) -> ChatRenderer:
        return ChatRenderer(self.tokenizer, self.tools, self.template)

    @torch.no_grad()
    def _scores(self, rows: Sequence[ScoreRow]) -> list[float]:
        """The head's values at every row's ends, in order, ``batch_size`` rows per forward pass."""
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            out += end_scores(self.model, rows[i : i + self.batch_size], device).tolist()
        return out


class RewardModelScorer(_Scorer):
    """A trained reward model as an outcome reward: ``scorer(task, answer) -> RewardResult``.

    Args:
        model / tokenizer: a trained :class:`ValueModel` and its tokenizer; or use ``from_pretrained(path)``.
        to_messages: ``(task, answer) -> messages`` for answers that are not a message list already.
        template / tools: how conversations are rendered; keep them as in training.
        batch_size: conversations per forward pass. name: the component name of the result.
    """

    def __init__(self, model: ValueModel, tokenizer: Any, *, to_messages: _ToMessages = default_to_messages,
                 **options: Any):  # fmt: skip
        super().__init__(model, tokenizer, to_messages=to_messages, **options)

    def score_conversations(self, conversations: Sequence[Sequence[Message]]) -> list[float]:
        """Each conversation's score, read at its last assistant token (later messages are ignored).

        Raises:
            ConfigError: a conversation has no assistant message.
        """
        renderer = self._renderer()
        return self._scores([conversation_row(renderer, m) for m in conversations])

    def __call__(self, task: Any, answer_or_messages: Any) -> RewardResult:
        """Score a message list as it is, anything else as ``to_messages(task, answer_or_messages)``."""
        given = answer_or_messages
        (score,) = self.score_conversations([given if _is_messages(given) else self.to_messages(task, given)])
        return RewardResult.single(self.name, score)


class ProcessRewardScorer(_Scorer):
    """A trained process reward model as a per-turn reward: ``scorer(task, turn) -> RewardResult``.

    A step's score is ``sigmoid(logit)``, the probability that it is good. A turn's reward reduces its
    steps' scores with ``reduce`` (``"min"``: as good as its worst step; ``"mean"``; ``"last"``); the
    result's ``info["steps"]`` lists them.

    Args:
        separator: the ``step_separator`` it was trained with (None: one score per turn).
        to_messages: ``(task, turn) -> messages`` whose last assistant message is the turn, for turns that
            are not such a message list already; by default :func:`turn_to_messages` (a ToolEnv Turn).
        model / tokenizer / template / tools / batch_size / name: as for :class:`RewardModelScorer`.
    """

    learner = PROCESS_REWARD_MODEL

    def __init__(self, model: ValueModel, tokenizer: Any, *, separator: str | None = None,
                 reduce: Literal["min", "mean", "last"] = "min", name: str = "process_reward",
                 to_messages: _ToMessages = turn_to_messages, **options: Any):  # fmt: skip
        if reduce not in ("min", "mean", "last"):
            raise ConfigError(f"reduce={reduce!r} is not one of 'min', 'mean', 'last'")
        super().__init__(model, tokenizer, to_messages=to_messages, name=name, **options)
        self.separator, self.reduce = separator, reduce

    def step_scores(self, messages: Sequence[Message]) -> list[list[float]]:
        """Per assistant turn, each step's score (read before anything after the step).

        Raises:
            ConfigError: no assistant message.
        """
        ledger, ends = step_ends(self._renderer(), messages, self.separator)
        flat = iter(torch.sigmoid(torch.tensor(self._scores([score_row(ledger, [e for t in ends for e in t])]))))
        return [[float(next(flat)) for _ in turn] for turn in ends]

    def __call__(self, task: Any, turn: Any) -> RewardResult:
        """Score a turn's steps (its last assistant message) and reduce them to the turn's reward."""
        steps = self.step_scores(turn if _is_messages(turn) else self.to_messages(task, turn))[-1]
        value = {"min": min(steps), "mean": sum(steps) / len(steps), "last": steps[-1]}[self.reduce]
        return RewardResult.single(self.name, value, steps=steps)
