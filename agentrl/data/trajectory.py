"""The token ledger: one episode exactly as the policy saw and sampled it.

A :class:`Trajectory` is the single record SFT, GRPO, PPO, the DPO family and the eval harness read. Its
invariant, checked on construction: ``loss_mask[i] == 1`` exactly at the positions inside a turn span,
i.e. the tokens the policy sampled. The prompt, tool results, user turns and chat-template glue are 0.

Token ids are never re-tokenized from text: what the sampler returned is what is stored, and what is
stored is what the next turn's prompt was built from, so training sees the sequence inference saw.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentrl._safe_text import escape_surrogates, has_surrogates, valid_json
from agentrl.types import Message, StopReason

__all__ = ["LedgerBuilder", "Trajectory", "TurnSpan", "read_jsonl", "write_jsonl"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TurnSpan:
    """One assistant turn: the half-open range ``[start, end)`` of its sampled tokens, and its reward.

    ``reward`` is what ``env.step`` returned for this turn (process reward, plus the outcome reward on
    the last turn); ``reward_components`` its named parts.
    """

    start: int
    end: int
    reward: float = 0.0
    reward_components: Mapping[str, float] = field(default_factory=dict)

    @property
    def last_token(self) -> int:
        """Index of the turn's last sampled token: where per-turn rewards are placed."""
        return self.end - 1


@dataclass(frozen=True)
class Trajectory:
    """One episode's token ledger.

    Attributes:
        token_ids: the whole sequence, prompt to last sampled token (``T`` tokens).
        logprobs: the sampler's log-probability of each token, aligned with ``token_ids``; 0.0 where
            ``loss_mask`` is 0 (those tokens were not sampled).
        loss_mask: 1 on policy-sampled tokens, 0 elsewhere.
        turns: one :class:`TurnSpan` per assistant turn, in order.
        messages: the same conversation as chat messages, for people, judges and pair mining.
        stop_reason: why the episode ended; see :class:`~agentrl.types.StopReason`.
        error: ``"ExcType: message"`` when ``stop_reason`` is ``ERROR``.
        policy_version: the learner step whose weights sampled the episode (for off-policy accounting).
        trainable: False when the backend could not return token ids/logprobs (e.g. an API model).
        meta: free-form: env id, task id, seed, group id, ...
        sequence_starts: where each independent sequence of a *turn-split* ledger starts (the first is 0);
            empty for the usual ledger, which is one sequence. A turn-split ledger holds one sequence per
            turn, each that turn's prompt exactly as the model saw it followed by its sampled tokens; a
            learner runs each sequence on its own (positions restart, no attention across) while the turn
            spans, rewards and advantages stay those of the one episode.

    Text is valid Unicode: a surrogate code point in ``messages``, ``error``, ``meta`` or a reward component's
    name (from a user env's observation or an exception; :mod:`agentrl.tools` already cleans model text)
    becomes U+FFFD on construction, so the record can be tokenized and written, and reads back equal.
    """

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    loss_mask: Sequence[int]
    turns: Sequence[TurnSpan]
    messages: Sequence[Message] = ()
    stop_reason: StopReason = StopReason.TERMINATED
    error: str | None = None
    policy_version: int = 0
    trainable: bool = True
    meta: Mapping[str, Any] = field(default_factory=dict)
    sequence_starts: Sequence[int] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_reason", StopReason(self.stop_reason))
        _check_ledger(self.token_ids, self.logprobs, self.loss_mask, self.turns)
        if self.sequence_starts:
            object.__setattr__(self, "sequence_starts", tuple(int(s) for s in self.sequence_starts))
            _check_sequences(self.sequence_starts, self.turns, len(self.token_ids))
        for name in ("messages", "error", "meta"):
            if has_surrogates(value := getattr(self, name)):
                object.__setattr__(self, name, valid_json(value))
        if any(has_surrogates(dict(t.reward_components)) for t in self.turns):
            turns = tuple(replace(t, reward_components=valid_json(dict(t.reward_components))) for t in self.turns)
            object.__setattr__(self, "turns", turns)

    # ---- derived views -----------------------------------------------------------------------------
    @property
    def total_reward(self) -> float:
        """Sum of the per-turn rewards (the return with no discounting)."""
        return float(sum(t.reward for t in self.turns))

    @property
    def prompt_length(self) -> int:
        """Tokens before the first sampled token."""
        return self.turns[0].start if self.turns else len(self.token_ids)

    @property
    def num_sampled(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def truncated(self) -> bool:
        return self.stop_reason.is_truncation

    @property
    def positions(self) -> list[int]:
        """Each token's position in its own sequence: ``0..T-1``, restarting at every sequence start of a
        turn-split ledger."""
        positions = list(range(len(self.token_ids)))
        for start, end in zip(self.sequence_starts, [*self.sequence_starts[1:], len(self.token_ids)], strict=True):
            positions[start:end] = range(end - start)
        return positions

    @property
    def turn_versions(self) -> tuple[int, ...]:
        """The weight version that sampled each turn (``meta["turn_versions"]``, written by the runner); a
        ledger without them says ``policy_version`` for every turn. ``policy_version`` is their minimum."""
        versions = self.meta.get("turn_versions")
        if isinstance(versions, list | tuple) and len(versions) == len(self.turns):
            return tuple(int(v) for v in versions)
        return (self.policy_version,) * len(self.turns)

    @property
    def turn_metrics(self) -> tuple[Mapping[str, float], ...]:
        """What the env reported of each turn (``meta["turn_metrics"]``, written by the runner from each step's
        ``info["turn_metrics"]``), one mapping per turn; empty mappings where it reported nothing."""
        reported = self.meta.get("turn_metrics")
        entries = list(reported) if isinstance(reported, list | tuple) else []
        entries = [e if isinstance(e, Mapping) else {} for e in entries[: len(self.turns)]]
        return tuple(entries) + ({},) * (len(self.turns) - len(entries))

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "loss_mask": list(self.loss_mask),
            "turns": [
                {"start": t.start, "end": t.end, "reward": t.reward, "reward_components": dict(t.reward_components)}
                for t in self.turns
            ],
            "messages": [dict(m) for m in self.messages],
            "stop_reason": self.stop_reason.value,
            "error": self.error,
            "policy_version": self.policy_version,
            "trainable": self.trainable,
            "meta": dict(self.meta),
            **({"sequence_starts": list(self.sequence_starts)} if self.sequence_starts else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trajectory:
        if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"trajectory schema {data.get('schema')!r} is not {SCHEMA_VERSION}; upgrade agentrl")
        return cls(
            token_ids=tuple(data["token_ids"]),
            logprobs=tuple(float(x) for x in data["logprobs"]),
            loss_mask=tuple(data["loss_mask"]),
            turns=tuple(TurnSpan(**t) for t in data["turns"]),
            messages=tuple(data.get("messages", ())),
            stop_reason=StopReason(data["stop_reason"]),
            error=data.get("error"),
            policy_version=int(data.get("policy_version", 0)),
            trainable=bool(data.get("trainable", True)),
            meta=dict(data.get("meta", {})),
            sequence_starts=tuple(data.get("sequence_starts", ())),
        )

    def to_json(self) -> str:
        """One line of JSON (no NaN/inf: logprobs must be finite), text readable (``ensure_ascii=False``).

        A surrogate put into a message after construction is written as its escape ``\\udXXX``, so the line
        always encodes as UTF-8.
        """
        return escape_surrogates(json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False))

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls.from_dict(json.loads(line))


