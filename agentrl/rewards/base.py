"""The reward contract: results with named components, weighted composition, ORM and PRM protocols.

An environment's reward is a weighted sum of named parts, ``R = R_correct + α·R_format + β·R_length +
γ·R_model``. Each part is a *reward function* (any callable returning a float or a :class:`RewardResult`);
:class:`RewardSpec` names one and gives it a weight; :func:`compose` turns the raw values into a
:class:`RewardResult` whose ``components`` are the weighted contributions, so they sum exactly to ``score``
(what an env puts in ``info["reward_components"]``).

Outcome rewards (ORM) score a finished episode's final answer; process rewards (PRM) score one turn. A
trained reward model or an LLM judge plugs in the same way: wrap it as a callable and name it in the list.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from agentrl.errors import ConfigError

__all__ = [
    "OutcomeReward",
    "ProcessReward",
    "RewardFn",
    "RewardResult",
    "RewardSpec",
    "WeightedReward",
    "compose",
    "parse_weights",
    "task_prompt",
]

TaskT = TypeVar("TaskT", contravariant=True)
StateT = TypeVar("StateT", contravariant=True)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class RewardResult:
    """A scored answer or turn.

    Attributes:
        score: The total reward.
        components: The *weighted* contribution of each named part; ``sum(components.values()) == score``
            exactly when built by :func:`compose`. Put ``dict(components)`` in ``info["reward_components"]``.
        raw: The unweighted value of each part, for monitors and logs.
        info: Details for people and logs, e.g. the extracted answer; never read by learners.
    """

    score: float
    components: Mapping[str, float] = field(default_factory=dict)
    raw: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", _frozen(self.components))
        object.__setattr__(self, "raw", _frozen(self.raw))
        object.__setattr__(self, "info", _frozen(self.info))

    @classmethod
    def single(cls, name: str, value: float, **info: Any) -> RewardResult:
        """A result with one component of weight 1."""
        return cls(float(value), {name: float(value)}, {name: float(value)}, info)


def compose(
    raw: Mapping[str, float], weights: Mapping[str, float], info: Mapping[str, Any] | None = None
) -> RewardResult:
    """Weight named raw rewards and sum them.

    A name in ``raw`` without a weight has weight 1; a weight of 0 keeps the component (at 0) so it still
    shows in logs.

    Args:
        raw: Unweighted value of each part, e.g. ``{"correct": 1.0, "format": 1.0}``.
        weights: Weight of each part, e.g. ``{"format": 0.1}``.
        info: Passed through to :attr:`RewardResult.info`.

    Returns:
        A :class:`RewardResult` whose ``components`` are ``weight * raw`` and whose ``score`` is their sum.

    Raises:
        ConfigError: A weight names no part of ``raw``, or a value or weight is not a finite number.
    """
    unknown = sorted(set(weights) - set(raw))
    if unknown:
        raise ConfigError(
            f"reward weights name unknown components {unknown}; the known components are {sorted(raw)}"
        )
    components: dict[str, float] = {}
    for name, value in raw.items():
        weight = weights.get(name, 1.0)
        if not (_finite(value) and _finite(weight)):
            raise ConfigError(
                f"reward component {name!r}: value {value!r} and weight {weight!r} must be finite numbers"
            )
        components[name] = float(weight) * float(value)
    return RewardResult(
        # Plain left-to-right sum: exactly what a reader computes from info["reward_components"].
        float(sum(components.values())),
        components,
        {k: float(v) for k, v in raw.items()},
        info or {},
    )


def _finite(x: Any) -> bool:
    # numbers.Real admits bools and numpy scalars: a rule returning ``answer == gold`` is a fine reward.
    return isinstance(x, numbers.Real) and math.isfinite(float(x))


def parse_weights(weights: Mapping[str, Any] | None, known: Sequence[str]) -> dict[str, float]:
    """Validate a user's weight table against the components an env knows.

    Args:
        weights: ``{"name": weight}`` from a config; None means no overrides.
        known: The component names the env produces.

    Returns:
        A plain dict of float weights.

    Raises:
        ConfigError: An unknown name (the message lists the known ones) or a non-numeric weight.
    """
    out: dict[str, float] = {}
    for name, weight in (weights or {}).items():
        if name not in known:
            raise ConfigError(f"unknown reward component {name!r}; the known components are {sorted(known)}")
        if not _finite(weight):
            raise ConfigError(f"reward weight for {name!r} must be a finite number, got {weight!r}")
        out[name] = float(weight)
    return out


def task_prompt(task: Any) -> str:
    """The task itself (a str), ``task["prompt"]`` or ``task.prompt`` (a ToolEnv Task); else ConfigError."""
    prompt = task.get("prompt") if isinstance(task, Mapping) else getattr(task, "prompt", task)
    if not isinstance(prompt, str):
        raise ConfigError(
            f"no prompt found in task {task!r:.80}; give a str, a mapping with 'prompt' or an object with "
            "a .prompt, or pass the scorer to_messages=lambda task, x: [...messages...]"
        )
    return prompt


@runtime_checkable
class OutcomeReward(Protocol[TaskT]):
    """ORM: scores an episode's final answer against its task.

    ``__call__(task, final)`` receives the task record and the final answer (or the final state the env
    keeps, e.g. the submitted program) and returns a :class:`RewardResult`.
    """

    def __call__(self, task: TaskT, final: Any) -> RewardResult: ...


@runtime_checkable
class ProcessReward(Protocol[TaskT, StateT]):
    """PRM: scores one turn of an episode.

    ``__call__(task, turn)`` receives the task record and what the env knows of the turn (the assistant's
    text, its parsed tool calls, their results) and returns a :class:`RewardResult`; the env adds it to the
    step reward of that turn.
    """

    def __call__(self, task: TaskT, turn: StateT) -> RewardResult: ...


RewardFn = Callable[[Any, Any], "float | RewardResult"]
"""Any scorer ``fn(task, answer_or_turn) -> float | RewardResult``: a rule, a trained reward model, a judge."""


@dataclass(frozen=True)
class RewardSpec:
    """One named, weighted reward function.

    Attributes:
        name: The component name in ``info["reward_components"]``.
        fn: ``fn(task, answer_or_turn) -> float | RewardResult``; a :class:`RewardResult` contributes its
            ``score`` and its ``info`` is kept under ``info[name]``.
        weight: Multiplies the function's value.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a reward needs a non-empty string name, got {self.name!r}")
        if not callable(self.fn):
            raise ConfigError(f"reward {self.name!r}: fn must be callable, got {self.fn!r}")
        if not _finite(self.weight):
            raise ConfigError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


