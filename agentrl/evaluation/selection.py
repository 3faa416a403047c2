"""Test-time selection beside pass@k: best-of-N with a scorer, and majority vote (maj@k).

Both are estimated for each task from its ``n`` samples, without bias, as the expected value over the
random size-``N`` subsets of them (the same estimand as pass@k, so the three are comparable):

- :func:`best_of_n`: the pass rate of the highest-scoring sample of ``N``. Ties are broken uniformly at
  random (the expected value is computed exactly, not sampled); a sample without a score (the scorer
  failed) ranks below every scored sample, and one is picked only when no scored sample is in the subset.
  Closed form over score levels ``v`` (``m_v`` samples, ``c_v`` of them passed, ``a_v`` scoring lower):
  ``sum_v [C(a_v + m_v, N) - C(a_v, N)] / C(n, N) * c_v / m_v``; without ties this is the sum over the
  sorted samples of ``C(n-1-i, N-1) / C(n, N)`` times the pass of the ``i``-th best.
- :func:`majority_at_k`: the pass of the most frequent answer among ``k`` samples. A sample without an
  extractable answer does not vote; a subset with no votes fails; a tie between answers is broken
  uniformly at random. An answer's pass is the share of the task's samples giving it that passed (all or
  none of them, unless the pass rule looks past the answer, e.g. at a format or tool-error penalty).
  Computed exactly by a dynamic program over answer counts (see :func:`majority_at_k`).

Scores come from a source named ``prefix:argument`` (``--best-of-n-by``), made by a factory in
:data:`SCORER_SOURCES`: ``component:<name>`` reads a reward component the episodes already hold;
``rm:<path>`` scores each episode's conversation with a trained reward model; ``judge:<model>`` with an
LLM judge (:class:`JudgeSource`). A new source is one entry
there: a factory ``(argument, config) -> Scorer`` whose object scores conversations. Scores of conversation
scorers are kept in ``<out>/scores.json``, keyed by the source and a digest of each episode's messages, so
``--report-only`` with the same source reuses them (delete the file to score again, e.g. after retraining a
reward model in place).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError
from agentrl.evaluation.metrics import TaskResult, bootstrap_ci
from agentrl.rewards.answers import extract_answer
from agentrl.types import Message

if TYPE_CHECKING:
    from agentrl.evaluation.config import EvalConfig

__all__ = [
    "SCORER_SOURCES",
    "SCORES_FILE",
    "Candidate",
    "ComponentScorer",
    "EpisodeScorer",
    "JudgeSource",
    "RewardModelSource",
    "Scorer",
    "best_of_n",
    "check_scorer_spec",
    "check_source",
    "episode_answers",
    "episode_scores",
    "final_answer",
    "majority_at_k",
    "make_scorer",
    "normalize_answer",
    "score_all",
    "selection_metrics",
    "task_selection",
]

SCORES_FILE = "scores.json"
Key = tuple[int, int]
"""(task index, sample index)."""


# ---------------------------------------------------------------------------------------------- the math
@dataclass(frozen=True)
class Candidate:
    """One sample of a task as selection sees it: did it pass, its score (None: the scorer failed), and its
    normalised final answer (None: none could be extracted)."""

    passed: bool
    score: float | None = None
    answer: str | None = None


def _check_budget(name: str, n: int, budget: int) -> None:
    if not 1 <= budget <= n:
        raise ValueError(f"{name}: {budget} must be between 1 and the n={n} samples drawn; draw more samples")


def _all_within(pool: int, n: int, size: int) -> float:
    """``C(pool, size) / C(n, size)``: the chance that a random ``size``-subset of ``n`` items lies within a
    given ``pool`` of them, as a product (no huge binomials)."""
    if pool < size:
        return 0.0
    return float(
        np.prod((pool - np.arange(size, dtype=np.float64)) / (n - np.arange(size, dtype=np.float64)))
    )


def best_of_n(candidates: Sequence[Candidate], n: int) -> float:
    """The expected pass of the highest-scoring of ``n`` samples drawn without replacement from these.

    Ties are broken uniformly at random; unscored (and non-finite) scores rank below every finite score.

    Raises:
        ValueError: ``n`` outside ``[1, len(candidates)]``.
    """
    total = len(candidates)
    _check_budget("best-of-N", total, n)
    levels: dict[float, list[int]] = {}  # score level -> [samples, passed]; unscored is level -inf
    for c in candidates:
        level = c.score if c.score is not None and math.isfinite(c.score) else -math.inf
        counts = levels.setdefault(level, [0, 0])
        counts[0] += 1
        counts[1] += int(c.passed)
    value, below = 0.0, 0
    for level in sorted(levels):
        m, passed = levels[level]
        top_here = _all_within(below + m, total, n) - _all_within(below, total, n)
        value += top_here * passed / m
        below += m
    return value


def _binomial_pmf(m: int, q: float) -> np.ndarray:
    """``P(i of m included)`` for ``i = 0..m`` when each is included with probability ``q`` (0 < q < 1)."""
    log_choose = np.concatenate(([0.0], np.cumsum(np.log(np.arange(m, 0, -1) / np.arange(1, m + 1)))))
    i = np.arange(m + 1)
    return np.asarray(np.exp(log_choose + i * math.log(q) + (m - i) * math.log1p(-q)))


def _others_stay_below(j: int, rest: int, others: Mapping[int, int], non_voters: int, q: float) -> float:
    """The weight of the other samples filling ``rest`` places while no other answer passes ``j`` votes,
    a tie with ``t`` other answers at ``j`` counting ``1/(1+t)`` (a fair draw among ``t+1``).

    ``others`` counts the other answers by size; answers smaller than ``j`` cannot reach it, so they pool
    with the non-voters. Samples are included independently with probability ``q`` (the caller conditions
    on the subset's size).
    """
    rivals = [size for size, count in others.items() if size >= j for _ in range(count)]
    free = non_voters + sum(size * count for size, count in others.items() if size < j)
    width = rest + 1
    weight_S_T = np.zeros((width, len(rivals) + 1))  # [places filled, rivals tied at j]
    pmf_free = _binomial_pmf(free, q)
    weight_S_T[: min(width, free + 1), 0] = pmf_free[:width]
    for size in rivals:
        pmf = _binomial_pmf(size, q)
        below = pmf[: min(j, width)]  # fewer votes than the winner
        if len(below) <= weight_S_T.shape[1]:  # fewer shifts than columns: add shifted copies
            new_S_T = np.zeros_like(weight_S_T)
            for i, p in enumerate(below):
                new_S_T[i:, :] += p * weight_S_T[: width - i, :]
        else:
            new_S_T = np.stack([np.convolve(column, below)[:width] for column in weight_S_T.T], axis=1)
        if j < width:  # as many: one more tie
            new_S_T[j:, 1:] += pmf[j] * weight_S_T[: width - j, :-1]
        weight_S_T = new_S_T
    return float(weight_S_T[rest] @ (1.0 / np.arange(1, len(rivals) + 2)))


def majority_at_k(candidates: Sequence[Candidate], k: int) -> float:
    """The expected pass of the majority answer of ``k`` samples drawn without replacement from these.

    Exact, not sampled: a uniform ``k``-subset is independent inclusion with probability ``q = k / n``
    conditioned on ``k`` included, so each answer's chance of winning is a sum over its vote count ``j`` of
    binomial terms, with a dynamic program over the other answers that tracks ties at ``j``
    (``O(answers * k^2 * ties)`` arithmetic per task, in numpy), divided by ``P(k included)``.

    Raises:
        ValueError: ``k`` outside ``[1, len(candidates)]``.
    """
    n = len(candidates)
    _check_budget("maj@k", n, k)
    votes: dict[str, list[int]] = {}  # answer -> [samples, passed]
    for c in candidates:
        if c.answer is not None:
            counts = votes.setdefault(c.answer, [0, 0])
            counts[0] += 1
            counts[1] += int(c.passed)
    if not votes:
        return 0.0
    if k == n:  # the whole set: no randomness but the tie-break
        top = max(m for m, _ in votes.values())
        shares = [passed / m for m, passed in votes.values() if m == top]
        return sum(shares) / len(shares)
    q = k / n
    sizes = Counter(m for m, _ in votes.values())
    non_voters = n - sum(sizes[m] * m for m in sizes)
    value = 0.0
    for size in sizes:  # answers of one size win equally often
        share = sum(passed / m for m, passed in votes.values() if m == size)
        others = {s: count - (s == size) for s, count in sizes.items()}
        pmf = _binomial_pmf(size, q)
        win = sum(
            pmf[j] * _others_stay_below(j, k - j, others, non_voters, q) for j in range(1, min(size, k) + 1)
        )
        value += share * win
    return float(value / _binomial_pmf(n, q)[k])


# ---------------------------------------------------------------------------------------------- answers
def normalize_answer(text: str | None) -> str | None:
    """An answer made comparable for voting: surrounding whitespace and ``$`` removed; None when empty."""
    if text is None:
        return None
    cleaned = text.strip(" \t\r\n$")
    return cleaned or None


def final_answer(messages: Sequence[Mapping[str, Any]], fmt: str) -> str | None:
    """The normalised answer in ``fmt`` (see :func:`agentrl.rewards.answers.extract_answer`) of the last
    assistant message; None when there is none or it holds no answer in that format."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return normalize_answer(extract_answer(str(message.get("content") or ""), fmt))
    return None


# ---------------------------------------------------------------------------------------------- scorers
@runtime_checkable
class Scorer(Protocol):
    """Scores finished episodes for best-of-N, one number per conversation (higher is better).

    Each conversation is an episode's messages: the prompt, the policy's turns and the env's observations.
    None marks a conversation the scorer could not score (it then ranks last). Scores are kept in
    ``scores.json``, so the same source is not asked twice about the same episode.
    """

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float | None]: ...


