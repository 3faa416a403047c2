"""``agentrl eval``: any registered env × any policy, k samples per task, resumable, with a report.

Examples::

    agentrl eval --env code-sandbox --env-arg tasks=eval --pass-on correct --temperature 0 --max-turns 1 \\
        --max-new-tokens 160 --n 20 --model runs/<train run>/checkpoints/rl/step-NNNNNN
        # the model `agentrl train --env code-sandbox` wrote, greedy on 20 held-out functions: under a minute
    agentrl eval --env code-sandbox --env-arg tasks=humaneval --task-option task_index --pass-on correct \\
        --n 164 --k 10 --model Qwen/Qwen2.5-0.5B-Instruct --backend vllm --temperature 0.8 --out runs/eval/he
    agentrl eval --env math --base-url https://api.openai.com/v1 --model gpt-4o-mini \\
        --api-key-env OPENAI_API_KEY --n 50
    agentrl eval --env math --task-option task --n 50 --k 8 --pass-on correct --maj-k --answer-format boxed \\
        --best-of-n-by rm:runs/rm/step-000200 --out runs/eval/math   # best-of-N and maj@k beside pass@k
    agentrl eval --env code-sandbox --env-arg tasks=humaneval --task-option task_index --n 164 --k 10 \\
        --model runs/<train run>/checkpoints/rl/step-NNNNNN --env-workers 4 --ray-address auto
        # the same episodes on a Ray cluster: sandboxes on 4 env workers, the checkpoint on 1 engine
    agentrl eval --report-only --out runs/eval/he --pass-threshold 0.5   # rescore: no model needed
    agentrl eval --compare runs/eval/a runs/eval/b

The module's top level imports only the standard library, so ``agentrl --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agentrl.types import DEFAULT_DEADLINE_S

__all__ = ["add_arguments", "env_arg", "main"]


def env_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--env-arg``: VALUE parsed as JSON, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. tasks=humaneval), got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a plain string: a preset name, a path


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (e.g. 1,5,10), got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``agentrl eval`` options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (__doc__ or "").split("The module's")[0]
    what = parser.add_argument_group("what to evaluate")
    what.add_argument(
        "--env", help="registered env id (see `agentrl envs`), e.g. toy-guess-v0 or code-sandbox"
    )
    what.add_argument(
        "--env-arg",
        type=env_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="env constructor argument, repeatable; VALUE is JSON or a string (e.g. tasks=humaneval)",
    )
    what.add_argument(
        "--task-option",
        metavar="KEY",
        help="task i resets with options {KEY: i} (task_index for code-sandbox, task for math); "
        "default: task i is the env's draw under a seed derived from --seed and i",
    )
    what.add_argument("--n", type=int, default=10, help="tasks to play (default 10)")
    what.add_argument("--k", type=int, default=1, help="samples per task (default 1)")
    what.add_argument(
        "--ks",
        type=_ks,
        default=(),
        metavar="K1,K2",
        help="pass@k values to report, each <= --k (default: 1 and --k)",
    )
    policy = parser.add_argument_group("policy")
    policy.add_argument(
        "--model",
        default="tiny",
        help="local model directory, hub id or 'tiny'; with --base-url the served model's name",
    )
    policy.add_argument(
        "--backend",
        choices=("hf", "vllm", "openai"),
        help="generation backend (default: openai with --base-url, else hf)",
    )
    policy.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    policy.add_argument(
        "--no-model-check",
        action="store_true",
        help="with --base-url, skip asking /v1/models whether it serves --model (for a server that takes "
        "names it does not list)",
    )
    policy.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    policy.add_argument(
        "--tokenizer",
        help="tokenizer for rendering and token counts (default: the model's; "
        "'tiny' for chat endpoints, whose counts are then approximate)",
    )
    policy.add_argument(
        "--prompt-format",
        choices=("token_ids", "messages"),
        help="send token ids or chat messages (default: messages for --base-url, else token_ids)",
    )
    policy.add_argument(
        "--template", help="chat template: 'chatml' or a Jinja string (default: the tokenizer's)"
    )
    policy.add_argument(
        "--history", choices=("append", "keep_reasoning", "turn_split"), default="append",
        help="how earlier turns reach the next prompt (default append; `agentrl check --model M` says which "
        "the model's template takes: turn_split or keep_reasoning for thinking models)",
    )  # fmt: skip
    policy.add_argument("--tool-format", help="the model's tool-call markup, e.g. llama3_json (default: detected)")
    policy.add_argument("--device", help="device of a local model (default: cuda if visible, else cpu)")
    policy.add_argument(
        "--dtype", help="weights' dtype of a local model, e.g. bfloat16 (default: the checkpoint's)"
    )
    policy.add_argument("--max-context", type=int, help="context window (default: the backend's)")
    sampling = parser.add_argument_group("sampling and limits")
    sampling.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)"
    )
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    sampling.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens per turn at most (default 256)"
    )
    sampling.add_argument("--max-turns", type=int, help="assistant turns per episode (default: the env's)")
    sampling.add_argument(
        "--max-episode-tokens", type=int, help="sampled tokens per episode (default: no cap)"
    )
    sampling.add_argument(
        "--episode-timeout", type=float, metavar="SECONDS", default=DEFAULT_DEADLINE_S,
        help=f"wall-clock limit per episode; a hung env ends its episode (default {DEFAULT_DEADLINE_S:g})",
    )
    sampling.add_argument("--seed", type=int, default=0, help="every reset and sampling seed derives from it")
    sampling.add_argument("--concurrency", type=int, default=8, help="episodes in flight (default 8)")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--pass-on",
        metavar="reward|COMPONENT",
        help="what a pass compares: the total reward (default) or one reward component's sum over turns",
    )
    scoring.add_argument(
        "--pass-threshold",
        type=float,
        help="an episode passes when that value is >= this (default 1.0)",
    )
    scoring.add_argument(
        "--best-of-n-by",
        metavar="SOURCE:ARG",
        help="report best-of-N for each k, picking by this scorer: component:<reward component> (e.g. "
        "component:correct), rm:<trained reward model directory>, judge:<judge model directory, hub id or "
        "judge.yaml> or judge:<base url>#<served model> (an LLM judge's score)",
    )
    scoring.add_argument(
        "--maj-k",
        action="store_true",
        default=None,
        help="report majority vote (maj@k) over the final answers for each k",
    )
    scoring.add_argument(
        "--answer-format",
        choices=("boxed", "answer_tag", "hashes", "number", "any"),
        help="where maj@k finds the answer in the final assistant message (default any); needs --maj-k",
    )
    scoring.add_argument("--resamples", type=int, help="bootstrap resamples (default 1000)")
    scoring.add_argument("--confidence", type=float, help="interval coverage (default 0.95)")
    on_ray = parser.add_argument_group(
        "cluster (Ray)",
        "play the episodes on Ray env workers, with the checkpoint on generation engines (or, with --base-url, "
        "each worker calling the endpoint); any of these turns it on. The keys are a training run's cluster "
        "section (agentrl.cluster.config.ClusterConfig)",
    )
    on_ray.add_argument("--env-workers", type=int, metavar="N", help="env-worker actors (default 2)")
    on_ray.add_argument("--engines", type=int, metavar="N", help="generation-engine actors (default 1)")
    on_ray.add_argument(
        "--ray-address", metavar="ADDR", help="join this Ray cluster ('auto', 'ray://head:10001'); "
        "default: start a local instance for the run",
    )  # fmt: skip
    on_ray.add_argument(
        "--episodes-per-worker", type=int, metavar="N", help="episodes one env worker plays at once (default 64)"
    )
    on_ray.add_argument(
        "--cluster-setup", action="append", default=[], metavar="MODULE",
        help="module every actor (and this process) imports first, where your envs register themselves; repeatable",
    )  # fmt: skip
    on_ray.add_argument(
        "--cluster", type=env_arg, action="append", default=[], metavar="KEY=VALUE",
        help="any other cluster key, repeatable, e.g. engine_gpus=1, engine_device=cuda, episode_retries=3",
    )  # fmt: skip
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        help="output directory; rerunning with it resumes (default runs/eval/<env>-<model>-seed<seed>)",
    )
    output.add_argument(
        "--retry-errors", action="store_true", help="play again episodes that ended in an error"
    )
    output.add_argument(
        "--report-only",
        action="store_true",
        help="play nothing: rescore the episodes in --out (e.g. with another pass rule)",
    )
    output.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A", "B"),
        help="compare two output directories (B - A with intervals); with --out, also write there",
    )
    output.add_argument("--quiet", action="store_true", help="no progress output")
    output.add_argument(
        "--report-to",
        default="none",
        metavar="A,B",
        help="also log the summary metrics (phase 'eval', step 0) to these trackers: tensorboard, wandb, "
        "mlflow, trackio (TensorBoard, W&B and MLflow files go under --out); default none",
    )


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> Any:
    from agentrl.errors import ConfigError
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.metrics import PassRule

    if not args.env:
        raise ConfigError(
            "--env is required: a registered env id (`agentrl envs` lists them), e.g. --env toy-guess"
        )
    cluster = _cluster(args)
    config = EvalConfig(
        env=args.env,
        env_kwargs=dict(args.env_arg),
        task_option=args.task_option,
        backend=args.backend or ("openai" if args.base_url else "hf"),
        model=args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        tokenizer=args.tokenizer,
        prompt_format=args.prompt_format,
        template=args.template,
        history=args.history,
        tool_format=args.tool_format,
        n=args.n,
        k=args.k,
        ks=args.ks,
        concurrency=args.concurrency,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
        max_episode_tokens=args.max_episode_tokens,
        episode_timeout_s=args.episode_timeout,
        max_context=args.max_context,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        pass_rule=PassRule(
            args.pass_on or "reward", 1.0 if args.pass_threshold is None else args.pass_threshold
        ),
        best_of_n_by=args.best_of_n_by,
        maj_k=bool(args.maj_k),
        answer_format=args.answer_format or "any",
        resamples=args.resamples or 1000,
        confidence=args.confidence or 0.95,
        retry_errors=args.retry_errors,
        check_model=not args.no_model_check,
        cluster=cluster,
        out=args.out,
    )
    from agentrl.tracking import check_output_dir

    check_output_dir(config.out_dir, "--out")
    return config


def _cluster(args: argparse.Namespace) -> dict[str, Any] | None:
    """The cluster flags as ``EvalConfig.cluster`` (None: none given); imports the ``setup`` modules here too,
    so ``--env`` resolves in this process as in the actors."""
    import importlib

    from agentrl.errors import ConfigError

    named = {"env_workers": args.env_workers, "engines": args.engines, "address": args.ray_address,
             "episodes_per_worker": args.episodes_per_worker, "setup": args.cluster_setup or None}  # fmt: skip
    cluster = {**dict(args.cluster), **{key: value for key, value in named.items() if value is not None}}
    if not cluster:
        return None
    for module in cluster.get("setup") or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--cluster-setup {module}: cannot import it here ({exc}); check the name") from exc
    return cluster


def _print_outcome(outcome: Any) -> None:
    from agentrl.evaluation.report import format_summary

    print(format_summary(outcome.results))
    print(f"results: {outcome.out / 'results.json'}")
    print(f"report:  {outcome.out / 'report.html'}")


def _tracker_names(flag: str) -> tuple[str, ...]:
    """``--report-to`` checked against the tracker registry (raises ConfigError naming an unknown one)."""
    from agentrl.trackers import check_report_to

    return check_report_to([n.strip() for n in flag.split(",") if n.strip() and n.strip().lower() != "none"])


def _report_to_trackers(flag: str, outcome: Any, config: Any) -> None:
    """Log the summary's numbers (``pass_at_k/1/value``, ``reward/value``, ...) to the ``--report-to`` trackers."""
    from agentrl.trackers import TrackerSettings, open_trackers

    names = _tracker_names(flag)
    if not names:
        return

    def numbers(node: Any, prefix: str = "") -> dict[str, float | int]:
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in numbers(child, f"{prefix}{key}/").items()}
        keep = isinstance(node, int | float) and not isinstance(node, bool) and node == node
        return {prefix.rstrip("/"): node} if keep else {}

    trackers = open_trackers(TrackerSettings(names), Path(outcome.out), config.to_dict())
    try:
        for tracker in trackers:
            tracker.start_phase("eval", 0, False)
            tracker.log("eval", 0, numbers(outcome.results["metrics"]), time.time())
    finally:
        for tracker in trackers:
            tracker.close()


