"""``agentrl sft`` and ``agentrl dpo``: one learner on a data file, logged to a run directory.

Both take the learner config's fields with ``--set field=value`` (``agentrl sft --set lr=1e-4``), validate
them before loading anything, and write ``<output dir>/checkpoints/<phase>/step-NNNNNN``, ``metrics.jsonl``,
TensorBoard events and ``config.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["add_dpo_arguments", "add_sft_arguments", "dpo_main", "sft_main", "why_no_pairs"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="starting model: 'tiny', a hub id or a local directory")
    parser.add_argument("--output-dir", required=True, help="the run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a learner config field, e.g. --set lr=1e-5 (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the config; run nothing")
    parser.add_argument("--columns", metavar="FIELD=COLUMN,...",
                        help="--data: map the fields read to the data set's columns, e.g. messages=conversation")
    parser.add_argument("--split", default="train", help="--data: the split of a data set directory or Hub id")
    parser.add_argument("--subset", help="--data: the configuration (subset) of a Hub data set")
    parser.add_argument("--report-to", default="tensorboard", metavar="A,B",
                        help="experiment trackers: tensorboard (default), wandb, mlflow, trackio, comma-separated; "
                             "'none' for metrics.jsonl only")  # fmt: skip


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help='{"messages": [...], "tools": [...]} rows: JSONL, Parquet, Arrow, a '
                        "save_to_disk directory or a Hub data set id")  # fmt: skip
    source.add_argument("--env", help="use this env's reference demonstrations (with --demos)")
    parser.add_argument("--demos", type=int, default=1000, help="tasks to take demonstrations of (with --env)")
    parser.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments for agentrl.make (with --env)")
    _common(parser)


def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="preference rows (prompt/chosen/rejected, or KTO's labelled form): JSONL, "
                        "Parquet, Arrow, a save_to_disk directory or a Hub data set id")  # fmt: skip
    source.add_argument("--buffer", help="trajectories JSONL (e.g. a run's trajectories.jsonl): best vs worst "
                                         "of each group")  # fmt: skip
    parser.add_argument("--loss", default="dpo", help="dpo, ipo, robust, hinge, kto, orpo or simpo")
    parser.add_argument("--min-margin", type=float, default=0.0, help="--buffer: least reward gap of a pair")
    _common(parser)


def sft_main(args: argparse.Namespace) -> int:
    from agentrl.learners.sft import SFTConfig

    config = _config(SFTConfig, args, {})
    _tracking(args.report_to)
    env_kwargs = _env_kwargs(args.env_kwargs) if args.env else {}
    if args.env:
        from agentrl.pipeline.config import check_env_kwargs

        check_env_kwargs(args.env, env_kwargs, "--env-kwargs")
    if args.dry_run:
        return _print(config)
    from agentrl.learners.sft import env_demonstrations, read_messages, train_sft

    if args.data:
        data = read_messages(args.data, **_source_options(args))
    else:
        import agentrl

        env = agentrl.make(args.env, **env_kwargs)
        try:
            data = env_demonstrations(env, range(args.demos))
        finally:
            env.close()
    result = _run("sft", args, config, lambda on_step: train_sft(config, data, on_step=on_step))
    print(f"sft: {len(result.history)} steps, final loss {result.history[-1].loss:.4f}; model: {result.checkpoint}")
    return 0


def dpo_main(args: argparse.Namespace) -> int:
    from agentrl.learners.dpo import DPOConfig

    config = _config(DPOConfig, args, {"loss": args.loss})
    _tracking(args.report_to)
    if args.dry_run:
        return _print(config)
    from agentrl.learners.dpo import train_dpo
    from agentrl.learners.preference_data import read_preferences

    data: Sequence[Any]
    if args.data:
        data = read_preferences(args.data, **_source_options(args))
    else:
        from agentrl.data.buffer import TrajectoryBuffer

        buffer = TrajectoryBuffer.load(args.buffer)
        data = buffer.preference_pairs(args.min_margin)
        print(f"dpo: {len(data)} pairs mined from {args.buffer}", file=sys.stderr)
        if not data:
            raise ConfigError(f"no preference pair in {args.buffer}: {why_no_pairs(buffer.groups, args.min_margin)}")
    result = _run("dpo", args, config, lambda on_step: train_dpo(config, data, on_step=on_step))
    last = result.history[-1]
    print(f"dpo ({config.loss}): {len(result.history)} steps, final loss {last.loss:.4f}, "
          f"accuracy {last.accuracy:.2f}, margin {last.margin:.3f}; model: {result.checkpoint}")  # fmt: skip
    return 0


def why_no_pairs(groups: Sequence[Any], min_margin: float) -> str:
    """Why best-vs-worst mining found nothing, counted over ``groups`` (the rules of ``mine_pair``)."""
    from agentrl.types import StopReason

    usable = [[t for t in g if t.trainable and t.turns and t.stop_reason is not StopReason.ERROR] for g in groups]
    small = sum(len(u) < 2 for u in usable)
    spreads = [max(t.total_reward for t in u) - min(t.total_reward for t in u) for u in usable if len(u) >= 2]
    alike = sum(spread <= min_margin for spread in spreads)
    parts = [f"{len(groups)} groups (tasks)"]
    if small:
        parts.append(f"{small} with fewer than two trainable episodes that did not fail (a group needs two: "
                     "sample several per task, e.g. group_size >= 2, and check the episodes' errors)")  # fmt: skip
    if alike:
        parts.append(f"{alike} whose rewards differ by no more than --min-margin {min_margin:g} (every sample "
                     "scored alike: nothing to prefer; sample at a higher temperature or lower --min-margin)")  # fmt: skip
    rest = len(groups) - small - alike
    if rest:
        parts.append(f"{rest} whose best and worst episodes share every turn")
    return "; ".join(parts)


def _config(cls: Any, args: argparse.Namespace, fixed: dict[str, Any]) -> Any:
    """The learner config from the flags, after checking the output directory and the input file.

    Raises:
        ConfigError: a bad or unknown ``--set`` field, an output directory that cannot be written, a missing
            input file.
    """
    from agentrl.learners.config import unknown_keys
    from agentrl.pipeline.config import apply_overrides, raise_unknown_keys, set_layers

    phase = "sft" if cls.__name__ == "SFTConfig" else "dpo"
    values = apply_overrides({"model": args.model, **fixed}, args.overrides)
    raise_unknown_keys(unknown_keys(values, cls), set_layers(args.overrides))
    values["output_dir"] = Path(args.output_dir) / "checkpoints" / phase
    config = cls(**values)
    from agentrl.tracking import check_output_dir

    check_output_dir(args.output_dir, "--output-dir")
    path = getattr(args, "buffer", None)
    if path is not None and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"--buffer {path} {what}: pass a JSONL file ({_INPUTS[phase, 'buffer']})")
    if getattr(args, "data", None) is not None:
        from agentrl.data.sources import check_source

        check_source(args.data, "--data")
        _source_options(args)
    return config


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--columns``, ``--split``, ``--subset`` as :func:`agentrl.data.sources.load_records` options."""
    from agentrl.data.sources import parse_columns

    return {"columns": parse_columns(args.columns), "split": args.split, "name": args.subset}