@runtime_checkable
class EpisodeScorer(Protocol):
    """A source that reads what the episodes recorded themselves (no model calls, so never cached)."""

    def score_episodes(self, trajectories: Sequence[Trajectory]) -> list[float | None]: ...


class ComponentScorer:
    """``component:<name>``: an episode's reward component summed over its turns (None where no turn
    reported it, e.g. an episode that ended in an error)."""

    def __init__(self, name: str):
        self.name = name

    def score_episodes(self, trajectories: Sequence[Trajectory]) -> list[float | None]:
        """Raises: ConfigError: no episode reports the component (naming those they report)."""
        scores: list[float | None] = []
        for t in trajectories:
            parts = [float(turn.reward_components[self.name]) for turn in t.turns
                     if self.name in turn.reward_components]  # fmt: skip
            scores.append(math.fsum(parts) if parts else None)
        seen = sorted({name for t in trajectories for turn in t.turns for name in turn.reward_components})
        if seen and all(s is None for s in scores):  # (no components at all: every episode failed)
            raise ConfigError(
                f"--best-of-n-by component:{self.name}: no episode has a reward component by that name; the "
                f"episodes report {', '.join(seen)}. Pass one of those (saved episodes are rescored with "
                "`agentrl eval --report-only --out DIR --best-of-n-by component:NAME`)"
            )
        return scores


