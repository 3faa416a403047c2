"""The ``agentrl`` command. Each subcommand imports what it needs when it runs, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _cmd_envs(args: argparse.Namespace) -> int:
    """List registered environments with their descriptions; report plug-ins that fail to load."""
    from agentrl.errors import PluginError
    from agentrl.registry import broken_plugins, list_envs

    rows, broken = [], dict(broken_plugins())
    for env_spec in list_envs():
        try:
            rows.append((env_spec.id, env_spec.summary(), env_spec.source))
        except PluginError as exc:
            broken[env_spec.id] = str(exc)
    broken.update(broken_plugins())
    width = max((len(r[0]) for r in rows), default=0)
    for env_id, summary, source in rows:
        line = f"{env_id:<{width}}  {summary}"
        print(f"{line}  [{source}]" if args.verbose else line)
    if not rows:
        print("no environments registered")
    for name, reason in sorted(broken.items()):
        print(f"broken plug-in {name}: {reason}", file=sys.stderr)
    _print_loaded_envs()
    return 0


LOADER_LISTINGS = {"verifiers": "agentrl.interop.verifiers:installed_environments"}
"""Loader scheme -> ``"module:function"`` listing the targets installed here, for ``agentrl envs``."""


def _print_loaded_envs() -> None:
    """The loader schemes, and the envs of each that are installed (e.g. verifiers packages), by id."""
    from agentrl._plugins import load_object
    from agentrl.errors import PluginError
    from agentrl.registry import list_loaders

    loaders = list_loaders()
    if not loaders:
        return
    print("\nloaders (ids <scheme>:<target>):")
    width = max(len(scheme) for scheme in loaders) + len(":<target>")
    for scheme, description in loaders.items():
        print(f"  {scheme + ':<target>':<{width}}  {description}")
    for scheme, target in LOADER_LISTINGS.items():
        if scheme not in loaders:
            continue
        try:
            found = load_object(target, f"the {scheme} listing")()
        except PluginError as exc:
            print(f"cannot list {scheme} envs: {exc}", file=sys.stderr)
            continue
        for name in found:
            print(f"{scheme}:{name}")


def _cmd_card(args: argparse.Namespace) -> int:
    """Measure an env's card (tasks, tools, reference pass rate, reward-hack probes, determinism, speed)."""
    from pathlib import Path

    from agentrl.cards import make_card, model_pass_at_k, write_card

    env_kwargs = dict(args.env_arg)
    echo = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    card = make_card(args.env, env_kwargs=env_kwargs, n=args.n, seeds=args.seeds,
                     pass_threshold=args.pass_threshold, echo=echo)  # fmt: skip
    slug = args.env.strip("/").replace("/", "_").replace(":", "_")
    out = Path(args.out) if args.out else Path("runs") / "cards" / slug
    if args.model:
        card.model = model_pass_at_k(args.env, env_kwargs, args.model, n=args.n, k=args.k,
                                     pass_threshold=args.pass_threshold, out=out / "eval")  # fmt: skip
    md, js = write_card(card, out)
    ref = card.reference
    print(f"{args.env}: {card.tasks} tasks; reference passed {ref.passed}/{ref.episodes}" if ref else
          f"{args.env}: {card.tasks} tasks; no reference policy")  # fmt: skip
    print(f"probes flagged: {', '.join(card.flagged_probes) or 'none'}; resets reproducible "
          f"{card.determinism['reproducible']}/{card.determinism['seeds']}")  # fmt: skip
    print(f"wrote {md} and {js}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Run the env checker on one registered environment; with ``--model``, say what the model's tokenizer
    brings (tool-call format, template, history modes) and check the env's token masks with it."""
    tokenizer = None
    if args.model:
        from agentrl.checker import describe_model
        from agentrl.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        print(f"model {args.model}:")
        for line in describe_model(tokenizer).lines():
            print(f"  {line}")
    if args.env is None:
        if tokenizer is None:
            print("agentrl check: give an environment id, --model, or both", file=sys.stderr)
            return 2
        return 0
    import agentrl
    from agentrl.checker import check_env

    if args.env_arg:
        from agentrl.pipeline.config import check_env_kwargs

        check_env_kwargs(args.env, dict(args.env_arg), "--env-arg")
    env = agentrl.make(args.env, **dict(args.env_arg))
    passed = check_env(env, tokenizer=tokenizer)
    print(f"{args.env}: passed {', '.join(passed)}")
    return 0


def _cmd_sandbox_build(args: argparse.Namespace) -> int:
    """Build the docker sandbox's image locally (no registry needed)."""
    from agentrl.errors import ConfigError
    from agentrl.sandbox import sandbox_class

    backend = sandbox_class("docker")
    build = getattr(backend, "build_image", None)
    if build is None:
        raise ConfigError("the installed 'docker' sandbox backend has no image to build")
    build(tag=args.tag, base=args.base, suite=args.suite, mirror=args.mirror, rebuild=args.rebuild)
    return 0


def _cmd_sandbox_gc(args: argparse.Namespace) -> int:
    """Remove what sandboxes left behind when their owner died (containers, cgroups), for every backend."""
    from agentrl.errors import PluginError
    from agentrl.sandbox import SandboxUnavailableError, list_sandboxes, sandbox_class

    failed = 0
    for name in args.backend or list_sandboxes():
        try:
            removed = sandbox_class(name).reap(everything=args.all)  # type: ignore[attr-defined]
        except (SandboxUnavailableError, PluginError) as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            failed += bool(args.backend)  # a backend asked for by name must be reachable
            continue
        print(f"{name}: removed {len(removed)}" + (f" ({', '.join(removed)})" if removed else ""))
    return 1 if failed else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve one environment over OpenEnv's protocol until interrupted."""
    from agentrl.interop.serve import serve

    where = f"http://{args.host}:{args.port}"
    print(f"agentrl serve: {args.env} as an OpenEnv server at {where} (sessions on {where.replace('http', 'ws', 1)}/ws)",
          file=sys.stderr, flush=True)  # fmt: skip
    serve(args.env, dict(args.env_arg), host=args.host, port=args.port, max_sessions=args.max_sessions,
          idle_timeout=args.idle_timeout or None)  # fmt: skip
    return 0


COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("agentrl.pipeline.cli_train", "train an agent: SFT tool-format phase, RL, held-out evaluation, report"),
    "sft": ("agentrl.pipeline.cli_offline:sft", "supervised fine-tuning on chat JSONL or an env's demonstrations"),
    "dpo": ("agentrl.pipeline.cli_offline:dpo", "DPO, IPO, KTO, ORPO or SimPO on preference JSONL or mined pairs"),
    "eval": ("agentrl.evaluation.cli", "evaluate a policy on an env: pass@k with CIs, rewards, HTML report; resumable"),
}
"""Subcommands living in their own modules: name -> (module, one-line help). Each module keeps its top level
light (no torch) and has ``add_arguments(parser)`` and ``main(args) -> int``; ``"module:x"`` names a module
holding several commands, as ``add_x_arguments`` and ``x_main``."""


