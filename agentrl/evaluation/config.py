"""The settings of one ``agentrl eval`` run, validated once, with messages that name the flag and the fix.

Two kinds of field: those that decide what is sampled (:data:`IDENTITY_FIELDS`: env, policy, sampling,
limits, seed), which must stay the same when a run is resumed in the same output directory, and those that
only decide how much is played or how it is scored (``n``, ``k``, ``concurrency``, the pass rule, the
bootstrap, test-time selection), which may change between resumes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl.evaluation.metrics import PassRule
from agentrl.evaluation.selection import check_scorer_spec
from agentrl.rewards.answers import ANSWER_FORMATS
from agentrl.types import DEFAULT_DEADLINE_S

__all__ = ["BACKENDS", "IDENTITY_FIELDS", "EvalConfig", "default_out_dir"]

BACKENDS = ("hf", "vllm", "openai")
IDENTITY_FIELDS = (
    "env",
    "env_kwargs",
    "task_option",
    "backend",
    "model",
    "tokenizer",
    "prompt_format",
    "template",
    "temperature",
    "top_p",
    "max_new_tokens",
    "max_turns",
    "max_episode_tokens",
    "episode_timeout_s",
    "max_context",
    "dtype",
    "seed",
)
"""Fields that decide what a (task, sample) episode is: a resumed run must keep them."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: ``n`` tasks of ``env`` played ``k`` times each by one policy.

    Attributes:
        env: a registered env id (``agentrl envs`` lists them).
        env_kwargs: keyword arguments for ``agentrl.make`` (e.g. ``{"tasks": "humaneval"}``).
        task_option: reset option that picks a task by index: task ``i`` resets with ``{task_option: i}``
            (``task_index`` for code-sandbox, ``task`` for math). None: task ``i`` is the env's draw under
            reset seed ``derive_seed(seed, i)``.
        backend: ``hf``, ``vllm`` or ``openai`` (any OpenAI-compatible server at ``base_url``).
        model: a local model directory, a hub id or ``tiny``; for ``openai``, the served model's name.
        base_url: the OpenAI-compatible API root (``.../v1``); only with ``backend="openai"``.
        api_key_env: the environment variable that holds the API key (never the key itself).
        tokenizer: the tokenizer that renders and counts tokens; None: the model's own (``tiny`` for chat
            endpoints, where token counts are then approximate).
        prompt_format: ``token_ids`` or ``messages``; None: ``messages`` for ``openai``, else ``token_ids``.
        template: chat template: None (the tokenizer's), ``chatml`` or a Jinja string.
        history: how earlier turns reach the next prompt: ``append``, ``keep_reasoning`` or ``turn_split``
            (:data:`agentrl.models.chat.HISTORY_MODES`; ``agentrl check --model`` says which a template takes).
        tool_format: the model's tool-call markup (:mod:`agentrl.tool_formats`); None: detected.
        n: tasks (indices ``0..n-1``).
        k: samples per task.
        ks: the k of each pass@k reported; empty: ``(1, k)``.
        concurrency: episodes in flight at once.
        temperature, top_p: sampling.
        max_new_tokens: tokens sampled per turn at most.
        max_turns: assistant turns per episode; None: the env's.
        max_episode_tokens: sampled tokens per episode at most; None: unlimited.
        episode_timeout_s: wall-clock seconds per episode (a hung env ends its episode); None: none.
        max_context: the policy's context window; None: the backend's default.
        device, dtype: where and in which precision a local model runs (None: the backend's choice).
        seed: every reset and sampling seed derives from it.
        pass_rule: what counts as a passed episode.
        best_of_n_by: the scorer behind best-of-N, ``SOURCE:ARGUMENT`` (``component:<reward component>``,
            ``rm:<reward model directory>``; see :mod:`agentrl.evaluation.selection`); None: no best-of-N.
        maj_k: report majority vote (maj@k) for each k in ``ks``.
        answer_format: how maj@k reads the final assistant message's answer: ``boxed``, ``answer_tag``,
            ``hashes``, ``number`` or ``any`` (:func:`agentrl.rewards.answers.extract_answer`).
        resamples, confidence: the bootstrap over tasks behind every interval.
        retry_errors: play again the episodes that ended with an error in an earlier run.
        check_model: with ``base_url``, fail before playing when the server's ``/models`` list lacks ``model``
            (off for a server that takes names it does not list).
        cluster: play the episodes on Ray env workers (:mod:`agentrl.evaluation.cluster`): a
            :class:`~agentrl.cluster.config.ClusterConfig`, or a mapping of its keys (``env_workers``,
            ``engines``, ``address``, ``setup``, ...); None: in this process, with no Ray. Not an identity
            field: a run may resume on a cluster what it began in one process, and the other way round.
        out: the output directory (episodes, results, report); reruns resume from it.
    """

    env: str
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_option: str | None = None
    backend: str = "hf"
    model: str = "tiny"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    tokenizer: str | None = None
    prompt_format: str | None = None
    template: str | None = None
    history: str = "append"
    tool_format: str | None = None
    n: int = 10
    k: int = 1
    ks: tuple[int, ...] = ()
    concurrency: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_turns: int | None = None
    max_episode_tokens: int | None = None
    episode_timeout_s: float | None = DEFAULT_DEADLINE_S
    max_context: int | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    pass_rule: PassRule = field(default_factory=PassRule)
    best_of_n_by: str | None = None
    maj_k: bool = False
    answer_format: str = "any"
    resamples: int = 1000
    confidence: float = 0.95
    retry_errors: bool = False
    check_model: bool = True
    cluster: Any = None
    out: Path | None = None

    def __post_init__(self) -> None:
        _positive(self, ("n", "k", "concurrency", "max_new_tokens", "resamples"))
        _positive(self, ("max_turns", "max_episode_tokens", "max_context"), optional=True)
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai" and not self.base_url:
            raise ConfigError(
                "the openai backend needs --base-url (the API root, e.g. http://127.0.0.1:8000/v1)"
            )
        if self.base_url and self.backend != "openai":
            raise ConfigError(f"--base-url is for the openai backend, not {self.backend!r}; drop --backend")
        if self.base_url and not re.match(r"^https?://", self.base_url):
            raise ConfigError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError(
                "--model is empty: pass a model directory, a hub id, 'tiny', or a served model name"
            )
        if self.history not in ("append", "keep_reasoning", "turn_split"):
            raise ConfigError(f"--history must be append, keep_reasoning or turn_split, got {self.history!r}")
        if self.tool_format is not None:
            from agentrl.tool_formats import tool_format

            tool_format(self.tool_format)  # an unknown name fails here, listing the known ones
        if self.prompt_format not in (None, "token_ids", "messages"):
            raise ConfigError(f"--prompt-format must be token_ids or messages, got {self.prompt_format!r}")
        if self.prompt_format == "messages" and self.backend != "openai":
            raise ConfigError(
                "--prompt-format messages needs a chat endpoint: use --base-url (openai backend)"
            )
        if self.backend == "openai" and self.prompt_format == "token_ids" and not self.tokenizer:
            raise ConfigError(
                "--prompt-format token_ids sends token ids to the server: pass --tokenizer with the served "
                "model's tokenizer (a local directory or hub id)"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.episode_timeout_s is not None and not self.episode_timeout_s > 0:
            raise ConfigError(f"--episode-timeout must be > 0 seconds, got {self.episode_timeout_s!r}")
        if self.best_of_n_by is not None:
            check_scorer_spec(self.best_of_n_by)
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(
                f"--answer-format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}"
            )
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be in (0, 1), e.g. 0.95, got {self.confidence!r}")
        if not self.ks:
            object.__setattr__(self, "ks", tuple(sorted({1, self.k})))
        bad = [k for k in self.ks if not isinstance(k, int) or k < 1]
        if bad:
            raise ConfigError(f"--ks must list positive integers, got {list(self.ks)}")
        too_big = [k for k in self.ks if k > self.k]
        if too_big:
            raise ConfigError(
                f"pass@{max(too_big)} needs at least {max(too_big)} samples per task, but --k is {self.k}: "
                f"raise --k to {max(too_big)}, or drop {', '.join(map(str, too_big))} from --ks"
            )
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if self.cluster is not None:
            object.__setattr__(self, "cluster", _cluster_config(self.cluster))
        if self.out is None:
            object.__setattr__(self, "out", default_out_dir(self))
        object.__setattr__(self, "out", Path(self.out))  # type: ignore[arg-type]

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def resolved_prompt_format(self) -> str:
        if self.prompt_format is not None:
            return self.prompt_format
        return "messages" if self.backend == "openai" else "token_ids"

    @property
    def resolved_tokenizer(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        return "tiny" if self.backend == "openai" else self.model

    @property
    def out_dir(self) -> Path:
        assert self.out is not None  # set in __post_init__
        return self.out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalConfig:
        """The inverse of :meth:`to_dict` (unknown keys are ignored, so older files still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        rule = values.get("pass_rule")
        if isinstance(rule, Mapping):
            values["pass_rule"] = PassRule(str(rule.get("on", "reward")), float(rule.get("threshold", 1.0)))
        if values.get("ks") is not None:
            values["ks"] = tuple(values["ks"])
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the episodes (:data:`IDENTITY_FIELDS`), JSON-ready."""
        values = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        values["env_kwargs"] = dict(self.env_kwargs)
        values["tokenizer"] = self.resolved_tokenizer
        values["prompt_format"] = self.resolved_prompt_format
        return values

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready (the API key's variable name, never its value)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(self.identity())
        data["ks"] = list(self.ks)
        data["out"] = str(self.out)
        data["cluster"] = self.cluster.model_dump() if self.cluster is not None else None
        data["pass_rule"] = {
            "on": self.pass_rule.on,
            "threshold": self.pass_rule.threshold,
            "text": self.pass_rule.describe(),
        }
        return data


def _positive(config: EvalConfig, names: tuple[str, ...], optional: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def _cluster_config(value: Any) -> Any:
    """``cluster`` as a :class:`~agentrl.cluster.config.ClusterConfig` (a mapping is validated)."""
    from agentrl.cluster.config import ClusterConfig

    if isinstance(value, ClusterConfig):
        return value
    if isinstance(value, Mapping):
        return ClusterConfig(**value)
    raise ConfigError(f"cluster must be a mapping of cluster settings, e.g. {{'env_workers': 2}}; got {value!r}")


def default_out_dir(config: EvalConfig) -> Path:
    """``runs/eval/<env>-<model>-seed<seed>``: the same command resumes the same directory."""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.model.rstrip("/")).name or config.model)
    env = re.sub(r"[^A-Za-z0-9._-]+", "_", config.env)
    return Path("runs") / "eval" / f"{env}-{model}-seed{config.seed}"