class RewardModelSource:
    """``rm:<path>``: a reward model trained by :mod:`agentrl.learners.reward_model`, read at each
    conversation's last assistant token (:meth:`RewardModelScorer.score_conversations`)."""

    def __init__(self, path: str, device: str):
        from agentrl.rewards.learned import RewardModelScorer

        self.scorer = RewardModelScorer.from_pretrained(path, device=device)

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float | None]:
        return [float(s) for s in self.scorer.score_conversations(conversations)]


class JudgeSource:
    """``judge:<model directory or hub id>`` (the ``hf`` backend), ``judge:<base url>#<model>`` (an
    OpenAI-compatible chat endpoint) or ``judge:<judge.yaml>`` (a :class:`~agentrl.judge.config.JudgeConfig`:
    rubric, scale, templates, ...): an LLM judge's pointwise score in [0, 1] of each episode; failed
    verdicts score None. Its answers are cached in ``<out>/judge-cache.jsonl`` unless the config names a
    cache."""

    def __init__(self, argument: str, device: str, cache: Path):
        from agentrl.judge.config import load_judge_config

        source: Any = argument
        if argument.startswith(("http://", "https://")):
            base_url, _, model = argument.partition("#")
            if not model:
                raise ConfigError(
                    f"judge:{argument}: name the served model after '#', e.g. judge:{base_url}#my-judge"
                )
            source = {"base_url": base_url, "model": model}
        config = load_judge_config(source, device=device)
        self.judge = config.build(cache=cache if config.cache is None else None)

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float | None]:
        from agentrl.judge import conversation_item

        return [v.score for v in self.judge.score([conversation_item(c) for c in conversations])]


