"""The configuration of a whole training run (``agentrl train``): SFT tool-format phase, RL phase, evaluation.

A run is one :class:`RunConfig`. Its ``sft.learner`` and ``learner`` sections are field values of the
learners' own configs (:class:`~agentrl.learners.sft.SFTConfig`, the algorithm's config), validated by
:func:`resolve` before any work starts, so ``--set learner.lr=1e-5`` fails at once when it is wrong.

Defaults come in three layers, later ones winning: the built-in ones here, the env's own recipe (a
``default_run`` mapping on the env class, e.g. which task sets SFT, RL and evaluation play, and the
settings that make the tiny model learn on a CPU), then the user's YAML file and ``--set`` overrides.
The YAML file is UTF-8 without aliases (``*name``): a few nested aliases could stand for billions of values.

An unknown key, at any depth and from any layer, fails before anything is built, named by its dotted path
and where it was set, with the closest keys of its level and the class documenting them
(:func:`~agentrl._config_keys.unknown_key_message`); ``env_kwargs`` keys are checked against the env's
constructor (:func:`check_env_kwargs`).
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from agentrl._config_keys import model_keys, unknown_key_message
from agentrl.cluster.config import ClusterConfig
from agentrl.errors import ConfigError
from agentrl.learners.config import StrictConfig, unknown_keys

__all__ = [
    "ALGOS",
    "SECTIONS",
    "EvalSection",
    "GoldSection",
    "RejectionSection",
    "Resolved",
    "RunConfig",
    "SFTSection",
    "SecondRLSection",
    "TrackingSection",
    "apply_overrides",
    "build_run_config",
    "check_env_kwargs",
    "check_keys",
    "env_recipe",
    "load_yaml",
    "raise_unknown_keys",
    "resolve",
    "set_layers",
]

ALGOS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "grpo": ("agentrl.learners.grpo:GRPOConfig", "agentrl.learners.grpo:train_grpo", {}),
    "dapo": ("agentrl.learners.grpo:GRPOConfig", "agentrl.learners.grpo:train_grpo", {"preset": "dapo"}),
    "dr_grpo": ("agentrl.learners.grpo:GRPOConfig", "agentrl.learners.grpo:train_grpo", {"preset": "dr_grpo"}),
    "rloo": ("agentrl.learners.grpo:GRPOConfig", "agentrl.learners.grpo:train_grpo", {"advantage": "rloo"}),
    "reinforce_pp": ("agentrl.learners.grpo:GRPOConfig", "agentrl.learners.grpo:train_grpo",
                     {"advantage": "reinforce_pp"}),
    "ppo": ("agentrl.learners.ppo:PPOConfig", "agentrl.learners.ppo:train_ppo", {}),
    "dpo": ("agentrl.learners.online_dpo:OnlineDPOConfig", "agentrl.learners.online_dpo:train_online_dpo", {}),
}  # fmt: skip
"""``--algo`` name -> (config class, train function, settings it implies). ``dpo`` is online DPO: the
policy samples its own pairs from the env (offline DPO on a preference file is ``agentrl dpo``)."""


SECTIONS: dict[str, str] = {
    "sft.learner": "agentrl.learners.sft:SFTConfig",
    "learner": "<algo>",
    "rejection.sampling": "agentrl.learners.rl:RolloutConfig",
    "rejection.learner": "agentrl.learners.sft:SFTConfig",
    "rl2.learner": "<algo>",
    "rl2.judge": "agentrl.judge.config:JudgeConfig",
}
"""The run config's free-form sections whose keys are the fields of a config class (``<algo>``: the
algorithm's, from :data:`ALGOS`): their keys are checked with the run config's own."""

_CHECKPOINTS = {"save_every": 25, "keep_last": 2}
"""Checkpoint cadence of both phases unless the config says otherwise: a crash loses at most 25 steps."""


class SFTSection(StrictConfig):
    """The SFT tool-format phase: fine-tune on the env's reference demonstrations before RL."""

    demos: int = Field(
        0, ge=0, description="tasks whose reference episodes are the SFT data; 0 skips the phase, e.g. 3000"
    )
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="agentrl.make keyword arguments for the demonstration tasks"
    )
    demo_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of env.demonstration(task, ...), e.g. {check: false}"
    )
    learner: dict[str, Any] = Field(
        default_factory=dict, description="SFTConfig fields, e.g. {max_steps: 700, lr: 2e-3}"
    )
    data: str | None = Field(
        None, description="SFT conversations from a data set instead of the env's demonstrations: a JSONL/"
        "Parquet/Arrow file, a save_to_disk directory or a Hub id (see agentrl.data.sources)",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="data: {field: the data set's column}, e.g. {messages: conversation}"
    )
    split: str = Field("train", description="data: the split to read, e.g. train")
    cache: bool = Field(
        False, description="keep the finished phase under the digest of its settings, data, model and agentrl's "
        "source, and take it from there when a run's SFT phase would be the same (see agentrl.pipeline.sft_cache)",
    )


