"""``check_env``: does an environment honour the Env contract? Our checks, then Gymnasium's own.

Run it on every env you write (``agentrl.checker.check_env(agentrl.make("my-env-v0"))``); the test suite runs
it over the whole registry. Checks:

- types: reset/step return named tuples of the declared types; observations are chat messages the env
  wrote (never ``assistant``: env text must never look policy-sampled, or its tokens would be trained on);
  ``info["tools"]`` holds valid tool schemas; rewards are finite and ``info["reward_components"]`` sums to
  the reward;
- robustness: garbage and malformed tool calls come back as observations, never as exceptions;
- seed reproducibility: the same seed and actions give the same episode, through the sync and the async API;
- outcome: an episode played to its end reaches the outcome reward, which must be finite: the env's reference
  episode (``demonstration(0)``, played through the env) where it has one, and a chat turn repeated until the
  env ends the episode (at most :data:`OUTCOME_TURNS` turns);
- masks (given a tokenizer): a scripted episode's token ledger has mask 1 exactly on the sampled tokens;
- close: ``close()`` twice is fine, and the env leaves no child process (sandbox) running;
- Gymnasium's ``gymnasium.utils.env_checker.check_env``, with its warnings treated as failures.

:func:`describe_model` says what a model's tokenizer brings: its tool-call format and which history modes its
chat template can carry (``agentrl check --model <dir>`` prints it).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, EnvCheckError
from agentrl.types import StopReason

__all__ = ["DEFAULT_PROBES", "OUTCOME_TURNS", "ModelReport", "check_env", "describe_model"]

OUTCOME_TURNS = 64
"""Turns the outcome check plays before it gives up on the env ending an episode (then it checks nothing more)."""

DEFAULT_PROBES: tuple[str, ...] = (
    "Hello! I am not sure what to do.",
    "<tool_call>\n{\"name\": \"no_such_tool\", \"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": ",
    "<tool_call>\n[1, 2, 3]\n</tool_call>",
    "",
    "\x00\ufffd\U0001f600 " * 50,
)
"""Actions every env must survive: chat, an unknown tool, truncated and ill-typed calls, empty, odd bytes."""


def _fail(check: str, detail: str) -> EnvCheckError:
    return EnvCheckError(f"[{check}] {detail}")


def _check_reset(env: Env, result: Any) -> None:
    if not isinstance(result, tuple) or len(result) != 2:
        raise _fail("types", f"reset() must return (observation, info), got {type(result).__name__}")
    obs, info = result
    _check_observation(env, obs, "reset()")
    if not isinstance(info, dict):
        raise _fail("types", f"reset() info must be a dict, got {type(info).__name__}")
    tools = info.get("tools", [])
    if not isinstance(tools, list):
        raise _fail("types", "info['tools'] must be a list of OpenAI tool schemas")
    for schema in tools:
        fn = schema.get("function") if isinstance(schema, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("parameters"), dict)):
            raise _fail("types", f"invalid tool schema in info['tools']: {schema!r}; need {{'type': 'function', "
                        "'function': {'name': ..., 'parameters': {...}}}")


def _check_observation(env: Env, obs: Any, where: str) -> None:
    if not env.observation_space.contains(obs):
        raise _fail("types", f"{where} observation {obs!r:.200} is not in {env.observation_space}: "
                    "it must be a list of {'role', 'content': str} dicts")
    for message in obs:
        if message["role"] == "assistant":
            raise _fail("masks", f"{where} returned an assistant message; env text must use the user/tool/system "
                        "roles, or the ledger would train on tokens the policy never sampled")


def _check_step(env: Env, result: Any, where: str) -> None:
    if not isinstance(result, tuple) or len(result) != 5:
        raise _fail("types", f"{where} must return (obs, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = result
    _check_observation(env, obs, where)
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        raise _fail("types", f"{where} reward must be a finite float, got {reward!r}")
    if not isinstance(terminated, bool) or not isinstance(truncated, bool):
        raise _fail("types", f"{where} terminated/truncated must be bools, got {terminated!r}, {truncated!r}")
    components = info.get("reward_components") if isinstance(info, dict) else None
    if not isinstance(components, dict) or not all(isinstance(v, (int, float)) for v in components.values()):
        raise _fail("types", f"{where} info['reward_components'] must be a dict of named floats")
    if components and not math.isclose(sum(components.values()), reward, rel_tol=1e-6, abs_tol=1e-6):
        raise _fail("types", f"{where} reward {reward} is not the sum of its components {components}")


def _play(env: Env, seed: int, actions: Sequence[str]) -> list[Any]:
    """Reset with ``seed`` and play ``actions`` until the episode ends; returns every result."""
    results: list[Any] = [env.reset(seed=seed)]
    _check_reset(env, results[0])
    for i, action in enumerate(actions):
        try:
            result = env.step(action)
        except Exception as exc:
            raise _fail("robustness", f"step({action!r:.80}) raised {type(exc).__name__}: {exc}; bad actions must "
                        "become observations for the model") from exc
        _check_step(env, result, f"step #{i}")
        results.append(result)
        if result[2] or result[3]:
            break
    return results


async def _aplay(env: Env, seed: int, actions: Sequence[str]) -> list[Any]:
    results: list[Any] = [await env.areset(seed=seed)]
    for action in actions:
        results.append(await env.astep(action))
        if results[-1][2] or results[-1][3]:
            break
    return results


def _child_pids() -> set[int]:
    """Live child processes of this process (Linux); an empty set elsewhere."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def _check_masks(env: Env, tokenizer: Any, seed: int, actions: Sequence[str]) -> None:
    from agentrl.data.trajectory import LedgerBuilder
    from agentrl.models.chat import ChatRenderer

    obs, info = env.reset(seed=seed)
    renderer = ChatRenderer(tokenizer, info.get("tools"))
    history = list(obs)
    ledger = LedgerBuilder(renderer.prompt_ids(history), history)
    sampled_positions: list[int] = []
    for action in actions:
        ids = [*renderer.encode(action), tokenizer.eos_token_id]
        sampled_positions += range(len(ledger.ids), len(ledger.ids) + len(ids))
        ledger.add_sampled(ids, [-1.0] * len(ids))
        new_obs, reward, terminated, truncated, _ = env.step(action)
        ledger.set_reward(reward)
        if terminated or truncated:
            break
        ledger.add_observation(renderer.observation_ids(history, renderer.decode(ids), new_obs))
        history += [renderer.assistant_message(renderer.decode(ids)), *new_obs]
    trajectory = ledger.finish(StopReason.TERMINATED)
    trained = [i for i, m in enumerate(trajectory.loss_mask) if m]
    if trained != sampled_positions:
        raise _fail("masks", f"loss mask covers positions {trained[:20]}..., the sampled tokens are "
                    f"{sampled_positions[:20]}...")