def _add_command_parsers(sub: Any) -> None:
    import importlib

    for name, (target, summary) in COMMANDS.items():
        module_name, _, prefix = target.partition(":")
        parser = sub.add_parser(name, help=summary, description=summary)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a broken install must not take the other commands down
            parser.set_defaults(func=_unavailable(name, exc))
            continue
        getattr(module, f"add_{prefix}_arguments" if prefix else "add_arguments")(parser)
        parser.set_defaults(func=getattr(module, f"{prefix}_main" if prefix else "main"))


def _unavailable(name: str, exc: ImportError) -> Any:
    def fail(args: argparse.Namespace) -> int:
        from agentrl.errors import PluginError

        raise PluginError(f"`agentrl {name}` cannot load ({exc}); reinstall agentrl")

    return fail


def _add_bench_parsers(sub: Any) -> None:
    import importlib

    from agentrl.bench import BENCHES

    bench = sub.add_parser("bench", help="benchmarks, each side by side with its baseline")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module_name, summary) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # a bench whose module is not installed is simply not offered
        parser = bench_sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(parser)
        parser.set_defaults(func=module.main)


def build_parser() -> argparse.ArgumentParser:
    from agentrl.evaluation.cli import env_arg

    parser = argparse.ArgumentParser(
        prog="agentrl", description="Train and evaluate LLM agents with RL in multi-turn environments."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    envs = sub.add_parser("envs", help="list registered environments")
    envs.add_argument("-v", "--verbose", action="store_true", help="also show where each env comes from")
    envs.set_defaults(func=_cmd_envs)

    check = sub.add_parser("check", help="check an environment against the Env contract, or a model's template")
    check.add_argument("env", nargs="?", help="environment id, e.g. toy-guess-v0")
    check.add_argument("--model", help="say which tool-call format and history modes this model's tokenizer "
                       "supports ('tiny', a path or hub id), and check the env's token masks with it")
    check.add_argument("--env-arg", type=env_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="env constructor argument, repeatable; VALUE is JSON or a string (e.g. tasks=mbpp)")
    check.set_defaults(func=_cmd_check)

    card = sub.add_parser("card", help="measure an env's card: tasks, tools, reference pass rate, hack probes")
    card.add_argument("env", help="environment id, e.g. code-sandbox, verifiers:my-env or harbor:path/to/tasks")
    card.add_argument("--env-arg", type=env_arg, action="append", default=[], metavar="KEY=VALUE",
                      help="env constructor argument, repeatable; VALUE is JSON or a string")  # fmt: skip
    card.add_argument("--n", type=int, default=10, help="tasks each policy plays (default 10)")
    card.add_argument("--seeds", type=int, default=5, help="seeds of the determinism check (default 5)")
    card.add_argument("--pass-threshold", type=float, default=1.0, help="total reward that passes (default 1)")
    card.add_argument("--model", help="also evaluate this model's pass@k with the eval harness ('tiny', a dir)")
    card.add_argument("--k", type=int, default=4, help="samples per task for --model's pass@k (default 4)")
    card.add_argument("--out", help="output directory (default runs/cards/<env>)")
    card.add_argument("--quiet", action="store_true", help="no progress output")
    card.set_defaults(func=_cmd_card)

    serve = sub.add_parser("serve", help="serve an environment as an OpenEnv server (for TRL, SkyRL, OpenEnv clients)")
    serve.add_argument("env", help="environment id, e.g. code-sandbox")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--env-arg", type=env_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="env constructor argument, repeatable; VALUE is JSON or a string")  # fmt: skip
    serve.add_argument("--max-sessions", type=int, default=64, help="concurrent sessions, each its own env (default 64)")
    serve.add_argument("--idle-timeout", type=float, default=600.0,
                       help="seconds a session may stay silent before it is closed (0: never; default 600)")  # fmt: skip
    serve.set_defaults(func=_cmd_serve)

    sandbox = sub.add_parser("sandbox", help="build the docker sandbox image; reap leaked sandboxes")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    build = sandbox_sub.add_parser("build", help="build the docker sandbox's image locally (no registry needed)")
    build.add_argument("--tag", help="image tag (default: agentrl/sandbox-python:<Dockerfile hash>)")
    build.add_argument("--base", help="build on this local image (with /usr/bin/python3) instead of debootstrap")
    build.add_argument("--suite", help="Debian release for debootstrap (default: this machine's)")
    build.add_argument("--mirror", help="Debian mirror for debootstrap (default: the one apt uses here)")
    build.add_argument("--rebuild", action="store_true", help="build even if the image exists")
    build.set_defaults(func=_cmd_sandbox_build)
    gc = sandbox_sub.add_parser("gc", help="remove containers and cgroups of sandboxes whose owner died")
    gc.add_argument("--all", action="store_true", help="also remove sandboxes of owners still running")
    gc.add_argument("--backend", action="append", help="only this backend (repeatable; default: all)")
    gc.set_defaults(func=_cmd_sandbox_gc)
    _add_command_parsers(sub)
    _add_bench_parsers(sub)
    return parser


def _short_notes() -> None:
    """Show agentrl's config notes as one ``note:`` line each (other warnings keep Python's format)."""
    import warnings

    plain = warnings.formatwarning

    def formatwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
        if category.__name__ == "ConfigNote":
            return f"note: {message}\n"
        return plain(message, category, *args, **kwargs)

    warnings.formatwarning = formatwarning  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentrl`` console script."""
    import os

    from agentrl.errors import AgentRLError

    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning threads made
    # training steps 3-4x slower. Set OMP_WAIT_POLICY yourself to choose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    parser = build_parser()
    args = parser.parse_args(argv)
    _short_notes()
    if args.version:
        from agentrl import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AgentRLError as exc:
        print(f"agentrl: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS or (exc.errno not in _FULL and not exc.filename):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"agentrl: error: {exc.strerror}{where}. Files are written whole or not at all, so nothing already "
              "saved was lost: free space or fix permissions, then rerun the same command (`agentrl train "
              "--resume <run dir>` continues a training run from its last checkpoint)", file=sys.stderr)  # fmt: skip
        return 1


_FULL = {errno.ENOSPC, errno.EDQUOT}
_STORAGE_ERRORS = {*_FULL, errno.EROFS, errno.EACCES, errno.EPERM}
"""OSError numbers that are the machine's state, not a bug: a full disk or quota, or a read-only or
forbidden path (one the error names). The CLI reports them in a sentence; any other OSError keeps its
traceback."""


if __name__ == "__main__":
    sys.exit(main())
