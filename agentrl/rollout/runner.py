"""The one multi-turn loop: many episodes at once on asyncio, each written to a token ledger.

For each episode: ``env.areset`` → render the prompt ids with the model's chat template → ``policy.generate``
→ decode → ``env.astep`` → append the observation tokens → repeat, until one of these ends it, each with
its own :class:`~agentrl.types.StopReason`:

- the env's ``terminated`` (``TERMINATED``, the only clean end) or ``truncated`` (``TRUNCATED``);
- the runner's turn limit (``MAX_TURNS``);
- the episode's budget of sampled tokens (``MAX_TOKENS``);
- the context window: the next prompt plus ``min_turn_tokens`` would not fit, or a sample was cut by the
  room left (``CONTEXT_OVERFLOW``);
- the episode's wall-clock deadline (``DEADLINE``);
- any exception from the env, a tool, a reward or the backend (``ERROR``, with the exception's text).

Each turn's ``info["turn_metrics"]`` (numbers by name: ``attempt``, ``attempt_passed``, ``tool_calls``,
``tool_errors``, ...; see :mod:`agentrl.evaluation.multiturn`) is kept in the trajectory's
``meta["turn_metrics"]``, one mapping per turn (empty where the env gave none), also when the episode ends
in an error or at its deadline.

This module is the single place where those failures are caught: a failed episode is a trajectory with a
stop reason, and the other episodes finish. A sample cut by the context or the budget is never handed to
the env: the turn stays in the ledger (reward 0) and the episode ends with that limit's reason.

Groups and seeds: each task is played ``group_size`` times (a GRPO group). All samples of a task reset the
env with the same seed (so they face the same task), derived from ``(run seed, call, task index)`` unless
the task names its own; every turn samples with a seed derived from ``(run seed, call, task index, sample
index, turn)``. ``call`` counts the runner's :meth:`Runner.run` calls, so successive training steps see
fresh tasks and samples, while a new runner with the same seed replays the same sequence of calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrl._safe_text import valid_json
from agentrl.core import Env
from agentrl.data.buffer import GROUP_KEY, TrajectoryGroup
from agentrl.data.trajectory import LedgerBuilder, Trajectory
from agentrl.errors import ConfigError
from agentrl.models.chat import ChatRenderer
from agentrl.rollout.policy import Generation, Policy, SamplingParams
from agentrl.types import DEFAULT_DEADLINE_S, Message, StopReason

__all__ = ["RolloutLimits", "Runner", "Task", "derive_seed", "rollout"]


@dataclass(frozen=True)
class RolloutLimits:
    """When the runner ends an episode, beyond the env's own ``terminated`` / ``truncated``.

    Attributes:
        max_turns: assistant turns per episode; None: the registered spec's ``max_turns``, else the env's
            ``max_turns``, else unlimited.
        max_sampled_tokens: budget of sampled tokens per episode (all turns together); None: unlimited.
        max_context: the most tokens in an episode (prompt, turns, observations); None: the policy's
            ``max_context``. A smaller value caps training sequence length.
        min_turn_tokens: a turn is only started when this many tokens still fit in the context.
        deadline_s: wall-clock seconds per episode, env reset included (an env that hangs ends its episode
            with ``DEADLINE`` instead of the run); None: no deadline.
        close_timeout_s: how long closing a failed env may take before it is abandoned.
    """

    max_turns: int | None = None
    max_sampled_tokens: int | None = None
    max_context: int | None = None
    min_turn_tokens: int = 1
    deadline_s: float | None = DEFAULT_DEADLINE_S
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_sampled_tokens", "max_context"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"RolloutLimits.{name} must be a positive integer or None, got {value!r}")
        if self.min_turn_tokens < 1:
            raise ConfigError(f"RolloutLimits.min_turn_tokens must be >= 1, got {self.min_turn_tokens!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError(f"RolloutLimits.deadline_s must be > 0 seconds or None, got {self.deadline_s!r}")


@dataclass(frozen=True)
class Task:
    """One task to play ``group_size`` times.

    Attributes:
        seed: the env's reset seed (the same for every sample of the task); None: derived from the run
            seed and the task's index.
        options: the env's reset ``options`` (e.g. which task of a dataset).
        id: a name for the group; defaults to ``"task-<index>"``.
    """

    seed: int | None = None
    options: Mapping[str, Any] | None = None
    id: str | None = None


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same on every machine and Python version)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class _Episode:
    """Mutable state of one episode while it runs (the ledger survives cancellation by a deadline)."""

    task: Task
    call: int
    task_index: int
    sample_index: int
    reset_seed: int
    run_seed: int
    ledger: LedgerBuilder = field(default_factory=lambda: LedgerBuilder(()))
    finish_reasons: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_metrics: list[dict[str, float]] = field(default_factory=list)
    trainable: bool = True


async def _contained(turns: Coroutine[Any, Any, StopReason]) -> StopReason:
    """``await turns`` with a ``SystemExit`` raised in the episode (an env, a tool, a reward) turned into an
    ordinary error: asyncio lets it stop the event loop, and with it every other episode of the run."""
    try:
        return await turns
    except SystemExit as exc:
        raise RuntimeError(f"the episode raised SystemExit({exc.code!r})") from None


class Runner:
    """Plays episodes of one environment with one policy and returns their token ledgers.

    Args:
        env: a registered env id, or a zero-argument factory returning an :class:`~agentrl.core.Env`.
            One env instance per concurrent episode slot, reused across episodes (replaced after an
            error or a deadline, since its state is then unknown).
        policy: the generation backend (:class:`~agentrl.rollout.policy.Policy`).
        tokenizer: the policy's tokenizer (its chat template renders the ledger).
        sampling: sampling parameters per turn; ``max_tokens`` is the per-turn cap, ``seed`` is replaced
            by the runner's derived seeds.
        limits: see :class:`RolloutLimits`.
        concurrency: episodes in flight at once.
        seed: the run seed all reset and sampling seeds derive from.
        template: None (the tokenizer's chat template), ``"chatml"`` or a Jinja string; see
            :class:`~agentrl.models.chat.ChatRenderer`.
        env_kwargs: keyword arguments for ``agentrl.make`` when ``env`` is an id.
        exact_glue: render each turn's observation tokens from the whole conversation. By default they are
            rendered from the opening messages plus the new turn (constant cost per turn instead of
            growing with the conversation), when a probe conversation shows both give the same tokens for
            this template; otherwise the whole conversation is rendered anyway.
        prompt_format: ``"token_ids"`` (the ledger's ids, what trainable backends take) or ``"messages"``
            (the conversation so far, for chat endpoints of API models: their text is re-tokenized into
            the ledger and the trajectory is marked untrainable).
        history: how earlier turns reach the next prompt (:data:`~agentrl.models.chat.HISTORY_MODES`):
            ``"append"`` (one ledger; the template must be prefix-stable), ``"keep_reasoning"`` (one
            ledger; earlier turns keep their reasoning) or ``"turn_split"`` (each turn's prompt rendered
            from the whole conversation by the native template, each turn its own sequence of the
            trajectory; for templates that rewrite history, such as thinking models dropping reasoning).
        tool_format: the model's tool-call markup (:mod:`agentrl.tool_formats`); None: detected.

    Raises:
        ConfigError: bad limits or concurrency.
        agentrl.errors.TemplateError: the chat template cannot carry a token ledger (checked once here).
    """

    def __init__(
        self,
        env: str | Callable[[], Env],
        policy: Policy,
        tokenizer: Any,
        *,
        sampling: SamplingParams | None = None,
        limits: RolloutLimits | None = None,
        concurrency: int = 32,
        seed: int = 0,
        template: str | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        exact_glue: bool = False,
        prompt_format: str = "token_ids",
        history: str = "append",
        tool_format: str | None = None,
    ):
        from agentrl.models.chat import check_template

        if prompt_format not in ("token_ids", "messages"):
            raise ConfigError(f"prompt_format must be 'token_ids' or 'messages', got {prompt_format!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive integer, got {concurrency!r}")
        self.env_id = env if isinstance(env, str) else getattr(env, "__name__", type(env).__name__)
        self.make_env = _env_factory(env, env_kwargs)
        self.policy, self.tokenizer, self.template = policy, tokenizer, template
        self.sampling = sampling or SamplingParams()
        self.limits = limits or RolloutLimits()
        self._spec_max_turns = _registered_max_turns(env)
        self.concurrency, self.seed = concurrency, seed
        self.send_messages = prompt_format == "messages"
        self.calls = 0  # the call the next run() plays by default: each call draws fresh seeds
        self.render_options: dict[str, Any] = {"tool_format": tool_format, "history": history}
        self.turn_split = history == "turn_split"
        check_template(tokenizer, template, **self.render_options)
        self.anchored_glue = (
            not exact_glue and not self.turn_split and _anchored_glue_holds(tokenizer, template, self.render_options)
        )
        self._fast_tokenizer = _fast_tokenizer(tokenizer, template, self.render_options)
        self._idle: list[Env] = []
        self._prompt_cache: dict[str, list[int]] = {}

    # ---- public API --------------------------------------------------------------------------------
    async def run(
        self, tasks: int | Iterable[Task | int], group_size: int = 1, *, call: int | None = None,
        seed: int | None = None,
    ) -> list[TrajectoryGroup]:  # fmt: skip
        """Play every task ``group_size`` times; one group per task, in task order.

        Args:
            tasks: a count (tasks with derived reset seeds) or :class:`Task` s (an int is a reset seed).
            group_size: samples per task (G).
            call: the data position: which call's tasks and seeds to play (a learner passes its step, so a
                resumed run replays what the straight run would). None: the call after the last one.
            seed: the run seed for this call only (the eval harness seeds each episode by itself). None:
                the runner's.

        Raises:
            ConfigError: ``group_size`` < 1. Episode failures never raise; they are trajectories.
        """
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        task_list = _as_tasks(tasks)
        call = self.calls if call is None else call
        self.calls = call + 1
        run_seed = self.seed if seed is None else seed
        episodes = [
            self._new_episode(t, run_seed, call, i, s) for i, t in enumerate(task_list) for s in range(group_size)
        ]
        results: list[Trajectory | None] = [None] * len(episodes)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(len(episodes)):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                results[n] = await self._play(episodes[n])

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(episodes)))))
        done = [r for r in results if r is not None]
        return [
            TrajectoryGroup(_group_id(t, i), tuple(done[i * group_size : (i + 1) * group_size]))
            for i, t in enumerate(task_list)
        ]

    async def play(
        self, task: Task, *, call: int, task_index: int, sample_index: int, seed: int | None = None
    ) -> Trajectory:
        """Play one episode of :meth:`run`'s ``call`` exactly as it would (same seeds, same meta), for a caller
        that schedules episodes itself (the cluster's env workers). Never raises for a failed episode."""
        run_seed = self.seed if seed is None else seed
        return await self._play(self._new_episode(task, run_seed, call, task_index, sample_index))

    async def aclose(self) -> None:
        """Close the envs kept for reuse. Idempotent; the policy is the caller's to close."""
        idle, self._idle = self._idle, []
        for env in idle:
            await self._close_env(env)

    # ---- one episode -------------------------------------------------------------------------------
    def _new_episode(self, task: Task, run_seed: int, call: int, task_index: int, sample_index: int) -> _Episode:
        reset_seed = task.seed if task.seed is not None else derive_seed(run_seed, call, task_index)
        return _Episode(task, call, task_index, sample_index, reset_seed, run_seed)

    async def _play(self, episode: _Episode) -> Trajectory:
        """Play one episode to its end and freeze its ledger; never raises for a failed episode."""
        started = time.monotonic()
        env: Env | None = None
        error: str | None = None
        try:
            env = self._idle.pop() if self._idle else self.make_env()
            stop = await self._within_deadline(self._turns(env, episode))
        except Exception as exc:  # the runner's one boundary: a failed episode is data
            stop, error = StopReason.ERROR, f"{type(exc).__name__}: {exc}"
        if env is not None:
            if stop in (StopReason.ERROR, StopReason.DEADLINE):
                await self._close_env(env)
            else:
                self._idle.append(env)
        return self._finish(episode, stop, error, time.monotonic() - started)

    async def _within_deadline(self, turns: Coroutine[Any, Any, StopReason]) -> StopReason:
        """Run the episode's turns; past the deadline, cancel them and report ``DEADLINE``."""
        if self.limits.deadline_s is None:
            return await _contained(turns)
        task = asyncio.ensure_future(_contained(turns))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.limits.deadline_s)
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        await asyncio.gather(task, return_exceptions=True)  # let it unwind, so the ledger is final
        return StopReason.DEADLINE

    async def _turns(self, env: Env, episode: _Episode) -> StopReason:
        """The multi-turn loop of one episode; returns why it ended (exceptions propagate to :meth:`_play`)."""
        opening, info = await env.areset(seed=episode.reset_seed, options=_options(episode.task))
        opening = valid_json(list(opening))
        history = list(opening)
        tools = info.get("tools") or env.tool_schemas()
        renderer = _Renderer(self.tokenizer, tools, self.template, opening, self._fast_tokenizer, self.render_options)
        ledger = episode.ledger = LedgerBuilder(self._prompt_ids(renderer), history)
        max_turns = self.limits.max_turns or self._spec_max_turns or env.max_turns
        turn = 0
        while True:
            if max_turns is not None and turn >= max_turns:
                return StopReason.MAX_TURNS
            if self.turn_split and turn > 0:  # this turn's prompt, exactly as the template renders it now
                prompt_ids = renderer.prompt_ids(history)
                if (limit := self._turn_cap(len(prompt_ids), _sampled(ledger))[1]) is not None:
                    return limit  # checked before the prompt joins the ledger: no sequence without a turn
                ledger.start_sequence(prompt_ids)
            cap, limit = self._turn_cap(len(ledger.ids) - ledger.prompt_start, _sampled(ledger))
            if limit is not None:
                return limit
            prompt = list(history) if self.send_messages else tuple(ledger.ids[ledger.prompt_start :])
            sampling = self._sampling(episode, turn, cap)
            if self.send_messages:  # chat APIs take the tools as a field; token prompts have them rendered
                generation = await self.policy.generate(prompt, sampling, tools=tools or None)
            else:
                generation = await self.policy.generate(prompt, sampling)
            ids, logprobs = self._record(episode, generation, renderer)
            ledger.add_sampled(ids, logprobs)
            if generation.finish_reason == "length" and len(ids) >= cap and cap < self.sampling.max_tokens:
                ledger.add_messages([renderer.assistant_message(renderer.decode(ids))])
                return self._cut_reason(len(ledger.ids) - ledger.prompt_start - len(ids), _sampled(ledger) - len(ids))
            # Decode the ids ourselves even when the backend sent text: the ledger's glue must follow the ids.
            text = renderer.decode(ids) if generation.token_ids else generation.text or ""
            message = renderer.assistant_message(text)  # as the template takes it in the history
            ledger.add_messages([message])  # before the env runs: an env that raises leaves what was said
            action = renderer.action_text(text)  # the text without its stop token
            observation, reward, terminated, truncated, step_info = await env.astep(action)
            observation = valid_json(list(observation))  # an env's text may hold what no tokenizer encodes
            ledger.set_reward(_finite(reward), step_info.get("reward_components"))
            episode.turn_metrics.append(_turn_metrics(step_info.get("turn_metrics")))
            turn += 1
            answer = [message, *observation]
            ledger.add_messages(observation)
            if terminated or truncated:
                return StopReason.TERMINATED if terminated else StopReason.TRUNCATED
            if self.turn_split:
                history += answer
                continue
            # Anchored glue renders the opening plus this turn only: same tokens, constant cost per turn.
            observation_ids = renderer.observation_ids(opening if self.anchored_glue else history, text, observation)
            if len(ledger.ids) + len(observation_ids) + self.limits.min_turn_tokens > self._context():
                return StopReason.CONTEXT_OVERFLOW
            ledger.add_observation(observation_ids)
            history += answer

    # ---- helpers -----------------------------------------------------------------------------------
    def _prompt_ids(self, renderer: _Renderer) -> list[int]:
        """The opening prompt's ids, shared by the G samples of a task (encoding it is the costly part)."""
        text = renderer.render(renderer.opening, add_generation_prompt=True)
        ids = self._prompt_cache.get(text)
        if ids is None:
            if len(self._prompt_cache) >= 4096:
                self._prompt_cache.clear()
            ids = self._prompt_cache[text] = renderer.encode(text)
        return list(ids)

    def _context(self) -> int:
        return min(self.policy.max_context, self.limits.max_context or self.policy.max_context)

    def _turn_cap(self, length: int, sampled: int) -> tuple[int, StopReason | None]:
        """The next turn's ``max_tokens``, or the limit that leaves no room for a turn."""
        room = self._context() - length
        if room < self.limits.min_turn_tokens:
            return 0, StopReason.CONTEXT_OVERFLOW
        budget = self.limits.max_sampled_tokens
        left = math.inf if budget is None else budget - sampled
        if left < 1:
            return 0, StopReason.MAX_TOKENS
        return int(min(self.sampling.max_tokens, room, left)), None

    def _cut_reason(self, length_before: int, sampled_before: int) -> StopReason:
        """Which limit cut a sample that stopped at its (lowered) cap: the context or the token budget."""
        room = self._context() - length_before
        budget = self.limits.max_sampled_tokens
        left = math.inf if budget is None else budget - sampled_before
        return StopReason.CONTEXT_OVERFLOW if room <= left else StopReason.MAX_TOKENS

    def _sampling(self, episode: _Episode, turn: int, cap: int) -> SamplingParams:
        seed = derive_seed(episode.run_seed, episode.call, episode.task_index, episode.sample_index, turn)
        return dataclasses.replace(self.sampling, max_tokens=cap, seed=seed)

    def _record(
        self, episode: _Episode, generation: Generation, renderer: Any
    ) -> tuple[Sequence[int], Sequence[float] | None]:
        """Note the turn's finish reason, weight version and trainability; return the ids to store."""
        episode.finish_reasons.append(generation.finish_reason)
        episode.versions.append(generation.policy_version)
        ids: Sequence[int] = generation.token_ids
        if not ids and generation.text:  # a text-only backend: re-tokenized, so never trained on
            ids = renderer.encode(generation.text)
        if not ids:
            raise RuntimeError(f"policy {self.policy.name!r} returned an empty generation")
        episode.trainable &= generation.trainable and generation.logprobs is not None and bool(generation.token_ids)
        return ids, generation.logprobs if episode.trainable else None

    def _finish(self, episode: _Episode, stop: StopReason, error: str | None, elapsed: float) -> Trajectory:
        meta = {
            "env": self.env_id,
            GROUP_KEY: _group_id(episode.task, episode.task_index),
            "task_index": episode.task_index,
            "sample_index": episode.sample_index,
            "reset_seed": episode.reset_seed,
            "run_seed": episode.run_seed,
            "call": episode.call,
            "finish_reasons": list(episode.finish_reasons),
            "turn_versions": list(episode.versions),  # the weight version that sampled each turn
            "turn_metrics": _per_turn(episode.turn_metrics, len(episode.ledger.turns)),
            "elapsed_s": round(elapsed, 6),
        }
        return episode.ledger.finish(
            stop,
            error=error,
            policy_version=min(episode.versions, default=self.policy.version),
            trainable=episode.trainable,
            meta=meta,
        )

    async def _close_env(self, env: Env) -> None:
        """Close an env, bounded in time; a failure to close is not the episode's failure."""
        try:
            await asyncio.wait_for(env.aclose(), timeout=self.limits.close_timeout_s)
        except Exception:  # a broken env is dropped either way; its episode already says why
            pass


class _Renderer(ChatRenderer):
    """A :class:`ChatRenderer` for one episode that renders its opening messages once.

    Anchored glue renders ``opening`` (with the generation prompt) every turn; the text never changes.
    """

    def __init__(
        self, tokenizer: Any, tools: Any, template: str | None, opening: list[Message], fast: Any = None,
        options: Mapping[str, Any] | None = None,
    ):  # fmt: skip
        super().__init__(tokenizer, tools, template, **dict(options or {}))
        self.opening, self.fast = opening, fast
        self._opening_text: str | None = None

    def encode(self, text: str) -> list[int]:
        if self.fast is None:
            return super().encode(text)
        return list(self.fast.encode(text, add_special_tokens=False).ids)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if messages is not self.opening or not add_generation_prompt:
            return super().render(messages, add_generation_prompt)
        if self._opening_text is None:
            self._opening_text = super().render(messages, add_generation_prompt)
        return self._opening_text


def _fast_tokenizer(tokenizer: Any, template: str | None, options: Mapping[str, Any]) -> Any:
    """The Rust tokenizer behind a fast HF tokenizer, when it encodes exactly as the wrapper does (it skips
    the wrapper's per-call overhead, a large share of a short observation's cost); else None."""
    from agentrl.models.chat import _probe_conversation

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    renderer = ChatRenderer(tokenizer, None, template, **options)
    messages, renderer.tools = _probe_conversation(renderer.format)
    messages = [renderer.assistant_message(m["content"]) if m["role"] == "assistant" else m for m in messages]
    text = renderer.render(messages, add_generation_prompt=True)
    same = backend.encode(text, add_special_tokens=False).ids == tokenizer.encode(text, add_special_tokens=False)
    return backend if same else None


def _anchored_glue_holds(tokenizer: Any, template: str | None, options: Mapping[str, Any]) -> bool:
    """Whether this template's glue after a turn depends only on the opening messages and that turn.

    Checked on the probe conversation of :func:`~agentrl.models.chat.check_template` (tools, several tool
    results, a user turn): every turn's observation tokens rendered from the whole history must equal those
    rendered from the opening messages alone.
    """
    from agentrl.models.chat import _probe_conversation

    renderer = ChatRenderer(tokenizer, None, template, **options)
    messages, renderer.tools = _probe_conversation(renderer.format)
    eos = tokenizer.eos_token or ""
    starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    opening = messages[: starts[0]]
    history = list(opening)
    for n, k in enumerate(starts):
        text = renderer.decode(renderer.encode(messages[k]["content"] + eos))
        answer = messages[k + 1 : starts[n + 1] if n + 1 < len(starts) else len(messages)]
        if renderer.observation_ids(history, text, answer) != renderer.observation_ids(opening, text, answer):
            return False
        history += [renderer.assistant_message(text), *answer]
    return True


def _sampled(ledger: LedgerBuilder) -> int:
    return sum(t.end - t.start for t in ledger.turns)


def _finite(reward: Any) -> float:
    value = float(reward)
    if not math.isfinite(value):
        raise ValueError(f"the env returned a non-finite reward {reward!r}")
    return value


def _turn_metrics(reported: Any) -> dict[str, float]:
    """An env's ``info["turn_metrics"]`` for one turn (:mod:`agentrl.evaluation.multiturn`), checked."""
    if reported is None:
        return {}
    if not isinstance(reported, Mapping) or not all(isinstance(k, str) for k in reported):
        raise ValueError(f"the env's info['turn_metrics'] must map names to numbers, got {reported!r}")
    values = {}
    for name, value in reported.items():
        if isinstance(value, str) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"the env's info['turn_metrics'][{name!r}] must be a finite number, got {value!r}")
        values[name] = float(value)
    return values