def _check_ledger(
    token_ids: Sequence[int], logprobs: Sequence[float], loss_mask: Sequence[int], turns: Sequence[TurnSpan]
) -> None:
    """Raise ValueError unless the ledger's arrays agree with each other and with the turn spans."""
    n = len(token_ids)
    if len(logprobs) != n or len(loss_mask) != n:
        raise ValueError(
            f"ledger arrays differ in length: token_ids {n}, logprobs {len(logprobs)}, loss_mask {len(loss_mask)}"
        )
    expected = [0] * n
    previous_end = 0
    for i, turn in enumerate(turns):
        if not previous_end <= turn.start < turn.end <= n:
            raise ValueError(
                f"turn {i} span [{turn.start}, {turn.end}) is empty, out of order or outside the {n} tokens"
            )
        expected[turn.start : turn.end] = [1] * (turn.end - turn.start)
        previous_end = turn.end
    if list(loss_mask) != expected:
        bad = next(i for i, (m, e) in enumerate(zip(loss_mask, expected, strict=True)) if m != e)
        raise ValueError(f"loss_mask[{bad}] is {loss_mask[bad]} but the turn spans say {expected[bad]}")
    for i, (lp, m) in enumerate(zip(logprobs, loss_mask, strict=True)):
        if not math.isfinite(lp) or lp > 1e-6 or (m == 0 and lp != 0.0):
            raise ValueError(f"logprobs[{i}] = {lp} is not a finite log-probability (0.0 where not sampled)")