class WeightedReward(Generic[TaskT]):
    """A list of named reward functions and their weights, scored together.

    It satisfies both :class:`OutcomeReward` and :class:`ProcessReward`: what the second argument means is
    up to the functions in it. ``with_weights`` returns a copy with weights overridden from a config.

    Example:
        >>> reward = WeightedReward([RewardSpec("correct", lambda t, a: float(a == t)),
        ...                          RewardSpec("short", lambda t, a: -len(a) / 100, weight=0.5)])
        >>> reward("42", "42").components
        mappingproxy({'correct': 1.0, 'short': -0.01})
    """

    def __init__(self, specs: Sequence[RewardSpec]):
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"reward names must be unique; repeated: {duplicates}")
        self.specs: tuple[RewardSpec, ...] = tuple(specs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def with_weights(self, weights: Mapping[str, Any] | None) -> WeightedReward[TaskT]:
        """A copy whose weights are replaced where ``weights`` names a component.

        Raises:
            ConfigError: ``weights`` names an unknown component (the message lists the known ones).
        """
        new = parse_weights(weights, self.names)
        return WeightedReward([RewardSpec(s.name, s.fn, new.get(s.name, s.weight)) for s in self.specs])

    def __call__(self, task: TaskT, answer: Any) -> RewardResult:
        """Score ``answer`` with every function and compose the weighted sum.

        Raises:
            ConfigError: A function returned something other than a finite number or a RewardResult.
        """
        raw: dict[str, float] = {}
        info: dict[str, Any] = {}
        for spec in self.specs:
            value = spec.fn(task, answer)
            if isinstance(value, RewardResult):
                if value.info:
                    info[spec.name] = dict(value.info)
                value = value.score
            if not _finite(value):
                raise ConfigError(f"reward {spec.name!r} returned {value!r}; it must return a finite number")
            raw[spec.name] = float(value)
        return compose(raw, {s.name: s.weight for s in self.specs}, info)