class EvalSection(StrictConfig):
    """Greedy evaluation on held-out tasks, after SFT and after RL."""

    tasks: int = Field(0, ge=0, description="held-out tasks played once each, greedily; 0 skips it, e.g. 300")
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="agentrl.make keyword arguments selecting the held-out tasks"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="tokens per turn; None: the learner's")
    pass_on: str = Field(
        "reward", description="what passing reads: 'reward' (the total) or a reward component, e.g. 'correct'"
    )
    pass_threshold: float = Field(1.0, description="an episode passes when pass_on is at least this, e.g. 1.0")
    seed: int = Field(12345, description="seeds the held-out tasks, apart from training's")


class RejectionSection(StrictConfig):
    """Rejection-sampling SFT after RL (the "expert iteration" stage of R1-style recipes): the RL model
    plays ``tasks`` tasks ``group_size`` times, the best episodes of each become SFT data for it."""

    tasks: int = Field(0, ge=0, description="tasks sampled from the RL model; 0 skips the phase, e.g. 256")
    group_size: int = Field(8, ge=1, description="samples per task, e.g. 8")
    per_task: int = Field(1, ge=1, description="best distinct episodes kept per task, e.g. 1")
    min_reward: float | None = Field(None, description="keep only episodes reaching this reward; None: the best")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="agentrl.make keyword arguments")
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="RolloutConfig fields for the sampling, e.g. {temperature: 1.0}"
    )
    learner: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields, e.g. {max_steps: 100}")


class SecondRLSection(StrictConfig):
    """A second RL stage from the rejection-sampling SFT model (or the RL model), whose reward can mix the
    env's verifiable reward with an LLM judge's score (every online algorithm)."""

    max_steps: int = Field(0, ge=0, description="optimizer steps of the stage; 0 skips it, e.g. 100")
    learner: dict[str, Any] = Field(
        default_factory=dict, description="fields over the first RL stage's learner settings, e.g. {lr: 5e-5}"
    )
    judge: dict[str, Any] | None = Field(
        None, description="a JudgeConfig mapping (model or base_url, rubric, scale, ...); None: env reward only"
    )
    judge_weight: float = Field(0.5, description="the judge's score (in [0, 1]) times this joins the reward")
    judge_mode: Literal["pointwise", "pairwise"] = Field("pointwise", description="how the judge scores")


class GoldSection(StrictConfig):
    """The over-optimisation monitor of the RL stages: a held-out gold score every ``every`` steps beside
    the training reward (every online algorithm)."""

    every: int = Field(0, ge=0, description="steps between gold measurements; 0: no monitor, e.g. 10")
    tasks: int = Field(32, ge=1, description="held-out tasks per measurement, e.g. 32")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="agentrl.make keyword arguments")
    metric: str = Field(
        "reward", description="'reward' or 'component:<name>' of the held-out env, e.g. component:correct"
    )
    temperature: float = Field(0.0, ge=0, description="0 plays greedily; above 0 samples with fixed seeds")
    tolerance: float = Field(0.05, ge=0, description="the gold drop from its best that counts")
    patience: int = Field(2, ge=1, description="consecutive flagged measurements that make a divergence")