def _compare(args: argparse.Namespace) -> int:
    from agentrl.evaluation.compare import compare_runs, format_compare, load_results, render_compare

    a, b = (load_results(path) for path in args.compare)
    result = compare_runs(
        a, b, resamples=args.resamples or 1000, confidence=args.confidence or 0.95, seed=args.seed
    )
    print(format_compare(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(
            json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8"
        )
        (args.out / "compare.html").write_text(render_compare(result), encoding="utf-8")
        print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.html'}")
    return 0


def _report_only(args: argparse.Namespace) -> int:
    from agentrl.errors import ConfigError
    from agentrl.evaluation.harness import report_only

    if args.out is None:
        raise ConfigError("--report-only needs --out: the output directory of an earlier agentrl eval")
    outcome = report_only(
        args.out,
        echo=_echo,
        pass_on=args.pass_on,
        pass_threshold=args.pass_threshold,
        ks=args.ks or None,
        resamples=args.resamples,
        confidence=args.confidence,
        best_of_n_by=args.best_of_n_by,
        maj_k=args.maj_k,
        answer_format=args.answer_format,
    )
    _print_outcome(outcome)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``agentrl eval``; returns the exit code (130 when interrupted, 1 when every episode failed)."""
    if args.answer_format and not args.maj_k:
        from agentrl.errors import ConfigError

        raise ConfigError(
            "--answer-format is where maj@k reads answers: add --maj-k, or drop --answer-format"
        )
    if args.compare:
        return _compare(args)
    if args.report_only:
        return _report_only(args)
    from agentrl.evaluation.harness import evaluate

    config = _config(args)
    _tracker_names(args.report_to)
    if config.k > 1 and config.temperature == 0:
        _echo("note: --temperature 0 samples greedily, so the k samples of a task will be (nearly) alike")
    try:
        outcome = evaluate(config, echo=_echo, show_progress=not args.quiet)
    except KeyboardInterrupt:
        _echo(
            f"\ninterrupted: the finished episodes are saved in {config.out}; rerun the same command to resume"
        )
        return 130
    _print_outcome(outcome)
    _report_to_trackers(args.report_to, outcome, config)
    if outcome.failed_all:
        first = outcome.results["metrics"]["errors"]["top"][0]["error"]
        _echo(
            f"agentrl: error: every episode played failed; the first error: {first}\nFix that and rerun with "
            "--retry-errors (the failed episodes are kept in the output directory until then)."
        )
        return 1
    return 0