def _device(config: EvalConfig) -> str:
    if config.device is not None:
        return str(config.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _component_source(argument: str, config: EvalConfig) -> ComponentScorer:
    return ComponentScorer(argument)


def _reward_model_source(argument: str, config: EvalConfig) -> RewardModelSource:
    return RewardModelSource(argument, _device(config))


def _judge_source(argument: str, config: EvalConfig) -> JudgeSource:
    return JudgeSource(argument, _device(config), config.out_dir / "judge-cache.jsonl")


SCORER_SOURCES: dict[str, Callable[[str, EvalConfig], Scorer | EpisodeScorer]] = {
    "component": _component_source,
    "rm": _reward_model_source,
    "judge": _judge_source,
}
"""``--best-of-n-by`` prefixes: ``factory(argument, config)`` makes the scorer (heavy imports inside)."""


def check_scorer_spec(spec: str) -> tuple[str, str]:
    """``"prefix:argument"`` split, the prefix a known source.

    Raises:
        ConfigError: no ``:``, an empty argument, or an unknown prefix.
    """
    prefix, sep, argument = spec.partition(":")
    if not sep or not argument or prefix not in SCORER_SOURCES:
        raise ConfigError(
            f"--best-of-n-by must be SOURCE:ARGUMENT with SOURCE one of {', '.join(SCORER_SOURCES)} (e.g. "
            f"component:correct, rm:<directory of a trained reward model>, judge:<judge model directory or judge.yaml> "
            f"or judge:<base url>#<served model>), got {spec!r}"
        )
    return prefix, argument


def check_source(spec: str) -> None:
    """What can be checked of a scorer before any episode is played, without loading it: a reward model
    directory holds a trained head, a judge config file parses.

    Raises:
        ConfigError: the source cannot work (the message names the fix).
    """
    prefix, argument = check_scorer_spec(spec)
    if prefix == "rm":
        from agentrl.models.value_head import VALUE_HEAD_FILE

        if Path(argument).exists() and not (Path(argument) / VALUE_HEAD_FILE).is_file():
            raise ConfigError(f"--best-of-n-by {spec}: {argument} has no {VALUE_HEAD_FILE}, so it is not a trained "
                              "reward model; pass a directory written by train_reward_model")  # fmt: skip
    elif prefix == "judge" and not argument.startswith(("http://", "https://")):
        from agentrl.judge.config import load_judge_config

        load_judge_config(argument)


def make_scorer(spec: str, config: EvalConfig) -> Scorer | EpisodeScorer:
    """The scorer ``spec`` names (see :data:`SCORER_SOURCES`)."""
    prefix, argument = check_scorer_spec(spec)
    return SCORER_SOURCES[prefix](argument, config)


# ---------------------------------------------------------------------------------------------- scoring
def _digest(messages: Sequence[Mapping[str, Any]]) -> str:
    text = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _read_cache(out: Path) -> dict[str, Any]:
    path = out / SCORES_FILE
    if not path.is_file():
        return {"schema": 1, "sources": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}); delete it and the episodes are scored again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        return {"schema": 1, "sources": {}}
    return data