def _per_turn(reported: list[dict[str, float]], turns: int) -> list[dict[str, float]]:
    """One entry per turn of the ledger: ``{}`` for a turn the env never answered (a cut sample, or a step
    that raised)."""
    return [dict(m) for m in reported[:turns]] + [{} for _ in range(turns - len(reported))]


def _options(task: Task) -> dict[str, Any] | None:
    return dict(task.options) if task.options is not None else None


def _group_id(task: Task, index: int) -> str:
    return task.id if task.id is not None else f"task-{index}"


def _as_tasks(tasks: int | Iterable[Task | int]) -> list[Task]:
    if isinstance(tasks, int):
        return [Task() for _ in range(tasks)]
    out = [t if isinstance(t, Task) else Task(seed=t) for t in tasks]
    if not all(isinstance(t, Task) and (t.seed is None or isinstance(t.seed, int)) for t in out):
        raise ConfigError("tasks must be a count, Task objects or integer reset seeds")
    return out


def _env_factory(env: str | Callable[[], Env], env_kwargs: Mapping[str, Any] | None) -> Callable[[], Env]:
    if isinstance(env, str):
        import agentrl

        return lambda: agentrl.make(env, **dict(env_kwargs or {}))  # type: ignore[no-any-return]
    if not callable(env):
        raise ConfigError(f"env must be a registered env id or a factory returning an Env, got {env!r}")
    return env


def _registered_max_turns(env: str | Callable[[], Env]) -> int | None:
    if isinstance(env, str):
        from agentrl.registry import spec

        return spec(env).max_turns
    return None


def rollout(
    env: str | Callable[[], Env],
    policy: Policy,
    tokenizer: Any,
    tasks: int | Iterable[Task | int],
    group_size: int = 1,
    **runner_options: Any,
) -> list[TrajectoryGroup]:
    """Synchronous convenience: build a :class:`Runner`, play ``tasks``, close the envs, return the groups."""

    async def main() -> list[TrajectoryGroup]:
        runner = Runner(env, policy, tokenizer, **runner_options)
        try:
            return await runner.run(tasks, group_size)
        finally:
            await runner.aclose()

    return asyncio.run(main())
