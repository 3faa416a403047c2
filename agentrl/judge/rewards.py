"""A judge where the rest of the toolkit takes rewards and preferences (RLAIF).

- :class:`JudgeReward`: an outcome reward ``fn(task, answer) -> RewardResult`` for
  :class:`~agentrl.rewards.base.RewardSpec` / ``WeightedReward`` (one call per answer);
- :class:`JudgeGroupReward`: adds the judge's score to every sampled episode of an RL step, all calls of
  the step in one batch (``train_grpo(..., rescore=...)``); a failed call gets the group's mean score, so
  it moves no advantage, and is counted;
- :class:`JudgeScorer`: a group scorer for online / iterative DPO (``train_online_dpo(config, scorer)``);
- :func:`label_pairs`: AI preference labels for pairs mined from groups or sampled fresh
  (:func:`candidate_pairs`): the judge keeps, swaps or drops each pair.

What the judge reads of an episode: the conversation before the first assistant turn without its system
messages (the task, not the tool-format instructions), and the rest as the response
(:func:`episode_item`); pass ``to_item`` to change that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentrl.data.buffer import PreferencePair, TrajectoryGroup, mine_pair, with_final_reward
from agentrl.data.trajectory import Trajectory
from agentrl.judge.judge import Judge, PairVerdict
from agentrl.judge.verdicts import transcript
from agentrl.rewards.base import RewardResult, task_prompt
from agentrl.types import Message

__all__ = [
    "JudgeGroupReward",
    "JudgeReward",
    "JudgeScorer",
    "LabelledPairs",
    "candidate_pairs",
    "conversation_item",
    "episode_item",
    "label_pairs",
]

ToItem = Callable[[Trajectory], tuple[Any, str]]


def episode_item(trajectory: Trajectory) -> tuple[list[Message], str]:
    """``(task messages, response text)`` of an episode: see :func:`conversation_item`."""
    return conversation_item(trajectory.messages)


def conversation_item(conversation: Sequence[Message]) -> tuple[list[Message], str]:
    """``(task messages, response text)`` of a conversation: the messages before its first assistant turn
    without system messages, and everything from that turn on (one assistant message: its text)."""
    messages = list(conversation)
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    prompt = [m for m in messages[:first] if m["role"] != "system"]
    rest = messages[first:]
    response = str(rest[0].get("content") or "") if len(rest) == 1 else transcript(rest)
    return prompt, response


class JudgeReward:
    """A judge as an outcome reward: ``reward(task, answer) -> RewardResult`` with the score in [0, 1].

    A failed verdict scores ``failure_value`` and its result's ``info`` holds the error and raw text.

    Args:
        judge: the :class:`~agentrl.judge.Judge`.
        name: the component name. prompt_of: ``task -> prompt`` (default: ``task_prompt``).
    """

    def __init__(self, judge: Judge, name: str = "judge", *, prompt_of: Callable[[Any], Any] = task_prompt,
                 failure_value: float = 0.0):  # fmt: skip
        self.judge, self.name, self.prompt_of, self.failure_value = judge, name, prompt_of, failure_value

    def __call__(self, task: Any, answer: Any) -> RewardResult:
        (verdict,) = self.judge.score([(self.prompt_of(task), str(answer))])
        if verdict.ok:
            assert verdict.score is not None
            return RewardResult.single(self.name, verdict.score, raw=verdict.raw)
        return RewardResult.single(self.name, self.failure_value, error=verdict.error, raw=verdict.raw)


def _neutral_fill(scores: list[float | None]) -> list[float]:
    """Failed scores replaced by the mean of the others (0.5 when all failed): no effect on a baseline."""
    ok = [s for s in scores if s is not None]
    fill = sum(ok) / len(ok) if ok else 0.5
    return [fill if s is None else s for s in scores]


def _episodes(groups: Sequence[TrajectoryGroup]) -> list[tuple[int, int]]:
    return [(g, i) for g, group in enumerate(groups) for i, t in enumerate(group) if t.turns]


class JudgeScorer:
    """Scores each trajectory of a group with a judge (a ``GroupScorer`` for online / iterative DPO).

    ``mode="pointwise"``: each episode's score; ``"pairwise"``: each episode's mean preference against
    every other of its group (G(G-1) calls per group, both orders). A failed verdict is left out of a
    mean, and an episode with none gets the group's mean.
    """

    def __init__(self, judge: Judge, mode: Literal["pointwise", "pairwise"] = "pointwise", *,
                 to_item: ToItem = episode_item):  # fmt: skip
        if mode not in ("pointwise", "pairwise"):
            raise ValueError(f"mode must be 'pointwise' or 'pairwise', got {mode!r}")
        self.judge, self.mode, self.to_item = judge, mode, to_item

    def __call__(self, group: TrajectoryGroup) -> list[float]:
        return self.score_groups([group])[0]

    def score_groups(self, groups: Sequence[TrajectoryGroup]) -> list[list[float]]:
        """Scores of every trajectory of every group (one batch of judge calls); an episode with no turn
        or no verdict gets its group's mean."""
        return [_neutral_fill(row) for row in self.raw_scores(groups)]

    def raw_scores(self, groups: Sequence[TrajectoryGroup]) -> list[list[float | None]]:
        """Like :meth:`score_groups`, with None where an episode got no score."""
        if self.mode == "pairwise":
            return self._pairwise(groups)
        keys = _episodes(groups)
        verdicts = self.judge.score([self.to_item(groups[g].trajectories[i]) for g, i in keys])
        raw: list[list[float | None]] = [[None] * len(group) for group in groups]
        for (g, i), verdict in zip(keys, verdicts, strict=True):
            raw[g][i] = verdict.score
        return raw

    def _pairwise(self, groups: Sequence[TrajectoryGroup]) -> list[list[float | None]]:
        questions, where = [], []
        for g, group in enumerate(groups):
            items = [self.to_item(t) if t.turns else None for t in group]
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    if items[i] is not None and items[j] is not None:
                        prompt, first = items[i]  # type: ignore[misc]
                        questions.append((prompt, first, items[j][1]))  # type: ignore[index]
                        where.append((g, i, j))
        sums = [[[0.0, 0] for _ in group] for group in groups]
        for (g, i, j), verdict in zip(where, self.judge.compare(questions), strict=True):
            if verdict.preference is not None:
                for k, p in ((i, verdict.preference), (j, 1.0 - verdict.preference)):
                    sums[g][k][0] += p
                    sums[g][k][1] += 1
        return [[s / n if n else None for s, n in row] for row in sums]  # type: ignore[misc]


