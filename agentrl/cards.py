"""Environment cards: the facts about an env that users ask for and no one publishes, measured.

``agentrl card <env-id>`` builds the env and writes ``card.md`` and ``card.json``:

- **tasks**: how many, and the splits the env knows of (``splits``, ``split`` or a sized task set);
- **interface**: the turn limit and the tools (names and one-line descriptions);
- **reference policy**: the env's own reference episodes (``env.demonstration(i)``, the same ones the SFT
  phase trains on) replayed turn by turn: pass rate, mean reward, turns; for a model, pass@k with the eval
  harness (``--model``);
- **reward-hack probes**: answers that should score nothing (empty, a refusal, answer-shaped text with no
  content, the prompt echoed back, a burst of malformed tool calls), each played on the same tasks; any probe
  with a positive mean reward or a pass is flagged;
- **determinism**: ``reset(seed)`` twice per seed gives the same opening, and how many distinct openings the
  seeds give;
- **throughput**: reference episodes and steps per second with no model in the loop (the env and its
  sandbox only).

Every figure is measured when the card is made; nothing is copied from a description.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentrl.core import Env

__all__ = [
    "GRADER_PAYLOADS",
    "PROBES",
    "SHELL_PAYLOADS",
    "EnvCard",
    "PolicyResult",
    "determinism",
    "make_card",
    "model_pass_at_k",
    "render_markdown",
    "run_policy",
    "tool_probes",
    "write_card",
]

PROBES: dict[str, Callable[[str], str]] = {
    "empty": lambda prompt: "",
    "refusal": lambda prompt: "I don't know.",
    "answer-shaped": lambda prompt: "<answer></answer> \\boxed{} The answer is: ",
    "echo-prompt": lambda prompt: prompt,
    "malformed-tool-calls": lambda prompt: "<tool_call>\n{not json}\n</tool_call>\n" * 8,
}
"""Answers with no work in them, by name: a function of the task's last user message."""

_ANYTHING = """class _Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __hash__(self): return 0
def _anything(*args, **kwargs): return _Anything()
def __getattr__(name): return _anything
"""
GRADER_PAYLOADS: dict[str, str] = {
    "always-equal": _ANYTHING,
    "exit-before-tests": "import os\nos._exit(0)\n",
    "print-pass": "print('OK')\nprint('All tests passed')\nimport sys\nsys.exit(0)\n",
    "skip-tests": "import unittest\nraise unittest.SkipTest('skipped')\n",
}
"""Programs that pass a careless grader without solving anything, submitted through an env's code tool."""
SHELL_PAYLOADS: dict[str, str] = {
    "forge-reward-file": "mkdir -p /logs/verifier; echo 1 > /logs/verifier/reward.txt; "
    "echo '{\"reward\": 1}' > /logs/verifier/reward.json",
}
"""Commands that try to write the grade instead of earning it, run through an env's shell tool."""


def _call(tool: str, argument: str, value: str, prompt: str = "") -> str:
    """One tool call carrying ``value`` (plus, for the always-equal program, the functions ``prompt`` names)."""
    if value is _ANYTHING:
        value += _named_functions(prompt)
    return f"<tool_call>\n{json.dumps({'name': tool, 'arguments': {argument: value}})}\n</tool_call>"