_INPUTS = {("dpo", "buffer"): "trajectories, e.g. a run's trajectories.jsonl"}


def _env_kwargs(text: str) -> dict[str, Any]:
    """``--env-kwargs`` as a mapping.

    Raises:
        ConfigError: not a JSON object.
    """
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--env-kwargs {text!r} is not JSON ({exc.msg} at column {exc.colno}); write an "
                          """object, e.g. --env-kwargs '{"split": "test"}'""") from None  # fmt: skip
    if not isinstance(value, dict):
        raise ConfigError(f"--env-kwargs {text!r} must be a JSON object of keyword arguments, e.g. "
                          """'{"split": "test"}'""")  # fmt: skip
    return value


def _tracking(flag: str) -> Any:
    """``--report-to`` as tracker settings (``none``: no tracker).

    Raises:
        ConfigError: an unknown tracker name.
    """
    from agentrl.trackers import TrackerSettings, check_report_to

    names = [] if flag.strip().lower() == "none" else [n.strip() for n in flag.split(",") if n.strip()]
    return TrackerSettings(check_report_to(names))


def _print(config: Any) -> int:
    import yaml

    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _run(phase: str, args: argparse.Namespace, config: Any, train: Callable[[Callable[[Any], None]], Any]) -> Any:
    """Run ``train(on_step)`` with the phase logged to the run directory and shown as progress."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from agentrl.progress import Progress
    from agentrl.tracking import RunDir

    out = RunDir(args.output_dir, tracking=_tracking(args.report_to))
    out.write_config(config)
    out.start_phase(phase, total=config.max_steps)
    try:
        with Progress(phase, config.max_steps) as bar:

            def on_step(log: Any) -> None:
                out.log(phase, log.step, vars(log))
                bar.update(log.step, vars(log))

            result = train(on_step)
        out.finish_phase(phase)
    finally:
        out.close()
    return result
