"""Evaluate a model on HumanEval with every program it writes run in the docker sandbox: pass@k and a report.

``code-sandbox-v0`` reads HumanEval from ``$AGENTRL_DATASETS/humaneval.jsonl`` (default: ``shared/datasets``
beside the checkout; nothing is downloaded). The model may test code with a ``run_python`` tool and ends
an episode with ``submit``; the hidden tests then run too. With ``sandbox="docker"`` each program runs in a
container with no network, every capability dropped, a read-only root and memory, process and CPU limits.

A sandbox that cannot start makes every grade a failure, not a crash, so this script first submits the
reference solution of task 0 through the same env: if that does not pass, it stops and says why before
any model is loaded.

Setup once: a running docker engine and the sandbox image, ``agentrl sandbox build`` (built locally from
a Debian root filesystem; no registry is needed).

Run it:

    python examples/eval_docker.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --n 164 --k 5 --max-new-tokens 768
    python examples/eval_docker.py --small         # the tiny model on 2 tasks (or AGENTRL_EXAMPLE_SMALL=1)

The same evaluation from the shell: ``agentrl eval --env code-sandbox-v0 --env-arg sandbox=docker
--env-arg tasks=humaneval --task-option task_index --pass-on correct --model ... --n 164 --k 5``.
Rerunning a command resumes its output directory: only the missing episodes are played.
"""

import argparse
import os
import sys
from pathlib import Path

import agentrl
from agentrl.evaluation.config import EvalConfig
from agentrl.evaluation.harness import evaluate
from agentrl.evaluation.metrics import PassRule
from agentrl.evaluation.report import format_summary


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a hub id or a local model directory")
    p.add_argument("--n", type=int, default=164, help="HumanEval tasks (the first n of 164)")
    p.add_argument("--k", type=int, default=1, help="samples per task; pass@1 and pass@k are reported")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens sampled per turn at most")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--concurrency", type=int, default=8, help="episodes (and sandboxes) at once")
    p.add_argument("--out", type=Path, default=None, help="default: runs/eval/<env>-<model>-seed0")
    p.add_argument("--small", action="store_true", help="a CI-size run: the tiny model on 2 tasks")
    args = p.parse_args()
    if args.small or os.environ.get("AGENTRL_EXAMPLE_SMALL") == "1":
        args.n, args.k, args.max_new_tokens, args.concurrency = 2, 1, 32, 2
    return args


def check_sandbox(env_kwargs: dict) -> None:
    """Submit task 0's reference solution: it passes only if the engine, the image and the grader all work."""
    env = agentrl.make("code-sandbox-v0", **env_kwargs)
    try:
        env.reset(seed=0, options={"task_index": 0})
        submission = env.demonstration(0, check=False)[-1]["content"]
        _, reward, _, _, info = env.step(submission)
    finally:
        env.close()
    grade = info.get("grade", {})
    if reward < 1.0:
        sys.exit(f"the docker sandbox failed its check ({grade.get('status')}: {grade.get('detail')}); is a "
                 "docker engine running, and was the image built with `agentrl sandbox build`?")  # fmt: skip
    passed = f"{grade['passed']}/{grade['total']}"
    print(f"sandbox check: the reference solution of {info['task_id']} passed {passed} hidden tests in docker")


def find_humaneval() -> None:
    """Stop with the fix, not a traceback, where HumanEval is not on this machine (nothing is downloaded)."""
    from agentrl_envs.code_sandbox.datasets import dataset_path

    from agentrl.errors import ConfigError

    try:
        dataset_path("humaneval.jsonl")
    except ConfigError as exc:
        sys.exit(f"{exc}. HumanEval is openai/human-eval's data/HumanEval.jsonl.gz, gunzipped and saved as "
                 "humaneval.jsonl (see the README's evaluation section)")  # fmt: skip


def main() -> None:
    args = parse_args()
    find_humaneval()
    env_kwargs = {"sandbox": "docker", "tasks": "humaneval"}
    check_sandbox(env_kwargs)
    config = EvalConfig(
        env="code-sandbox-v0", env_kwargs=env_kwargs, task_option="task_index",  # task i is HumanEval/i
        model=args.model, n=args.n, k=args.k, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
        pass_rule=PassRule("correct", 1.0),  # passed: every hidden test passes
        out=args.out,
    )  # fmt: skip
    outcome = evaluate(config, show_progress=not args.small)
    print(format_summary(outcome.results))
    print(f"results: {outcome.out / 'results.json'}")
    print(f"report: {outcome.out / 'report.html'}")


if __name__ == "__main__":
    main()