class TrackingSection(StrictConfig):
    """Where the run's metrics go besides ``metrics.jsonl`` (see :mod:`agentrl.trackers`)."""

    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers: any of tensorboard, wandb, mlflow, trackio (a list or 'a,b'); [] for none",
    )
    project: str | None = Field(None, description="W&B / trackio project, MLflow experiment; None: 'agentrl'")
    name: str | None = Field(None, description="the run's name in the trackers; None: the run directory's name")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per tracker, its start call's keyword arguments, e.g. {wandb: {mode: offline}}"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        from agentrl.trackers import check_report_to

        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return list(check_report_to(value)) if isinstance(value, list | tuple) else value

    def settings(self) -> Any:
        """These settings as the :class:`~agentrl.trackers.TrackerSettings` a run directory takes."""
        from agentrl.trackers import TrackerSettings

        return TrackerSettings(tuple(self.report_to), self.project, self.name, self.options)


class RunConfig(StrictConfig):
    """One ``agentrl train`` run. See the module docstring for where defaults come from."""

    env: str = Field(..., description="registered env id, e.g. 'code-sandbox' (see `agentrl envs`)")
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="agentrl.make keyword arguments for the RL tasks"
    )
    model: str = Field("tiny", description="starting model: 'tiny' (built locally), a hub id or a directory")
    algo: str = Field("grpo", description=f"RL algorithm, one of {sorted(ALGOS)}")
    rollout: Literal["hf", "vllm"] = Field("hf", description="sampler backend: 'hf' or 'vllm'")
    seed: int = Field(0, description="seeds every phase")
    output_dir: Path | None = Field(None, description="the run directory; None: runs/<env>-<algo>-<time>")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default")
    budget_minutes: float | None = Field(
        None, gt=0, description="the whole run's wall-clock budget: RL stops in time for the evaluation after "
        "it (as long as the one after SFT took, plus a margin) to end within it; None: each phase's own limits",
    )
    trajectories_every: int = Field(
        10, ge=0, description="write the RL step's trajectories to trajectories.jsonl every N steps; 0: never"
    )
    sft: SFTSection = Field(default_factory=SFTSection, description="the SFT tool-format phase")
    learner: dict[str, Any] = Field(
        default_factory=dict, description="fields of the algorithm's config, e.g. {lr: 2e-4, max_steps: 100}"
    )
    eval: EvalSection = Field(default_factory=EvalSection, description="held-out evaluation")
    rejection: RejectionSection = Field(default_factory=RejectionSection, description="rejection-sampling SFT")
    rl2: SecondRLSection = Field(default_factory=SecondRLSection, description="a second RL stage")
    gold: GoldSection = Field(default_factory=GoldSection, description="the over-optimisation monitor")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="experiment trackers")
    cluster: ClusterConfig | None = Field(
        None, description="play the RL rollouts on Ray, e.g. --set cluster.env_workers=2 (see agentrl.cluster); "
        "learner.max_staleness makes it asynchronous. None: in this process",
    )  # fmt: skip

    @model_validator(mode="after")
    def _known_algo(self) -> RunConfig:
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; choose one of {sorted(ALGOS)}")
        return self


# ---- layers ---------------------------------------------------------------------------------------
def env_recipe(env_id: str) -> dict[str, Any]:
    """The env's own run defaults: its class's ``default_run`` mapping (``{}`` when it has none).

    Raises:
        ConfigError: unknown env id (with the registry's "did you mean").
    """
    from agentrl import registry

    target = registry.spec(env_id).load()
    recipe = getattr(target, "default_run", None)
    return copy.deepcopy(dict(recipe)) if isinstance(recipe, Mapping) else {}


