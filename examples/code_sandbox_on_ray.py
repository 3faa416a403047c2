"""Train ``code-sandbox`` with its episodes (and their sandboxes) played by env workers on Ray.

The same ``agentrl train`` run as on one process, with a ``cluster`` section: two env-worker actors each run the
runner's episode loop and their own sandboxes, one generation engine samples for both, and the learner stays
here. ``learner.max_staleness=1`` makes it asynchronous: the next step's episodes play while this one trains,
and no sample is trained more than one weight version after it was sampled. It prints, per step, the reward
and what the cluster did (staleness, busy shares, episodes/s).

Run it:

    python examples/code_sandbox_on_ray.py              # starts a local Ray instance; a few minutes on a CPU
    python examples/code_sandbox_on_ray.py --address auto   # join a running cluster (`ray start --head`)
    python examples/code_sandbox_on_ray.py --small      # a CI-size run (or AGENTRL_EXAMPLE_SMALL=1)

The command line it stands for::

    agentrl train --env code-sandbox --set cluster.env_workers=2 --set cluster.engines=1 \\
        --set learner.max_staleness=1
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from agentrl.cli import main as agentrl_main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-workers", type=int, default=2, help="env-worker actors (default 2)")
    parser.add_argument("--engines", type=int, default=1, help="generation engines (default 1)")
    parser.add_argument("--max-staleness", type=int, default=1, help="the asynchronous bound (default 1)")
    parser.add_argument(
        "--address", default=None, help="a Ray address to join; default: start a local instance"
    )
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps (default 30)")
    parser.add_argument("--sft-demos", type=int, default=2000, help="SFT demonstrations first (default 2000)")
    parser.add_argument("--output-dir", default=None, help="the run directory (default: a temporary one)")
    parser.add_argument("--small", action="store_true", default=bool(os.environ.get("AGENTRL_EXAMPLE_SMALL")),
                        help="a CI-size run: no SFT, 3 small steps, no evaluation")  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="code-sandbox-ray-"))
    settings = [
        f"cluster.env_workers={args.env_workers}", f"cluster.engines={args.engines}",
        f"learner.max_staleness={args.max_staleness}", f"learner.max_steps={args.steps}",
        f"sft.demos={args.sft_demos}", "sft.learner.max_steps=100", "learner.max_seconds=null",
    ]  # fmt: skip
    if args.address:
        settings.append(f"cluster.address={args.address}")
    if args.small:
        settings += ["sft.demos=0", "learner.max_steps=3", "learner.prompts_per_step=2", "learner.group_size=2",
                     "learner.max_new_tokens=32", "learner.warmup_steps=0", "eval.tasks=0", "cluster.num_cpus=2"]  # fmt: skip
    command = ["train", "--env", "code-sandbox", "--output-dir", str(out), "--no-report"]
    code = agentrl_main([*command, *(arg for s in settings for arg in ("--set", s))])
    if code:
        raise SystemExit(code)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["phase"] != "rl":
            continue
        m = record["metrics"]
        print(f"step {record['step']:>3}  reward {m['reward_mean']:.3f}  staleness max {m['cluster/staleness_max']:.0f}  "
              f"engine busy {m['cluster/engine_busy']:.0%}  worker busy {m['cluster/worker_busy']:.0%}  "
              f"episodes/s {m['cluster/episodes_per_s']:.1f}  lost {m.get('cluster/lost', 0):.0f}")  # fmt: skip
    print(f"run: {out}")


if __name__ == "__main__":
    main()