def _check_sequences(starts: Sequence[int], turns: Sequence[TurnSpan], n: int) -> None:
    """Raise ValueError unless ``starts`` open sequences that each hold whole turns, each after a prompt."""
    if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)) or starts[-1] >= n:
        raise ValueError(f"sequence_starts {list(starts)} must start at 0 and increase within the {n} tokens")
    for i, turn in enumerate(turns):
        opened = max(s for s in starts if s <= turn.start)
        if opened == turn.start or any(turn.start < s < turn.end for s in starts):
            raise ValueError(f"turn {i} [{turn.start}, {turn.end}) is not inside one sequence after its prompt")


class LedgerBuilder:
    """Accumulates an episode's tokens turn by turn; :meth:`finish` freezes it into a :class:`Trajectory`.

    The runner calls, in order: ``LedgerBuilder(prompt_ids, opening_messages)``, then per turn
    ``add_sampled`` (policy tokens), ``set_reward`` (the env's answer), ``add_observation`` (glue + env
    messages + the next generation prompt, from :class:`agentrl.models.chat.ChatRenderer`) and
    ``add_messages`` (the same turn as text). ``ids[prompt_start:]`` is always the exact prompt for the
    next generation: the whole ledger, or in a turn-split ledger (:meth:`start_sequence` instead of
    ``add_observation``) the turn's own sequence.
    """

    def __init__(self, prompt_ids: Sequence[int], messages: Iterable[Message] = ()):
        self.ids: list[int] = list(prompt_ids)
        self.logprobs: list[float] = [0.0] * len(self.ids)
        self.mask: list[int] = [0] * len(self.ids)
        self.turns: list[TurnSpan] = []
        self.messages: list[Message] = list(messages)
        self.sequence_starts: list[int] = []
        self.prompt_start = 0

    def start_sequence(self, prompt_ids: Sequence[int]) -> None:
        """Turn-split ledgers: open a new independent sequence with the next turn's whole prompt (mask 0).

        ``ids[prompt_start:]`` is then the exact prompt of the next generation.
        """
        if not self.sequence_starts:
            self.sequence_starts.append(0)
        self.prompt_start = len(self.ids)
        self.sequence_starts.append(self.prompt_start)
        self.add_observation(prompt_ids)

    def add_sampled(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Append one assistant turn's sampled tokens (mask 1). ``logprobs=None``: unknown (untrainable)."""
        if not ids:
            raise ValueError("an assistant turn must contain at least one sampled token")
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} logprobs")
        start = len(self.ids)
        self.ids.extend(ids)
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.mask.extend([1] * len(ids))
        self.turns.append(TurnSpan(start, len(self.ids)))

    def set_reward(self, reward: float, components: Mapping[str, float] | None = None) -> None:
        """Attach the env's reward for the latest turn."""
        if not self.turns:
            raise ValueError("set_reward before any sampled turn")
        last = self.turns[-1]
        self.turns[-1] = TurnSpan(last.start, last.end, float(reward), dict(components or {}))

    def add_observation(self, ids: Sequence[int]) -> None:
        """Append tokens the policy did not sample: template glue, env messages, generation prompt."""
        self.ids.extend(ids)
        self.logprobs.extend([0.0] * len(ids))
        self.mask.extend([0] * len(ids))

    def add_messages(self, messages: Iterable[Message]) -> None:
        """Record the turn as text too (the assistant's message and the env's answer), for people and judges."""
        self.messages.extend(messages)

    def finish(
        self,
        stop_reason: StopReason,
        *,
        error: str | None = None,
        policy_version: int = 0,
        trainable: bool = True,
        meta: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """Freeze the ledger. Trailing observation tokens after the last turn are kept (mask 0)."""
        return Trajectory(
            token_ids=tuple(self.ids),
            logprobs=tuple(self.logprobs),
            loss_mask=tuple(self.mask),
            turns=tuple(self.turns),
            messages=tuple(self.messages),
            stop_reason=stop_reason,
            error=error,
            policy_version=policy_version,
            trainable=trainable,
            meta=dict(meta or {}),
            sequence_starts=tuple(self.sequence_starts),
        )


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory], *, append: bool = False) -> int:
    """Write one trajectory per line; returns how many were written."""
    count = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for trajectory in trajectories:
            f.write(trajectory.to_json() + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Yield trajectories from a JSONL file; a bad line raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Trajectory.from_json(line)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trajectory record: {exc}") from exc