def check_env_kwargs(env_id: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Check that ``env_id``'s constructor takes ``kwargs``, by its signature: nothing is built, so it is
    instant and runs at ``--dry-run``.

    Args:
        where: the setting that holds them, for the message (``"eval.env_kwargs"``, ``"--env-kwargs"``).

    Raises:
        ConfigError: an argument the env does not take, as :func:`~agentrl._config_keys.unknown_key_message`
            (``eval.env_kwargs.<key>``), or a required one missing, naming ``where`` and the env's arguments.
    """
    import inspect

    from agentrl import registry

    env_spec = registry.spec(env_id)
    target = env_spec.load()
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # no readable signature (some C callables): building it will tell
    try:
        signature.bind(**{**env_spec.kwargs, **kwargs})
    except TypeError as exc:
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes = [name for name, p in signature.parameters.items() if p.kind in named]
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [] if open_ended else [str(k) for k in kwargs if k not in takes]
        if not unknown:
            raise ConfigError(f"{where}: {env_spec.id} cannot be made with {dict(kwargs)}: {exc}; it takes "
                              f"{', '.join(takes) or 'no arguments'}. Fix it in {where}") from None  # fmt: skip
        dotted = not where.startswith("-")  # a setting (eval.env_kwargs), not a flag (--env-arg)
        documented = f"the constructor arguments of {env_spec.id} (see {target.__module__}.{target.__qualname__})"
        raise ConfigError("\n  ".join(
            unknown_key_message(f"{where}.{k}", takes, documented) if dotted
            else unknown_key_message(k, takes, documented, where, f"of {where}")
            for k in unknown
        )) from None  # fmt: skip


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A run config file as a mapping.

    Raises:
        ConfigError: missing file, not UTF-8, bad YAML, an alias (``*name``), or not a mapping at the top.
    """
    import yaml

    from agentrl import _yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8 and rerun") from None
    try:
        data = _yaml.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml.describe(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (values parsed as YAML scalars: ``1e-5``, ``true``, ``[1, 2]``).

    Raises:
        ConfigError: an override without ``=`` or with an empty key, or a path through a non-mapping.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: write key.path=value, e.g. --set learner.lr=1e-5")
        value = _scalar(raw)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _scalar(raw: str) -> Any:
    """``raw`` as a number when it reads as one (YAML 1.1 leaves ``1e-5`` a string), else as YAML."""
    import yaml

    from agentrl import _yaml

    for parse in (int, float):
        try:
            return parse(raw)
        except ValueError:
            pass
    try:
        return _yaml.load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (mappings merge; other values replace)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_run_config(
    env: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    **flags: Any,
) -> RunConfig:
    """Layer the defaults: built-in < the env's recipe < ``config_file`` < ``flags`` (set ones) < ``overrides``.

    Raises:
        ConfigError: anything invalid, naming the field and the fix.
    """
    user = load_yaml(config_file) if config_file is not None else {}
    data = _merge(user, {k: v for k, v in flags.items() if v is not None})
    if env is not None:
        data["env"] = env
    data = apply_overrides(data, overrides)
    if "env" not in data:
        raise ConfigError("no environment: pass --env <id> (see `agentrl envs`) or set env: in the config file")
    recipe = env_recipe(str(data["env"]))
    merged = _merge(recipe, data)
    layers = set_layers(overrides)
    if config_file is not None:
        layers.append((f"in {config_file}", user))
    layers.append((f"in the default_run recipe of {data['env']}", recipe))
    check_keys(merged, layers)
    return RunConfig(**merged)


def check_keys(data: Mapping[str, Any], layers: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> None:
    """Check every key of a run config mapping, at any depth (the sections of :data:`SECTIONS` included),
    before any value is.

    Args:
        layers: (where, mapping) of the layers ``data`` was merged from, the one that wins first: an unknown
            key is said to come from the first that holds it.

    Raises:
        ConfigError: one line per unknown key, each with its dotted path, where it was set, the closest keys
            of its level and the class documenting them.
    """
    algo = data.get("algo", RunConfig.model_fields["algo"].default)
    sections = {
        path: _load_section(algo if target == "<algo>" else target, path)
        for path, target in SECTIONS.items()
        if _holds(data, path) and (target != "<algo>" or (isinstance(algo, str) and algo in ALGOS))
    }
    env = data.get("env", "<id>")
    raise_unknown_keys(unknown_keys(data, RunConfig, sections=sections), layers,
                       f"`agentrl train --env {env} --dry-run` prints the resolved config, every key with its value")  # fmt: skip


def raise_unknown_keys(
    found: Sequence[tuple[str, Any]], layers: Sequence[tuple[str, Mapping[str, Any]]] = (), footer: str = ""
) -> None:
    """Raise one ConfigError for the unknown keys :func:`~agentrl.learners.config.unknown_keys` found (none:
    return), each said to come from the first of ``layers`` (``(where, mapping)``, the winning one first) that
    holds it, ``footer`` on a last line in parentheses."""
    if not found:
        return
    lines = [
        unknown_key_message(path, list(cls.model_fields), model_keys(cls),
                            next((where for where, layer in layers if _holds(layer, path)), ""))
        for path, cls in found
    ]  # fmt: skip
    head = lines[0] if len(lines) == 1 else f"{len(lines)} unknown keys:\n  " + "\n  ".join(lines)
    raise ConfigError(head + (f"\n  ({footer})" if footer else ""))


def set_layers(overrides: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``--set`` overrides as :func:`raise_unknown_keys` layers, the last (winning) one first."""
    return [(f"--set {item}", apply_overrides({}, [item])) for item in reversed(overrides)]


def _load_section(target: str, path: str) -> Any:
    """The config class of a :data:`SECTIONS` entry (``target`` an algo name or ``module:Class``)."""
    from agentrl._plugins import load_object

    return load_object(ALGOS[target][0] if target in ALGOS else target, f"the config class of {path}")


def _holds(data: Mapping[str, Any], path: str) -> bool:
    """Whether the nested mapping ``data`` has the dotted ``path``."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


# ---- resolution -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A run's concrete learner configs: ``sft`` (None when the phase is skipped) and the RL learner's."""

    run: RunConfig
    run_dir: Path
    sft: Any
    learner: Any
    train: str  # "module:function" of the RL learner
    sampling: Any = None  # the rejection phase's RolloutConfig (None: no rejection phase)
    rejection_sft: Any = None  # its SFTConfig
    learner2: Any = None  # the second RL stage's learner config (None: no second stage)


def resolve(run: RunConfig, run_dir: Path | None = None) -> Resolved:
    """Build and validate every phase's learner config (no model is loaded, nothing is written).

    Raises:
        ConfigError: an unknown key of a section (as :func:`check_keys`), or a bad section value, its message
            prefixed with the section (``learner``, ``sft.learner``).
    """
    from agentrl._plugins import load_object
    from agentrl.learners import checkpoints

    check_keys(run.model_dump())
    run_dir = Path(run_dir or run.output_dir or default_run_dir(run))
    sft = None
    if run.sft.demos > 0 or run.sft.data is not None:
        from agentrl.learners.sft import SFTConfig

        sft = _section("sft.learner", SFTConfig, {
            "model": run.model, "seed": run.seed, **_CHECKPOINTS, **run.sft.learner,
            "output_dir": run_dir / "checkpoints" / "sft",
        })  # fmt: skip
    config_path, train, implied = ALGOS[run.algo]
    config_cls = load_object(config_path, f"the {run.algo!r} learner")
    learner = dict(implied)
    preset = learner.pop("preset", None)
    if preset is not None:
        from agentrl.learners.grpo import PRESETS

        learner = {**PRESETS[preset], **learner}
    learner.update({**_CHECKPOINTS, **run.learner})
    if run.cluster is not None:
        learner["cluster"] = {**run.cluster.model_dump(), **learner.get("cluster", {})}
    learner.update({
        "env": run.env, "env_kwargs": {**run.env_kwargs, **learner.get("env_kwargs", {})}, "rollout": run.rollout,
        "seed": run.seed, "model": str(checkpoints.step_dir(sft.output_dir, sft.max_steps)) if sft else run.model,
        "output_dir": run_dir / "checkpoints" / "rl",
    })  # fmt: skip
    _check_env_settings(run, learner["env_kwargs"])
    rl = _section("learner", config_cls, learner)
    sampling, rejection_sft = _rejection(run, run_dir, rl)
    learner2 = None
    if run.rl2.max_steps > 0:
        after = rejection_sft or rl
        learner2 = _section("rl2.learner", config_cls, {
            **learner, **run.rl2.learner, "max_steps": run.rl2.max_steps, "resume_from": None,
            "model": str(checkpoints.step_dir(after.output_dir, after.max_steps)),
            "output_dir": run_dir / "checkpoints" / "rl2",
        })  # fmt: skip
        if run.rl2.judge is not None:
            from agentrl.judge.config import load_judge_config

            try:  # fails now, naming the field, not after the first stages
                load_judge_config(run.rl2.judge)
            except ConfigError as exc:
                raise ConfigError(f"rl2.judge: {exc}") from None
    return Resolved(run, run_dir, sft, rl, train, sampling, rejection_sft, learner2)


def _check_env_settings(run: RunConfig, rl_kwargs: Mapping[str, Any]) -> None:
    """Every env setting the run will build an env with, checked against the env's signature."""
    settings = {
        "env_kwargs" if rl_kwargs == run.env_kwargs else "learner.env_kwargs": rl_kwargs,
        "sft.env_kwargs": run.sft.env_kwargs if run.sft.demos and run.sft.data is None else None,
        "eval.env_kwargs": run.eval.env_kwargs if run.eval.tasks else None,
        "rejection.env_kwargs": {**run.env_kwargs, **run.rejection.env_kwargs} if run.rejection.tasks else None,
        "gold.env_kwargs": run.gold.env_kwargs if run.gold.every else None,
    }
    for where, kwargs in settings.items():
        if kwargs is not None:
            check_env_kwargs(run.env, kwargs, where)


def _rejection(run: RunConfig, run_dir: Path, rl: Any) -> tuple[Any, Any]:
    """The rejection phase's sampling and SFT configs (both None when it is off)."""
    if run.rejection.tasks == 0:
        return None, None
    from agentrl.learners import checkpoints
    from agentrl.learners.rl import RolloutConfig
    from agentrl.learners.sft import SFTConfig

    model = str(checkpoints.step_dir(rl.output_dir, rl.max_steps))
    shared = {"model": model, "seed": run.seed, "template": rl.template, "device": rl.device}
    from agentrl.learners.config import TrainConfig

    rollout_fields = set(RolloutConfig.model_fields) - set(TrainConfig.model_fields) - {"max_seconds"}
    sampling = _section("rejection.sampling", RolloutConfig, {
        **{k: v for k, v in rl.model_dump().items() if k in rollout_fields}, **shared,
        "env_kwargs": {**run.env_kwargs, **run.rejection.env_kwargs}, "group_size": run.rejection.group_size,
        **run.rejection.sampling,
    })  # fmt: skip
    sft = _section("rejection.learner", SFTConfig, {
        **_CHECKPOINTS, **shared, **run.rejection.learner, "output_dir": run_dir / "checkpoints" / "rejection",
    })  # fmt: skip
    return sampling, sft


def _section(name: str, cls: Callable[..., Any], values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}\n  (fix it under {name}: in the config file or with --set {name}.<field>=<value>)") from None


def default_run_dir(run: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = re.sub(r"[^A-Za-z0-9._-]+", "_", run.env)  # a loader id ("mcp:path/env.yaml") holds ':' and '/'
    return Path("runs") / f"{env}-{run.algo}-{stamp}"