def _write_cache(out: Path, data: Mapping[str, Any]) -> None:
    path = out / SCORES_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _clean(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ask(
    scorer: Scorer, conversations: list[list[Message]], echo: Callable[[str], None]
) -> list[float | None]:
    """All conversations at once; if that fails, one by one, so one bad conversation fails alone."""
    try:
        scores = list(scorer.score(conversations))
    except Exception as exc:
        echo(f"best-of-N: scoring {len(conversations)} conversations together failed ({type(exc).__name__}: "
             f"{exc}); scoring them one by one")  # fmt: skip
        scores = []
        for conversation in conversations:
            try:
                scores += list(scorer.score([conversation]))[:1] or [None]
            except Exception:
                scores.append(None)
    if len(scores) != len(conversations):
        raise ConfigError(f"the scorer returned {len(scores)} scores for {len(conversations)} conversations")
    return [_clean(s) for s in scores]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _has_reply(trajectory: Trajectory) -> bool:
    return any(m.get("role") == "assistant" for m in trajectory.messages)


def score_all(
    scorer: Scorer | EpisodeScorer,
    trajectories: Sequence[Trajectory],
    echo: Callable[[str], None] = _to_stderr,
) -> dict[Key, float | None]:
    """Every episode's score, by (task, sample); an episode without an assistant message is not sent to a
    conversation scorer (it scores None)."""
    from agentrl.evaluation.store import episode_key

    keys = [episode_key(t) for t in trajectories]
    if isinstance(scorer, EpisodeScorer):
        return dict(zip(keys, [_clean(s) for s in scorer.score_episodes(trajectories)], strict=True))
    asked = [i for i, t in enumerate(trajectories) if _has_reply(t)]
    values: list[float | None] = [None] * len(trajectories)
    if asked:
        fresh = _ask(scorer, [list(trajectories[i].messages) for i in asked], echo)
        for i, score in zip(asked, fresh, strict=True):
            values[i] = score
    return dict(zip(keys, values, strict=True))


def episode_scores(
    config: EvalConfig, trajectories: Sequence[Trajectory], echo: Callable[[str], None] = _to_stderr
) -> dict[Key, float | None]:
    """Each episode's score under ``config.best_of_n_by``, reusing and extending ``<out>/scores.json``
    (conversation scorers only: an :class:`EpisodeScorer` reads the episodes each time).

    Failed scores (None) are not kept, so a later run asks again.
    """
    from agentrl.evaluation.store import episode_key

    spec = config.best_of_n_by
    assert spec is not None, "episode_scores needs config.best_of_n_by"
    out = config.out_dir
    cache = _read_cache(out)
    kept = cache["sources"].setdefault(spec, {})
    scores: dict[Key, float | None] = {episode_key(t): None for t in trajectories}
    missing: list[tuple[str, Trajectory, str]] = []
    for t in trajectories:
        key, digest = episode_key(t), _digest(t.messages)
        entry = kept.get(f"{key[0]}/{key[1]}")
        if isinstance(entry, Mapping) and entry.get("digest") == digest:
            scores[key] = _clean(entry.get("score"))
        elif _has_reply(t):
            missing.append((f"{key[0]}/{key[1]}", t, digest))
    reused = len(trajectories) - len(missing)
    if not missing and any(score is not None for score in scores.values()):
        echo(f"best-of-N by {spec}: every score from {out / SCORES_FILE}")
        return scores
    scorer = make_scorer(spec, config)
    if isinstance(scorer, EpisodeScorer):
        return score_all(scorer, trajectories, echo)
    fresh = score_all(scorer, [t for _, t, _ in missing], echo)
    for (name, t, digest), score in zip(missing, fresh.values(), strict=True):
        scores[episode_key(t)] = score
        if score is not None:
            kept[name] = {"digest": digest, "score": score}
    _write_cache(out, cache)
    failed = sum(s is None for s in fresh.values())
    echo(f"best-of-N by {spec}: scored {len(missing)} episodes now ({failed} failed); {reused} kept "
         f"from {out / SCORES_FILE} or without a reply")  # fmt: skip
    return scores


def episode_answers(config: EvalConfig, trajectories: Sequence[Trajectory]) -> dict[Key, str | None]:
    """Each episode's normalised final answer in ``config.answer_format``."""
    from agentrl.evaluation.store import episode_key

    return {episode_key(t): final_answer(t.messages, config.answer_format) for t in trajectories}


# ---------------------------------------------------------------------------------------------- results
def _candidates(
    task: TaskResult, scores: Mapping[Key, float | None] | None, answers: Mapping[Key, str | None] | None
) -> list[Candidate]:
    return [
        Candidate(
            s.passed,
            (scores or {}).get((s.task_index, s.sample_index)),
            (answers or {}).get((s.task_index, s.sample_index)),
        )
        for s in task.samples
    ]


def task_selection(
    task: TaskResult,
    ks: Sequence[int],
    scores: Mapping[Key, float | None] | None,
    answers: Mapping[Key, str | None] | None,
) -> dict[str, Any]:
    """One task's ``best_of_n`` / ``maj_at_k`` by k (those with ``k <= n``), for ``results.json``."""
    candidates = _candidates(task, scores, answers)
    entry: dict[str, Any] = {}
    if scores is not None:
        entry["best_of_n"] = {str(k): best_of_n(candidates, k) for k in ks if k <= task.n}
    if answers is not None:
        entry["maj_at_k"] = {str(k): majority_at_k(candidates, k) for k in ks if k <= task.n}
    return entry


def selection_metrics(
    config: EvalConfig,
    tasks: Sequence[TaskResult],
    scores: Mapping[Key, float | None] | None,
    answers: Mapping[Key, str | None] | None,
) -> dict[str, Any]:
    """``best_of_n`` and ``maj_at_k`` (by k: value, ci, tasks; over the tasks with ``n >= k``, with the same
    bootstrap as pass@k) and ``selection`` (the scorer, the answer format, and how many episodes had a
    score or an answer). Only the parts asked for (``scores`` / ``answers`` not None) are present."""

    def by_k(metric: Callable[[Sequence[Candidate], int], float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in config.ks:
            values_T = np.array(
                [metric(_candidates(t, scores, answers), k) for t in tasks if t.n >= k], dtype=np.float64
            )
            low, high = bootstrap_ci(
                values_T, resamples=config.resamples, confidence=config.confidence, seed=config.seed
            )
            mean = float(values_T.mean()) if values_T.size else math.nan
            out[str(k)] = {"value": mean, "ci": [low, high], "tasks": int(values_T.size)}
        return out

    metrics: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    if scores is not None:
        metrics["best_of_n"] = by_k(best_of_n)
        summary.update(best_of_n_by=config.best_of_n_by, scored=sum(v is not None for v in scores.values()),
                       unscored=sum(v is None for v in scores.values()))  # fmt: skip
    if answers is not None:
        metrics["maj_at_k"] = by_k(majority_at_k)
        summary.update(answer_format=config.answer_format, answered=sum(v is not None for v in answers.values()),
                       unanswered=sum(v is None for v in answers.values()))  # fmt: skip
    if summary:
        metrics["selection"] = summary
    return metrics