def _run_gymnasium_checker(env: Env) -> None:
    from gymnasium.utils.env_checker import check_env as gym_check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # With no spec and no render modes there is nothing to render-check; gymnasium would only warn.
            gym_check_env(env, skip_render_check=env.spec is None and not env.metadata.get("render_modes"))
        except AssertionError as exc:
            raise _fail("gymnasium", str(exc)) from exc
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if messages:
        raise _fail("gymnasium", "gymnasium's checker warned: " + "; ".join(messages))


def check_env(
    env: Env,
    *,
    actions: Sequence[str] | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    skip_gymnasium: bool = False,
    make_env: Callable[[], Env] | None = None,
) -> list[str]:
    """Check ``env`` against the Env contract; returns the names of the checks that passed.

    Args:
        env: the environment (unwrapped, or built with ``agentrl.make``).
        actions: a scripted episode to play; defaults to :data:`DEFAULT_PROBES` (garbage the env must survive).
        seed: the seed used for the reproducibility checks.
        tokenizer: a Hugging Face tokenizer with a chat template; enables the mask check.
        skip_gymnasium: leave out Gymnasium's own checker.
        make_env: builds a fresh env for the close/leak check (default: ``env.spec.make`` when available).

    Raises:
        EnvCheckError: the first failed check, named in brackets, with what to fix.
    """
    if not isinstance(env.unwrapped, Env):
        raise _fail("types", f"{type(env).__name__} is not an agentrl.Env subclass")
    env = env.unwrapped
    actions = list(actions if actions is not None else DEFAULT_PROBES)
    children_before = _child_pids()
    passed = []

    first = _play(env, seed, actions)
    passed += ["types", "robustness"]
    second = _play(env, seed, actions)
    if repr(first) != repr(second):
        raise _fail("seeding", f"reset(seed={seed}) and the same actions gave different episodes:\n"
                    f"{first!r:.400}\n{second!r:.400}")
    # The env's own loop, so loop-bound resources made by the sync calls stay valid.
    if repr(env._run_sync(_aplay(env, seed, actions))) != repr(first):
        raise _fail("async", "areset/astep disagree with reset/step for the same seed and actions")
    if not all(isinstance(r, (ResetResult, StepResult)) for r in first):
        raise _fail("types", "return ResetResult / StepResult (named tuples) from reset and step")
    passed += ["seeding", "async"]

    _check_outcome(env, seed)
    passed.append("outcome")

    if tokenizer is not None:
        _check_masks(env, tokenizer, seed, actions)
        passed.append("masks")

    if not skip_gymnasium:
        _run_gymnasium_checker(env)
        passed.append("gymnasium")

    _check_close(env, make_env, children_before)
    passed.append("close")
    return passed


