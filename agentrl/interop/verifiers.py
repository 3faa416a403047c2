"""verifiers environments as agentrl envs: ``agentrl.make("verifiers:<env-id>")``.

A verifiers environment (the ``verifiers`` package, ``load_environment(**args) -> vf.Environment``) owns its
rollout loop: it calls an OpenAI client for each model turn and answers with ``env_response``. agentrl's
contract is the other way round (the runner samples, the env answers). :class:`VerifiersEnv` joins the two
without re-implementing either: it runs the environment's own ``rollout`` in a task and hands it an OpenAI
client whose ``chat.completions.create`` *parks* the request until the agentrl policy answers through
``step``. So the environment's stop conditions, ``setup_state``, ``env_response``, tool calls, cleanup
handlers and rubric all run exactly as under a verifiers trainer.

The mapping:

- tasks: rows of the environment's eval dataset (``split="eval"``, which verifiers itself falls back to the
  train dataset for) or train dataset (``split="train"``); ``reset(options={"task_index": i})`` picks row
  ``i`` (``{"task": i}`` too), otherwise the reset seed draws one.
- observations: each model request's messages past what the agent has already seen. A verifiers
  environment that rewrites earlier messages (an override of ``get_prompt_messages``) would break the token
  ledger's prefix contract; the step raises :class:`~agentrl.errors.RolloutError` naming it instead.
- actions: the assistant's text; Hermes ``<tool_call>`` blocks become the OpenAI ``tool_calls`` a verifiers
  ``ToolEnv`` reads (the text stays the message's content). A malformed block is no call, as under a
  server's tool parser.
- rewards: the rubric scores the finished rollout (``Rubric.score_rollout``, as ``run_rollout`` does); each
  weighted reward function is a ``reward_components`` entry (``score * weight``), the zero-weight metrics go
  to ``info["metrics"]``. Group reward functions need every rollout of a group at once, which one env does
  not see; such rubrics are refused when loaded.
- ends: ``truncated`` when the environment stopped on ``max_turns_reached`` (a single-turn environment
  excepted) or ``prompt_too_long``, ``terminated`` otherwise. A rollout that verifiers ended with
  ``state["error"]`` (an empty reply, a tool error listed in ``stop_errors``) is scored as verifiers scores
  it and ends with ``info["error"]``; an exception that escapes the environment's rollout propagates from
  ``step`` (the runner records it).

Only chat environments are supported (``message_type="completion"`` is refused). Tested with verifiers
0.1.10, the newest release that installs beside ``mcp`` 2.3. verifiers 0.4's ``verifiers.v1`` taskset/harness
format (which pins ``mcp==2.0.0``) loads under the same ``verifiers:`` scheme through
:mod:`agentrl.interop.verifiers_v1`; :func:`load_verifiers_env` says which format an id gets.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, MissingDependencyError, RolloutError
from agentrl.tools import parse_tool_calls
from agentrl.types import Message

__all__ = ["VerifiersEnv", "installed_environments", "load_verifiers_env", "rubric_components"]

_TRUNCATING_STOPS = frozenset({"max_turns_reached", "prompt_too_long"})


def _import_verifiers() -> Any:
    try:
        import verifiers
    except ImportError as exc:
        raise MissingDependencyError(
            "verifiers environments need the `verifiers` package: pip install 'agentrl[verifiers]'"
        ) from exc
    return verifiers


def load_verifiers_env(target: str, **kwargs: Any) -> Env:
    """The ``verifiers:`` loader: ``target`` is an installed environment package's id.

    Two formats load under the one scheme. A v0 environment (``load_environment(**args)``, verifiers < 0.4)
    becomes a :class:`VerifiersEnv` in this process: keyword arguments named by it (``split``, ``model``)
    configure the adapter, all others go to ``load_environment``. A v1 taskset (verifiers >= 0.4) becomes a
    :class:`~agentrl.interop.verifiers_v1.VerifiersV1Env` played in a bridge process run by a verifiers 0.4
    interpreter (see that module for its options). The v1 format is chosen when ``python=`` names that
    interpreter, when this interpreter's verifiers is 0.4 or newer, when the package imports ``verifiers.v1``,
    or when the package is not importable here and ``AGENTRL_VERIFIERS_PYTHON`` names an interpreter.

    Raises:
        MissingDependencyError: verifiers is not installed (v0).
        ConfigError: the environment package is not installed, its ``load_environment`` failed, or the v1
            bridge refused it.
    """
    python = _v1_interpreter(target, kwargs.pop("python", None))
    if python is not None:
        from agentrl.interop.verifiers_v1 import VerifiersV1Env

        return VerifiersV1Env(target, python=python, **kwargs)
    vf = _import_verifiers()
    options = {key: kwargs.pop(key) for key in ("split", "model") if key in kwargs}
    try:
        environment = vf.load_environment(target, **kwargs)
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise ConfigError(
            f"verifiers environment {target!r} could not be loaded: {exc}. Install its package (e.g. "
            f"`prime env install {target}` or `pip install <its wheel>`) so that "
            f"`import {target.replace('-', '_').split('/')[-1]}` works. A verifiers v1 taskset (verifiers>=0.4) "
            f"loads through an interpreter that has it: set {V1_PYTHON_VAR} or pass python=."
        ) from exc
    return VerifiersEnv(environment, env_id=target, **options)


V1_PYTHON_VAR = "AGENTRL_VERIFIERS_PYTHON"
"""The environment variable naming the interpreter (verifiers >= 0.4) that plays v1 tasksets."""


def _v1_interpreter(target: str, python: str | None) -> str | None:
    """The interpreter that plays ``target`` as a v1 taskset, or None where it loads as a v0 environment
    (see :func:`load_verifiers_env` for the rule)."""
    import importlib
    import os
    import sys

    if python is not None:
        return python
    configured = os.environ.get(V1_PYTHON_VAR) or None
    if _verifiers_version() >= (0, 4):  # 0.2 and 0.3 ship an early, different verifiers.v1: not this format
        return configured or sys.executable
    module = target.rsplit("/", 1)[-1].split("@", 1)[0].replace("-", "_").lower()
    if not _has_module(module):
        return configured
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("verifiers.v1"):
            if configured is None:
                raise ConfigError(
                    f"verifiers environment {target!r} is a v1 taskset (it imports verifiers.v1), and this "
                    f"interpreter's verifiers is older than 0.4: set {V1_PYTHON_VAR} (or pass python=) to the "
                    "`python` of an environment that has verifiers>=0.4"
                ) from exc
            return configured
    except Exception:  # a broken v0 package is reported by the v0 loader, with its reason
        return None
    return None


def _verifiers_version() -> tuple[int, ...]:
    """This interpreter's verifiers release as numbers, ``()`` where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("verifiers")
    except PackageNotFoundError:
        return ()
    import re

    numbers = []
    for part in text.split(".")[:3]:
        leading = re.match(r"\d+", part)
        if leading is None:
            break
        numbers.append(int(leading.group()))
        if leading.end() < len(part):  # "0rc2": a pre-release of 1.0
            break
    return tuple(numbers)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installed_environments() -> list[str]:
    """Ids of installed verifiers environment packages: distributions that require ``verifiers`` and ship a
    top-level module of their own name. Reads package metadata only; imports nothing."""
    from importlib.metadata import distributions

    found = set()
    for dist in distributions():
        name = (dist.metadata["Name"] or "").strip()
        requires = [r.split(";")[0].strip().lower() for r in dist.requires or ()]
        if not name or name.lower().startswith("verifiers") or not any(_is_verifiers(r) for r in requires):
            continue
        module = name.replace("-", "_").lower()
        top_level = (dist.read_text("top_level.txt") or "").split()
        files = [str(f) for f in dist.files or ()]
        if module in top_level or any(f.split("/")[0].removesuffix(".py") == module for f in files):
            found.add(name)
    return sorted(found)