def _named_functions(prompt: str) -> str:
    """Define every function the task names (``name(`` in backticks) as a call to ``_anything``."""
    import re

    names = sorted(set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\(", prompt)))
    return "".join(f"def {name}(*args, **kwargs): return _anything()\n" for name in names)


def _shell_probe(tool: str, argument: str, command: str, prompt: str) -> str:
    return _call(tool, argument, command)


def _code_probe(tool: str, argument: str, payload: str, prompt: str) -> str:
    return _call(tool, argument, payload, prompt)


def tool_probes(tools: Sequence[Mapping[str, Any]]) -> dict[str, Callable[[str], str]]:
    """Probes aimed at the grader through the env's own tools: a tool taking one string ``code``/``program``
    gets :data:`GRADER_PAYLOADS` (submitted as the solution); a ``bash``/``shell`` tool gets
    :data:`SHELL_PAYLOADS` (the turn after it ends the episode)."""
    probes: dict[str, Callable[[str], str]] = {}
    for schema in tools:
        fn = schema.get("function", {})
        name, params = str(fn.get("name", "")), fn.get("parameters", {}).get("properties", {})
        if name in ("bash", "shell") and len(params) == 1:
            (arg,) = params
            for label, command in SHELL_PAYLOADS.items():
                probes[label] = functools.partial(_shell_probe, name, arg, command)
        code_args = [a for a in params if a in ("code", "program", "source", "solution")]
        if code_args and name not in ("run_python", "python", "bash", "shell"):
            for label, payload in GRADER_PAYLOADS.items():
                probes[label] = functools.partial(_code_probe, name, code_args[0], payload)
    return probes


@dataclass(frozen=True)
class PolicyResult:
    """One scripted policy on the card's tasks.

    Attributes:
        episodes: episodes played.
        passed: episodes whose total reward reached the pass threshold.
        mean_reward / max_reward: over episodes (total reward per episode).
        mean_turns: assistant turns per episode.
        errors: episodes that raised (the first message is kept in ``error``).
        seconds: wall-clock seconds for all episodes.
        steps: env steps taken.
    """

    episodes: int
    passed: int
    mean_reward: float
    max_reward: float
    mean_turns: float
    errors: int = 0
    error: str | None = None
    seconds: float = 0.0
    steps: int = 0

    @property
    def pass_rate(self) -> float:
        return self.passed / self.episodes if self.episodes else 0.0


@dataclass
class EnvCard:
    """Everything ``agentrl card`` measured about one env (``card.json`` is ``asdict`` of it)."""

    env_id: str
    description: str
    env_kwargs: Mapping[str, Any]
    tasks: int | str
    splits: dict[str, int | str]
    max_turns: int | None
    tools: list[dict[str, str]]
    pass_threshold: float
    reference: PolicyResult | None
    reference_note: str
    probes: dict[str, PolicyResult]
    determinism: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged_probes(self) -> list[str]:
        return [n for n, r in self.probes.items() if r.passed or r.mean_reward > 1e-9]


def _task_count(env: Any) -> int | str:
    for name in ("tasks", "rows", "questions", "source"):
        value = getattr(env, name, None)
        if value is not None and hasattr(value, "__len__") and not isinstance(value, str):
            return len(value)
    source = getattr(env, "source", None)
    return f"generated ({type(source).__name__})" if source is not None else "unknown (seeded draws)"


def _splits(env: Any) -> dict[str, int | str]:
    splits = getattr(env, "splits", None)
    if isinstance(splits, Mapping):
        return dict(splits)
    split = getattr(env, "split", None) or getattr(getattr(env, "source", None), "split", None)
    return {str(split): _task_count(env)} if split else {}


def _tools(env: Env) -> list[dict[str, str]]:
    out = []
    for schema in env.tools:
        fn = schema.get("function", {})
        out.append(
            {"name": str(fn.get("name", "?")), "description": str(fn.get("description", "")).split("\n")[0]}
        )
    return out


def _play(
    env: Env, task: int, seed: int, policy: Callable[[int, list[dict[str, Any]]], str | None]
) -> tuple[float, int]:
    """One episode; ``policy(turn, messages)`` gives the next action, or None to stop. Returns (reward, turns)."""
    messages: list[dict[str, Any]] = [
        dict(m) for m in env.reset(seed=seed, options={"task": task}).observation
    ]
    total, turns = 0.0, 0
    limit = env.max_turns or 8
    while turns < limit:
        action = policy(turns, messages)
        if action is None:
            break
        step = env.step(action)
        turns += 1
        total += float(step.reward)
        messages += [{"role": "assistant", "content": action}, *(dict(m) for m in step.observation)]
        if step.terminated or step.truncated:
            break
    return total, turns


def run_policy(env: Env, tasks: Sequence[int], policy: Callable[[int, int, list[dict[str, Any]]], str | None],
               pass_threshold: float) -> PolicyResult:  # fmt: skip
    """Play ``policy(task, turn, messages)`` once on each task (reset seed = task index)."""
    rewards, turns, errors, first_error, steps = [], [], 0, None, 0
    start = time.perf_counter()
    for task in tasks:
        try:
            reward, n = _play(env, task, task, functools.partial(policy, task))
        except Exception as exc:  # a failing episode is data for the card
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
            continue
        rewards.append(reward)
        turns.append(n)
        steps += n
    seconds = time.perf_counter() - start
    played = len(rewards)
    return PolicyResult(
        episodes=played + errors,
        passed=sum(r >= pass_threshold for r in rewards),
        mean_reward=sum(rewards) / played if played else 0.0,
        max_reward=max(rewards, default=0.0),
        mean_turns=sum(turns) / played if played else 0.0,
        errors=errors,
        error=first_error,
        seconds=seconds,
        steps=steps,
    )


def _reference_policy(
    env: Any, tasks: Sequence[int]
) -> tuple[Callable[[int, int, list[dict[str, Any]]], str | None] | None, str]:
    """Replay of the env's reference actions; worked out for every task before any episode starts, since
    ``demonstration`` may play through the env itself."""
    actions_of = getattr(env, "demonstration_actions", None)
    demonstrate = getattr(env, "demonstration", None)
    if not callable(actions_of) and not callable(demonstrate):
        return None, "the env has no demonstration(task): no reference policy"
    actions: dict[int, list[str] | Exception] = {}
    for task in tasks:
        try:
            if callable(actions_of):
                actions[task] = list(actions_of(task))
            elif callable(demonstrate):
                actions[task] = [m["content"] for m in demonstrate(task) if m["role"] == "assistant"]
        except Exception as exc:  # reported as that task's error
            actions[task] = exc

    def policy(task: int, turn: int, messages: list[dict[str, Any]]) -> str | None:
        planned = actions[task]
        if isinstance(planned, Exception):
            raise planned
        return planned[turn] if turn < len(planned) else None

    return policy, "the env's reference episodes (demonstration(task)), replayed turn by turn"


def _probe_policy(probe: Callable[[str], str]) -> Callable[[int, int, list[dict[str, Any]]], str | None]:
    def policy(task: int, turn: int, messages: list[dict[str, Any]]) -> str | None:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if turn == 0:
            return probe(str(last_user))
        return "Done." if turn < 3 else None  # a tool probe's episode may need a turn without calls to end

    return policy


def determinism(env: Env, seeds: Sequence[int]) -> dict[str, Any]:
    """Does ``reset(seed)`` give the same opening twice, and how many distinct openings do the seeds give?"""
    same, openings = 0, set()
    for seed in seeds:
        first = json.dumps(env.reset(seed=seed).observation, sort_keys=True, default=str)
        second = json.dumps(env.reset(seed=seed).observation, sort_keys=True, default=str)
        same += first == second
        openings.add(first)
    return {"seeds": len(seeds), "reproducible": same, "distinct_openings": len(openings)}


def make_card(env_id: str, *, env_kwargs: Mapping[str, Any] | None = None, n: int = 10, seeds: int = 5,
              pass_threshold: float = 1.0, probes: Mapping[str, Callable[[str], str]] | None = None,
              echo: Callable[[str], None] = lambda line: None) -> EnvCard:  # fmt: skip
    """Build ``env_id`` and measure its card (see the module docstring).

    Args:
        env_id: a registered id or a loader id (``verifiers:...``, ``harbor:...``).
        env_kwargs: the env's keyword arguments.
        n: tasks played by each policy (the first ``n``, fewer if the env has fewer).
        seeds: seeds for the determinism check.
        pass_threshold: an episode passes when its total reward is at least this.
        probes: the reward-hack probes (default :data:`PROBES`).
        echo: where progress lines go.
    """
    import agentrl

    env = agentrl.make(env_id, **dict(env_kwargs or {}))
    try:
        count = _task_count(env)
        tasks = list(range(min(n, count) if isinstance(count, int) else n))
        echo(f"{env_id}: {count} tasks; playing {len(tasks)} with the reference policy")
        policy, note = _reference_policy(env, tasks)
        reference = run_policy(env, tasks, policy, pass_threshold) if policy else None
        results = {}
        for name, probe in (probes or {**PROBES, **tool_probes(env.tools)}).items():
            echo(f"{env_id}: probe {name}")
            results[name] = run_policy(env, tasks, _probe_policy(probe), pass_threshold)
        echo(f"{env_id}: determinism over {seeds} seeds")
        return EnvCard(
            env_id=env_id,
            description=env.description or (type(env).__doc__ or "").strip().split("\n")[0],
            env_kwargs=dict(env_kwargs or {}),
            tasks=count,
            splits=_splits(env),
            max_turns=env.max_turns,
            tools=_tools(env),
            pass_threshold=pass_threshold,
            reference=reference,
            reference_note=note,
            probes=results,
            determinism=determinism(env, list(range(seeds))),
        )
    finally:
        env.close()


def model_pass_at_k(env_id: str, env_kwargs: Mapping[str, Any], model: str, *, n: int, k: int,
                    pass_threshold: float, out: Path) -> dict[str, Any]:  # fmt: skip
    """A model's pass@k on the first ``n`` tasks (``options={"task": i}``) with the eval harness.

    Returns:
        The model, the harness's output directory and its summary metrics (pass@k with intervals).
    """
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.harness import evaluate
    from agentrl.evaluation.metrics import PassRule

    config = EvalConfig(env=env_id, env_kwargs=dict(env_kwargs), task_option="task", model=model, n=n, k=k,
                        pass_rule=PassRule("reward", pass_threshold), out=out)  # fmt: skip
    outcome = evaluate(config, echo=lambda line: None, show_progress=False)
    metrics = outcome.results.get("metrics", {})
    wanted = ("pass_at_k", "pass_rate", "reward", "reward_components", "turns", "stop_reasons", "errors")
    summary = {key: metrics[key] for key in wanted if key in metrics}
    if isinstance(summary.get("reward"), Mapping):
        summary["reward"] = {k: v for k, v in summary["reward"].items() if k != "distribution"}
    return {"model": model, "n": n, "k": k, "eval_dir": str(outcome.out), "metrics": summary}


def _row(name: str, r: PolicyResult) -> str:
    rate = r.steps / r.seconds if r.seconds > 0 else 0.0
    err = f" ({r.error})" if r.error else ""
    return (f"| {name} | {r.episodes} | {r.passed} ({r.pass_rate:.0%}) | {r.mean_reward:.3f} | {r.max_reward:.3f} "
            f"| {r.mean_turns:.1f} | {r.errors}{err} | {rate:.1f} |")  # fmt: skip


def render_markdown(card: EnvCard) -> str:
    """The card as Markdown, for people."""
    header = "| policy | episodes | passed | mean reward | max reward | turns | errors | steps/s |\n|---|---|---|---|---|---|---|---|"
    tools = "\n".join(f"- `{t['name']}`: {t['description']}" for t in card.tools) or "- none"
    splits = ", ".join(f"{k}: {v}" for k, v in card.splits.items()) or "not declared"
    det = card.determinism
    ref = _row("reference", card.reference) if card.reference else "| reference | – | – | – | – | – | – | – |"
    flagged = card.flagged_probes
    verdict = (f"**flagged**: {', '.join(flagged)} earned reward with no work in the answer" if flagged
               else "no probe earned reward")  # fmt: skip
    model = card.model or {"note": "no model evaluated (pass --model DIR to add one's pass@k)"}
    lines = [
        f"# Environment card: `{card.env_id}`", "", card.description, "",
        f"- env kwargs: `{json.dumps(card.env_kwargs, default=str)}`",
        f"- tasks: {card.tasks}; splits: {splits}",
        f"- turn limit: {card.max_turns}",
        f"- pass: total reward >= {card.pass_threshold:g}", "",
        "## Tools", "", tools, "",
        "## Reference policy", "", card.reference_note, "", header, ref, "",
        "## Reward-hack probes", "", verdict, "", header,
        *(_row(name, r) for name, r in card.probes.items()), "",
        "## Determinism", "",
        f"`reset(seed)` twice gave the same opening for {det['reproducible']} of {det['seeds']} seeds; "
        f"{det['distinct_openings']} distinct openings over those seeds.", "",
        "## Model", "", "```json", json.dumps(model, indent=2, default=str), "```", "",
        "Throughput (steps/s) is env and sandbox time only: the policies are scripted, no model runs.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_card(card: EnvCard, out: Path) -> tuple[Path, Path]:
    """Write ``card.md`` and ``card.json`` into ``out``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "card.md", out / "card.json"
    md.write_text(render_markdown(card))
    data = asdict(card) | {"flagged_probes": card.flagged_probes}
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js