def _check_outcome(env: Env, seed: int) -> None:
    """Reach the outcome reward, paid only when an episode ends: through the reference episode of task 0
    (a right answer) where the env has ``demonstration``, and through chat turns until the env ends it."""
    demonstration = getattr(env, "demonstration", None)
    if callable(demonstration):
        try:
            demonstration(0)
        except ConfigError as exc:
            if "no demonstration" not in str(exc):  # a task without one leaves the chat-only half to check
                raise _fail("outcome", f"the reference episode of task 0 (demonstration(0)) raised ConfigError: "
                            f"{exc}; the outcome reward of a finished episode must be a finite float (or named "
                            "floats)") from exc  # fmt: skip
        except Exception as exc:
            raise _fail("outcome", f"the reference episode of task 0 (demonstration(0)) raised "
                        f"{type(exc).__name__}: {exc}; the outcome reward of a finished episode must be a finite "
                        "float (or named floats)") from exc  # fmt: skip
    env.reset(seed=seed)
    for turn in range(OUTCOME_TURNS):
        try:
            result = env.step(DEFAULT_PROBES[0])
        except Exception as exc:
            raise _fail("outcome", f"step #{turn} of a chat-only episode raised {type(exc).__name__}: {exc}; the "
                        "reward of an episode that ends without an answer must be a finite float") from exc  # fmt: skip
        _check_step(env, result, f"step #{turn} of a chat-only episode")
        if result[2] or result[3]:
            return


def _check_close(env: Env, make_env: Callable[[], Env] | None, before: set[int]) -> None:
    env.close()
    try:
        env.close()
    except Exception as exc:
        raise _fail("close", f"a second close() raised {type(exc).__name__}: {exc}; close must be idempotent") from exc
    if make_env is None and env.spec is not None:
        make_env = env.spec.make  # type: ignore[assignment]  # gymnasium types it as returning its Env
    if make_env is not None:
        fresh = make_env()
        fresh.reset(seed=0)
        fresh.step(DEFAULT_PROBES[0])
        fresh.close()
        fresh.close()
    leaked = _child_pids() - before
    if leaked:
        raise _fail("close", f"processes {sorted(leaked)} are still running after close(); release sandboxes "
                    "and subprocesses in close()/aclose()")


@dataclass(frozen=True)
class ModelReport:
    """What a tokenizer brings to the ledger.

    Attributes:
        tool_format: the detected tool-call format's name (see :mod:`agentrl.tool_formats`).
        format_source: ``"response_template"``, ``"chat_template"`` or ``"default"`` (nothing recognized).
        template: which template renders: ``"tokenizer"`` (its own), ``"chatml"`` or ``"custom"``.
        history: per history mode, None when the template carries it, else the first line of why not.
    """

    tool_format: str
    format_source: str
    template: str
    history: Mapping[str, str | None]

    @property
    def recommended(self) -> str | None:
        """The first history mode that works, in the order append, keep_reasoning, turn_split."""
        return next((mode for mode, problem in self.history.items() if problem is None), None)

    def lines(self) -> list[str]:
        """The report as lines for people."""
        sources = {"response_template": "the tokenizer's response_template", "chat_template": "its chat template",
                   "default": "nothing recognized; the default"}  # fmt: skip
        out = [f"tool-call format: {self.tool_format} (from {sources[self.format_source]})",
               f"chat template: {self.template}"]  # fmt: skip
        out += [f"history {mode}: {'ok' if problem is None else 'refused: ' + problem}"
                for mode, problem in self.history.items()]  # fmt: skip
        out.append(f"use: history={self.recommended}" if self.recommended else "use: template=chatml")
        return out


def describe_model(tokenizer: Any, template: str | None = None) -> ModelReport:
    """Detect ``tokenizer``'s tool format and check its chat template (or ``template``) in every history mode."""
    from agentrl.models.chat import HISTORY_MODES, check_template
    from agentrl.tool_formats import detect_tool_format

    detection = detect_tool_format(tokenizer, template)
    history: dict[str, str | None] = {}
    for mode in HISTORY_MODES:
        try:
            check_template(tokenizer, template, history=mode)
            history[mode] = None
        except Exception as exc:  # a template may raise anything on the probe
            history[mode] = _why_refused(exc)
    kind = "tokenizer" if template is None else "chatml" if template == "chatml" else "custom"
    return ModelReport(detection.format.name, detection.source, kind, history)


def _why_refused(exc: Exception) -> str:
    """One short line: where a template stops extending the conversation, or the template's own error."""
    text = str(exc)
    at = text.find("first difference at character ")
    if at >= 0:
        where = text[at:].splitlines()[0].rstrip(":")
        return f"the template rewrites earlier turns ({where})"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:160]}"