class JudgeGroupReward:
    """Adds ``weight x`` the judge's score to the last turn of every episode of an RL step, as the reward
    component ``name`` (``train_grpo(config, rescore=JudgeGroupReward(judge, 0.5))``).

    All episodes of the step are judged in one batch. A failed verdict adds the group's mean judge score
    (no effect on group-relative advantages); :attr:`failures` counts them, and each episode's
    ``meta[name]`` holds its score and whether it failed.
    """

    def __init__(self, judge: Judge, weight: float = 1.0, name: str = "judge", *,
                 mode: Literal["pointwise", "pairwise"] = "pointwise", to_item: ToItem = episode_item):  # fmt: skip
        self.scorer = JudgeScorer(judge, mode, to_item=to_item)
        self.judge, self.weight, self.name = judge, float(weight), name
        self.failures = self.episodes = 0

    def __call__(self, groups: Sequence[TrajectoryGroup]) -> list[TrajectoryGroup]:
        raw = self.scorer.raw_scores(groups)
        self.failures += sum(s is None for row in raw for s in row)
        self.episodes += sum(len(group) for group in groups)
        out = []
        for group, row in zip(groups, raw, strict=True):
            filled = _neutral_fill(row)
            out.append(group.replace(_judged(t, self.name, self.weight * f, f, s is None)
                                     for t, f, s in zip(group, filled, row, strict=True)))  # fmt: skip
        return out


def _judged(trajectory: Trajectory, name: str, value: float, score: float, failed: bool) -> Trajectory:
    """``value`` added to the last turn's reward, the verdict kept in ``meta[name]`` (episodes with a turn)."""
    if not trajectory.turns:
        return trajectory
    meta = {**trajectory.meta, name: {"score": score, "failed": failed}}
    return dataclasses.replace(with_final_reward(trajectory, name, value), meta=meta)


# ---- AI preference labels ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledPairs:
    """Pairs the judge labelled: ``pairs`` (chosen = the judge's preferred), and how many were kept as they
    were, swapped, dropped as ties (a tie verdict or the two orders disagreeing) or dropped as failures.
    ``verdicts`` holds every pair's verdict, in input order."""

    pairs: tuple[PreferencePair, ...]
    kept: int
    swapped: int
    ties: int
    failed: int
    verdicts: tuple[PairVerdict, ...]

    @property
    def agreement(self) -> float:
        """The share of decided pairs where the judge agreed with the input order."""
        decided = self.kept + self.swapped
        return self.kept / decided if decided else math.nan


def label_pairs(
    judge: Judge, pairs: Sequence[PreferencePair], *, to_item: ToItem = episode_item
) -> LabelledPairs:
    """Let the judge decide each pair's order (both positions asked, so its position bias cancels).

    A pair's texts are its two episodes as ``to_item`` reads them; the pair is kept when the judge prefers
    ``chosen``, swapped when it prefers ``rejected``, dropped on a tie or a failed verdict.
    """
    questions = []
    for pair in pairs:
        prompt, chosen = to_item(pair.chosen)
        questions.append((prompt, chosen, to_item(pair.rejected)[1]))
    verdicts = judge.compare(questions)
    out: list[PreferencePair] = []
    kept = swapped = ties = failed = 0
    for pair, verdict in zip(pairs, verdicts, strict=True):
        if verdict.preference is None:
            failed += 1
        elif verdict.preference > 0.5:
            kept += 1
            out.append(pair)
        elif verdict.preference < 0.5:
            swapped += 1
            out.append(PreferencePair(pair.rejected, pair.chosen, pair.split_turn, pair.prefix_length))
        else:
            ties += 1
    return LabelledPairs(tuple(out), kept, swapped, ties, failed, tuple(verdicts))


def candidate_pairs(groups: Sequence[TrajectoryGroup]) -> list[PreferencePair]:
    """Per group, its first two trainable episodes that differ, as an unlabelled pair for
    :func:`label_pairs` (the order is the sample order, not a preference)."""
    out = []
    for group in groups:
        usable = [t for t in group if t.trainable and t.turns]
        for j in range(1, len(usable)):
            pair = mine_pair(TrajectoryGroup(group.group_id, (usable[0], usable[j])), scores=[1.0, 0.0])
            if pair is not None:
                out.append(pair)
                break
    return out
