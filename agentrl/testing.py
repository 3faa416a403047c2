"""Toy environments for tests, examples and checking a pipeline end to end without a sandbox.

- :class:`EchoEnv` (``toy-echo-v0``): sync-only; say back the word the user asks for, one process
  reward per turn.
- :class:`GuessEnv` (``toy-guess-v0``): async-only; find a secret number by calling a ``guess`` tool
  (Hermes ``<tool_call>`` format); malformed calls come back as tool errors; an outcome reward at the end.

Both are registered through the ``agentrl.envs`` entry-point group, like any plug-in.
:class:`ScriptedPolicy` answers from a script, to drive envs through the runner without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ToolCallError
from agentrl.tools import Tool, parse_tool_calls, tool_error_message, validate_call
from agentrl.types import Message

__all__ = ["DigitsEnv", "EchoEnv", "GuessEnv", "ScriptedPolicy"]

WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "candle")


class EchoEnv(Env):
    """Repeat the word the user asks for; 1 point per correct turn (sync API, per-turn rewards)."""

    description = "Repeat the word the user asks for (sync; a process reward every turn)"

    def __init__(self, rounds: int = 3):
        self.rounds = rounds
        self.max_turns: int = rounds
        self._words: list[str] = []
        self._turn = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        super().reset(seed=seed)
        self._words = [WORDS[int(i)] for i in self.np_random.integers(0, len(WORDS), size=self.rounds)]
        self._turn = 0
        opening: list[Message] = [
            {"role": "system", "content": "Reply with exactly the word the user asks for, nothing else."},
            {"role": "user", "content": f"Say: {self._words[0]}"},
        ]
        return ResetResult(opening, {"tools": self.tool_schemas()})

    def step(self, action: str) -> StepResult:
        if self._turn >= self.rounds:
            raise RuntimeError("the episode is over; call reset() first")
        reward = 1.0 if action.strip() == self._words[self._turn] else 0.0
        self._turn += 1
        terminated = self._turn == self.rounds
        obs: list[Message] = (
            [] if terminated else [{"role": "user", "content": f"Say: {self._words[self._turn]}"}]
        )
        return StepResult(obs, reward, terminated, False, {"reward_components": {"correct": reward}})


class DigitsEnv(Env):
    """Reply with digits: the reward is the share of the reply's characters that are digits (one turn).

    A dense reward an untrained model already earns a little of, for seeded "reward goes up" tests.
    """

    description = "Reply with digits only (one turn; reward = share of characters that are digits)"
    max_turns = 1

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        super().reset(seed=seed)
        return ResetResult([{"role": "user", "content": "Write digits."}], {})

    def step(self, action: str) -> StepResult:
        text = action.strip()
        share = sum(c.isdigit() for c in text) / len(text) if text else 0.0
        return StepResult([], share, True, False, {"reward_components": {"digits": share}})

    def demonstration(self, task: Any = None) -> list[Message]:
        """The reference episode (every task is the same): digits only."""
        return [{"role": "user", "content": "Write digits."}, {"role": "assistant", "content": "0123456789"}]


def guess(number: int) -> str:
    """Guess the secret number.

    Args:
        number: your guess, a whole number.
    """
    raise NotImplementedError  # only the schema is used; GuessEnv answers with the episode's secret


GUESS_TOOL = Tool.from_function(guess)


class GuessEnv(Env):
    """Find a secret number in [1, high] with a ``guess`` tool (async API, tool calls, outcome reward).

    Each turn may call ``guess`` one or more times; every call is answered with "higher", "lower" or
    "correct". A turn with a malformed call or none loses ``format_penalty`` (a process reward); finding the
    number scores 1 (the outcome) and ends the episode; ``max_turns`` turns without it truncate it.
    """

    description = "Find a secret number with a `guess` tool (async; tool calls; outcome reward)"
    tools = (GUESS_TOOL.schema(),)

    def __init__(self, high: int = 100, max_turns: int = 8, format_penalty: float = 0.1):
        self.high = high
        self.max_turns: int = max_turns
        self.format_penalty = format_penalty
        self._secret = 0
        self._turn = 0

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await super().areset(seed=seed)
        self._secret = int(self.np_random.integers(1, self.high + 1))
        self._turn = 0
        opening: list[Message] = [
            {"role": "system", "content": "You play a guessing game. Use the guess tool."},
            {"role": "user", "content": f"I picked a whole number from 1 to {self.high}. Find it."},
        ]
        return ResetResult(opening, {"tools": self.tool_schemas()})

    def _answer(self, number: int) -> str:
        if number == self._secret:
            return "correct"
        return "higher" if number < self._secret else "lower"

    async def astep(self, action: str) -> StepResult:
        if self._turn >= self.max_turns:
            raise RuntimeError("the episode is over; call reset() first")
        self._turn += 1
        parsed = parse_tool_calls(action)
        obs: list[Message] = [tool_error_message(error) for error in parsed.errors]
        solved, bad_calls = False, len(parsed.errors)
        for call in parsed.calls:
            try:
                call = validate_call(call, [GUESS_TOOL])
            except ToolCallError as error:
                obs.append(tool_error_message(error, call.id))
                bad_calls += 1
                continue
            answer = self._answer(int(call.arguments["number"]))
            solved = solved or answer == "correct"
            obs.append({"role": "tool", "content": answer, "tool_call_id": call.id or "", "name": "guess"})
        if not parsed.calls and not parsed.errors:
            obs.append({"role": "user", "content": "Call the guess tool with a whole number."})
        well_formed = bool(parsed.calls) and bad_calls == 0
        components = {
            "solved": 1.0 if solved else 0.0,
            "format": 0.0 if well_formed else -self.format_penalty,
        }
        truncated = not solved and self._turn >= self.max_turns
        return StepResult(obs, sum(components.values()), solved, truncated, {"reward_components": components})


class ScriptedPolicy:
    """A :class:`~agentrl.rollout.policy.Policy` that answers from a script: no model, no latency.

    It drives envs through the runner in tests and measures the runner's own overhead in
    ``agentrl bench rollout``. Each answer is the script's text, tokenized, plus the tokenizer's EOS; every
    sampled token gets ``logprob``.

    Args:
        tokenizer: the tokenizer whose ids it returns.
        reply: a fixed answer, or a function from the decoded prompt to the answer.
        logprob: the logprob reported for each token.
        max_context: the context window it claims.
    """

    name = "scripted"

    def __init__(
        self,
        tokenizer: Any,
        reply: str | Callable[[str], str],
        *,
        logprob: float = -0.5,
        max_context: int = 4096,
    ):
        self.tokenizer, self.reply, self.logprob = tokenizer, reply, logprob
        self.version, self.max_context = 0, max_context
        self._ids: dict[str, tuple[int, ...]] = {}

    async def generate(self, prompt: Sequence[Any], sampling: Any, *, tools: Any = None) -> Any:
        from agentrl.rollout.policy import Generation

        text = self.reply if isinstance(self.reply, str) else self.reply(self.tokenizer.decode(list(prompt)))
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = (
                *self.tokenizer.encode(text, add_special_tokens=False),
                self.tokenizer.eos_token_id,
            )
        cut = len(ids) > sampling.max_tokens
        ids = ids[: sampling.max_tokens]
        return Generation(
            ids, (self.logprob,) * len(ids), "length" if cut else "stop", policy_version=self.version
        )

    async def update_weights(self, named_tensors: Any) -> None:
        self.version += 1

    async def aclose(self) -> None:
        return None