def _is_verifiers(requirement: str) -> bool:
    head = requirement.replace("_", "-")
    return head == "verifiers" or head.startswith(("verifiers[", "verifiers ", "verifiers>", "verifiers=",
                                                   "verifiers<", "verifiers!", "verifiers~"))  # fmt: skip


def rubric_components(
    rubric: Any, metrics: Mapping[str, float], reward: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Split a scored rollout into reward components (weighted functions) and plain metrics (weight 0).

    The components sum to ``reward``: any difference (a rubric subclass that scores its own way) is kept as
    ``rubric_residual`` so nothing of the reward goes unnamed.
    """
    names = list(rubric._get_reward_func_names())
    weights = list(rubric._get_reward_weights())
    weight_of: dict[str, float] = {}
    for name, weight in zip(names, weights, strict=False):
        weight_of[name] = weight_of.get(name, 0.0) + float(weight)
    components, plain = {}, {}
    for name, value in metrics.items():
        weight = weight_of.get(name, 0.0)
        if weight:
            components[name] = float(value) * weight
        else:
            plain[name] = float(value)
    residual = float(reward) - sum(components.values())
    if not math.isclose(residual, 0.0, abs_tol=1e-9):
        components["rubric_residual"] = residual
    return components, plain


def _group_reward_funcs(rubric: Any) -> list[str]:
    """Names of a rubric's group reward functions, through nested ``RubricGroup`` s."""
    names = list(rubric._get_group_reward_func_names())
    for inner in getattr(rubric, "rubrics", ()):
        names += _group_reward_funcs(inner)
    return names


@dataclass
class _Request:
    """One model call of the running rollout, parked until the policy answers."""

    messages: list[Message]
    tools: list[dict[str, Any]]
    reply: asyncio.Future[Any]


class _ParkingClient:
    """The OpenAI client handed to ``vf.Environment.rollout``: every chat request waits for ``step``."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[_Request] = asyncio.Queue()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        self.completions = SimpleNamespace(create=self._refuse)

    async def _create(self, *, model: str, messages: Sequence[Any], tools: Any = None, **_: Any) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.requests.put(_Request([_message(m) for m in messages], list(tools or ()), reply))
        return await reply

    async def _refuse(self, **_: Any) -> Any:
        raise ConfigError("completion-style verifiers environments are not supported; use a chat environment")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return str(content)


def _message(raw: Any) -> Message:
    """A verifiers message (a dict or a pydantic message) in agentrl's plain-dict form."""
    raw = raw.model_dump() if hasattr(raw, "model_dump") else dict(raw)
    message: dict[str, Any] = {"role": raw["role"], "content": _text(raw.get("content"))}
    for key in ("tool_calls", "tool_call_id", "name"):
        if raw.get(key):
            message[key] = raw[key]
    return message  # type: ignore[return-value]


def _completion(action: str, turn: int, model: str) -> Any:
    """The OpenAI ``ChatCompletion`` verifiers would get from a server that sampled ``action``."""
    from openai.types.chat import ChatCompletion

    calls = [
        {"id": f"call_{turn}_{i}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
        for i, c in enumerate(parse_tool_calls(action, max_blocks=None).calls)
    ]  # fmt: skip
    message = {"role": "assistant", "content": action, "tool_calls": calls or None}
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}
    return ChatCompletion.model_validate(
        {
            "id": f"agentrl-{turn}",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [choice],
        }
    )


class VerifiersEnv(Env):
    """One verifiers ``Environment`` behind the agentrl Env contract (see the module docstring).

    Args:
        environment: a loaded ``vf.Environment`` (chat type).
        env_id: its id, for messages and ``info``.
        split: ``"eval"`` (default) or ``"train"``: which dataset the tasks come from.
        model: the model name the environment sees in its state (some log or branch on it).

    Raises:
        ConfigError: a completion-type environment, a rubric with group reward functions, an unknown split
            or an empty dataset.
    """

    def __init__(self, environment: Any, *, env_id: str = "", split: str = "eval", model: str = "agentrl"):
        if split not in ("eval", "train"):
            raise ConfigError(f"split={split!r}; choose 'eval' or 'train'")
        if getattr(environment, "message_type", "chat") != "chat":
            raise ConfigError(
                f"verifiers environment {env_id!r} is a completion environment; only chat ones load"
            )
        group_funcs = _group_reward_funcs(environment.rubric)
        if group_funcs:
            raise ConfigError(
                f"verifiers environment {env_id!r} scores with group reward functions {group_funcs}, which need "
                "all rollouts of a group at once; an agentrl env scores one episode. Use a per-rollout rubric."
            )
        self.environment, self.env_id, self.split, self.model = environment, env_id, split, model
        dataset = environment.get_eval_dataset() if split == "eval" else environment.get_dataset()
        self.rows: list[dict[str, Any]] = dataset.to_list()
        if not self.rows:
            raise ConfigError(f"verifiers environment {env_id!r} has an empty {split} dataset")
        self.tools = tuple(environment.oai_tools or ())
        turns = getattr(environment, "max_turns", None)
        self.max_turns = turns if isinstance(turns, int) and turns > 0 else None
        self.description = (
            f"verifiers environment {env_id} ({type(environment).__name__}, {len(self.rows)} {split} tasks)"
        )
        self._rollout: asyncio.Task[Any] | None = None
        self._request: _Request | None = None
        self._seen: list[Message] = []
        self._turn = 0

    # ---- episode ---------------------------------------------------------------------------------
    def _row(self, options: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        options = options or {}
        index = options.get("task", options.get("task_index"))
        if index is None:
            index = int(self.np_random.integers(0, len(self.rows)))
        if not isinstance(index, int) or not 0 <= index < len(self.rows):
            raise ConfigError(f"task {index!r}: this env has tasks 0..{len(self.rows) - 1}")
        row = dict(self.rows[index])
        row.setdefault("example_id", index)
        return index, row

    @property
    def splits(self) -> dict[str, int]:
        """Task counts of the environment's datasets (``eval`` falls back to ``train`` as verifiers does)."""
        train = (
            self.environment.get_dataset()
            if self.environment.dataset_source or self.environment.dataset
            else None
        )
        return {
            "train": len(train) if train is not None else 0,
            "eval": len(self.environment.get_eval_dataset()),
        }

    def demonstration(self, task: int) -> list[Message]:
        """A reference episode for envs whose dataset ``answer`` is the final reply: the task's opening
        messages and the answer as the one assistant turn (a single-turn QA env's gold episode).

        Raises:
            ConfigError: the task's row has no ``answer``.
        """
        _, row = self._row({"task": task})
        if not row.get("answer"):
            raise ConfigError(
                f"verifiers environment {self.env_id!r}: task {task} has no answer to demonstrate"
            )
        prompt = [_message(m) for m in row.get("prompt") or ()]
        return [*prompt, {"role": "assistant", "content": str(row["answer"])}]

    async def _play(self, row: dict[str, Any], client: _ParkingClient) -> Any:
        state = await self.environment.rollout(row, client, self.model, None)
        if self.environment.score_rollouts:
            await self.environment.rubric.score_rollout(state)
        return state

    async def _next_request(self) -> _Request | None:
        """The rollout's next model call, or None once it has finished (its result is then ready)."""
        assert self._rollout is not None and self._client is not None
        getter = asyncio.ensure_future(self._client.requests.get())
        await asyncio.wait({getter, self._rollout}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await self._stop_rollout()
        await super().areset(seed=seed)
        index, row = self._row(options)
        self._client = _ParkingClient()
        self._rollout = asyncio.ensure_future(self._play(row, self._client))
        self._turn = 0
        self._request = await self._next_request()
        opening = self._request.messages if self._request else [_message(m) for m in row.get("prompt") or ()]
        self._seen = list(opening)
        tools = self._request.tools if self._request and self._request.tools else self.tool_schemas()
        info = {
            "tools": tools,
            "task_index": index,
            "example_id": row.get("example_id"),
            "task": row.get("task"),
        }
        return ResetResult(list(opening), info)

    async def astep(self, action: str) -> StepResult:
        if self._rollout is None:
            raise RuntimeError("call reset() before step()")
        if self._request is not None:
            self._request.reply.set_result(_completion(action, self._turn, self.model))
            self._turn += 1
            self._request = await self._next_request()
        if self._request is None:
            return self._finish(await self._rollout)
        messages = self._request.messages
        if messages[: len(self._seen)] != self._seen or len(messages) <= len(self._seen):
            raise RolloutError(
                f"verifiers environment {self.env_id!r} rewrote earlier messages of the conversation (an override "
                "of get_prompt_messages?); agentrl's token ledger needs each prompt to extend the last one"
            )
        observation = messages[len(self._seen) + 1 :]  # past the assistant message just sent
        self._seen = list(messages)
        return StepResult(observation, 0.0, False, False, {"reward_components": {}})

    def _finish(self, state: Any) -> StepResult:
        reward = float(state.get("reward") or 0.0)
        components, metrics = rubric_components(self.environment.rubric, state.get("metrics") or {}, reward)
        stop = state.get("stop_condition")
        # A single-turn environment ends at its one turn by design, not by a limit.
        truncated = stop in _TRUNCATING_STOPS and not (stop == "max_turns_reached" and self.max_turns == 1)
        final = [_message(m) for m in state.get("final_env_response") or ()]
        info: dict[str, Any] = {"reward_components": components, "metrics": metrics, "stop_condition": stop}
        error = state.get("error")
        if error is not None:  # e.g. an empty reply: verifiers ends and scores the rollout, and so do we
            info["error"] = f"{type(error).__name__}: {error}"
        return StepResult(final, reward, not truncated, truncated, info)

    async def _stop_rollout(self) -> None:
        rollout, self._rollout, self._request = self._rollout, None, None
        if rollout is not None and not rollout.done():
            rollout.cancel()
            await asyncio.gather(rollout, return_exceptions=True)

    async def aclose(self) -> None:
        await self._stop_rollout()
        teardown = getattr(self.environment, "_teardown", None)
        if teardown is not None and not getattr(self, "_torn_down", False):
            self._torn_down = True
            await teardown()
        await super().aclose()

    _client: _ParkingClient | None = None
