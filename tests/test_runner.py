"""The runner: scripted policies drive every env; masks, groups, seeds, limits and failures, each checked."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

import pytest

import agentrl
from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_tokenizer
from agentrl.rollout.policy import Generation, SamplingParams
from agentrl.rollout.runner import RolloutLimits, Runner, Task, derive_seed, rollout
from agentrl.testing import EchoEnv, GuessEnv, ScriptedPolicy
from agentrl.types import StopReason

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def turn_index(prompt: str) -> int:
    """Which assistant turn a prompt asks for (the generation prompt opens one more assistant message)."""
    return prompt.count("<|im_start|>assistant") - 1


def echo_reply(prompt: str) -> str:
    return re.findall(r"Say: (\w+)", prompt)[-1]


def guess_reply(prompt: str) -> str:
    """Binary search over the guesses and answers so far."""
    low, high = 1, 100
    guesses = [int(n) for n in re.findall(r'"number": (\d+)', prompt)]
    answers = re.findall(r"<tool_response>\n(\w+)\n", prompt)
    for guess, answer in zip(guesses, answers, strict=False):
        low, high = (guess + 1, high) if answer == "higher" else (low, guess - 1) if answer == "lower" else (low, high)
    return f'<tool_call>\n{{"name": "guess", "arguments": {{"number": {(low + high) // 2}}}}}\n</tool_call>'


def mask_runs(tokenizer, trajectory):
    """Maximal runs of equal mask, decoded: [(text, mask), ...]."""
    out, start, mask = [], 0, trajectory.loss_mask
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((tokenizer.decode(trajectory.token_ids[start:i]), mask[start]))
            start = i
    return out


# ---------------------------------------------------------------------------------------------- toy envs
@pytest.mark.parametrize("exact_glue", [False, True], ids=["anchored-glue", "exact-glue"])
def test_sync_echo_env_masks_are_exact_across_turns(tokenizer, exact_glue):
    policy = ScriptedPolicy(tokenizer, echo_reply, logprob=-0.25)
    groups = rollout("toy-echo-v0", policy, tokenizer, 3, group_size=2, exact_glue=exact_glue)
    assert [g.group_id for g in groups] == ["task-0", "task-1", "task-2"]
    for group in groups:
        for trajectory in group:
            assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.error is None
            assert [t.reward for t in trajectory.turns] == [1.0, 1.0, 1.0]
            assert [dict(t.reward_components) for t in trajectory.turns] == [{"correct": 1.0}] * 3
            words = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
            prompt = tokenizer.decode(trajectory.token_ids[: trajectory.prompt_length])
            expected = [(prompt, 0)]
            for n, word in enumerate(words):
                expected.append((word + IM_END, 1))
                if n + 1 < len(words):
                    expected.append((f"\n<|im_start|>user\nSay: {words[n + 1]}{IM_END}\n<|im_start|>assistant\n", 0))
            assert mask_runs(tokenizer, trajectory) == expected
            # The ledger is the tokenization of the whole conversation through the chat template.
            whole = ChatRenderer(tokenizer).render(list(trajectory.messages), add_generation_prompt=False)
            assert list(trajectory.token_ids) == tokenizer.encode(whole, add_special_tokens=False)[: len(trajectory.token_ids)]
            assert {lp for lp, m in zip(trajectory.logprobs, trajectory.loss_mask, strict=True) if m} == {-0.25}
            assert trajectory.meta["finish_reasons"] == ["stop"] * 3
            assert trajectory.meta["env"] == "toy-echo-v0" and trajectory.meta["group_id"] == group.group_id
        # The G samples of a task face the same task: same reset seed, same words.
        assert len({t.meta["reset_seed"] for t in group}) == 1
        assert len({tuple(m["content"] for m in t.messages) for t in group}) == 1
    assert len({g.trajectories[0].meta["reset_seed"] for g in groups}) == 3


def test_async_guess_env_with_tool_calls(tokenizer):
    groups = rollout("toy-guess-v0", ScriptedPolicy(tokenizer, guess_reply), tokenizer, 4, group_size=2)
    for trajectory in (t for g in groups for t in g):
        assert trajectory.stop_reason is StopReason.TERMINATED
        assert trajectory.turns[-1].reward == 1.0 and trajectory.total_reward == 1.0
        runs = mask_runs(tokenizer, trajectory)
        assert [m for _, m in runs] == [0] + [1, 0] * (len(trajectory.turns) - 1) + [1]
        for text, mask in runs[1:]:
            if mask:
                assert text.startswith("<tool_call>") and text.endswith("</tool_call>" + IM_END)
            else:
                assert "<tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_anchored_and_exact_glue_give_identical_ledgers(tokenizer):
    def play(env_id, reply, exact):
        groups = rollout(env_id, ScriptedPolicy(tokenizer, reply), tokenizer, 3, group_size=1, exact_glue=exact)
        return [t.token_ids for g in groups for t in g]

    for env_id, reply in (("toy-echo-v0", echo_reply), ("toy-guess-v0", guess_reply)):
        assert play(env_id, reply, False) == play(env_id, reply, True)


# ---------------------------------------------------------------------------------------------- registry
def demonstrated_episode(env_id: str, env: Env):
    """A task of ``env`` and the assistant turns that solve it, or None where no scripted solution exists."""
    if hasattr(env, "demonstration"):
        return Task(options={"task": 0}), env.demonstration(0)
    if env_id == "code-sandbox-v0":
        from agentrl_envs.code_sandbox import demonstration, generate_tasks

        task = generate_tasks(1, seed=0)[0]
        return Task(options={"task": task}), demonstration(task)
    return None


@pytest.mark.parametrize("env_id", [s.id for s in agentrl.list_envs()])
def test_a_scripted_policy_solves_every_registered_env_through_the_runner(tokenizer, env_id):
    if env_id in ("toy-echo-v0", "toy-guess-v0"):
        reply = echo_reply if env_id == "toy-echo-v0" else guess_reply
        task, turns = Task(), None
    else:
        env = agentrl.make(env_id)
        try:
            found = demonstrated_episode(env_id, env)
        finally:
            env.close()
        if found is None:
            pytest.skip(f"{env_id} offers no scripted solution (no demonstration() method)")
        task, messages = found
        turns = [m["content"] for m in messages if m["role"] == "assistant"]

        def reply(prompt: str) -> str:
            return turns[turn_index(prompt)]

    groups = rollout(env_id, ScriptedPolicy(tokenizer, reply), tokenizer, [task], group_size=2, concurrency=2)
    for trajectory in groups[0]:
        assert trajectory.stop_reason is StopReason.TERMINATED, trajectory.error
        assert trajectory.total_reward > 0
        sampled = [tokenizer.decode(trajectory.token_ids[t.start : t.end]) for t in trajectory.turns]
        said = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
        assert sampled == [s + IM_END for s in said]
        if turns is not None:
            assert said == turns
        # Everything outside the turns is mask 0, and is what the env wrote (never an assistant turn).
        assert sum(trajectory.loss_mask) == sum(t.end - t.start for t in trajectory.turns)


# ---------------------------------------------------------------------------------------------- failures
class TroubleEnv(Env):
    """Say "ok" three times; ``options["mode"]`` picks a failure on the second turn."""

    async def areset(self, *, seed=None, options=None):
        await super().areset(seed=seed)
        self.mode, self.turn = (options or {}).get("mode", "ok"), 0
        if self.mode == "crash_reset":
            raise RuntimeError("reset exploded")
        word = "FAIL" if self.mode == "backend" else "ok"
        return ResetResult([{"role": "user", "content": f"Say: {word}"}], {"tools": []})

    async def astep(self, action):
        self.turn += 1
        if self.turn == 2 and self.mode == "crash":
            raise RuntimeError("env exploded")
        if self.turn == 2 and self.mode == "exit":
            raise SystemExit(2)  # a tool that ends "the program"
        if self.turn == 2 and self.mode == "hang":
            await asyncio.Event().wait()  # a tool call that never answers
        if self.mode == "flood":
            return StepResult([{"role": "tool", "content": "x " * 3000}], 0.0, False, False, {})
        reward = float("nan") if self.mode == "nan" else 1.0
        done = self.turn >= 3
        obs = [] if done else [{"role": "user", "content": "Say: ok"}]
        return StepResult(obs, reward, done, False, {"reward_components": {"ok": reward}})


class SlowEchoEnv(EchoEnv):
    """A sync env whose second step blocks its thread (a hung subprocess, say)."""

    def step(self, action):
        if self._turn == 1:
            time.sleep(1.0)
        return super().step(action)


class StuckEnv(EchoEnv):
    """A sync env whose steps block their thread for 10 s when the task asks (a hung subprocess, say)."""

    def reset(self, *, seed=None, options=None):
        self.stuck = bool((options or {}).get("stuck"))
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.stuck:
            time.sleep(10.0)
        return super().step(action)


class ExitingEnv(EchoEnv):
    """A sync env whose second step calls ``sys.exit`` (a tool that ends "the program")."""

    def step(self, action):
        if self._turn == 1:
            raise SystemExit(3)
        return super().step(action)


class FlakyBackend(ScriptedPolicy):
    async def generate(self, prompt, sampling):
        if "FAIL" in self.tokenizer.decode(list(prompt)):
            raise RuntimeError("backend down")
        return await super().generate(prompt, sampling)


def test_failures_end_one_episode_each_with_the_right_reason_while_the_rest_finish(tokenizer):
    modes = ["ok", "crash", "hang", "flood", "backend", "crash_reset", "nan", "ok"]
    policy = FlakyBackend(tokenizer, echo_reply, max_context=1024)
    limits = RolloutLimits(deadline_s=1.0)
    started = time.perf_counter()
    groups = rollout(
        TroubleEnv, policy, tokenizer, [Task(options={"mode": m}, id=m) for m in modes], group_size=2, limits=limits
    )
    elapsed = time.perf_counter() - started
    by_mode = {g.group_id: g.trajectories for g in groups}
    expected = {
        "ok": (StopReason.TERMINATED, None, 3),
        "crash": (StopReason.ERROR, "RuntimeError: env exploded", 2),
        "hang": (StopReason.DEADLINE, None, 2),
        "flood": (StopReason.CONTEXT_OVERFLOW, None, 1),
        "backend": (StopReason.ERROR, "RuntimeError: backend down", 0),
        "crash_reset": (StopReason.ERROR, "RuntimeError: reset exploded", 0),
        "nan": (StopReason.ERROR, "ValueError: the env returned a non-finite reward nan", 1),
    }
    for mode, (stop, error, turns) in expected.items():
        for trajectory in by_mode[mode]:
            assert (trajectory.stop_reason, trajectory.error, len(trajectory.turns)) == (stop, error, turns), mode
    ok = [t for m, ts in by_mode.items() if m == "ok" for t in ts]
    assert all(t.total_reward == 3.0 for t in ok)
    # What the policy said before the env crashed stays in the transcript: one assistant message per turn.
    for trajectory in by_mode["crash"]:
        assert sum(m["role"] == "assistant" for m in trajectory.messages) == len(trajectory.turns) == 2
    # The overflowing observation is not in the ledger: the ledger stays inside the context window.
    assert all(len(t.token_ids) <= 1024 for ts in by_mode.values() for t in ts)
    assert elapsed < 10, "one hung episode must not hold the others up"


def test_a_blocked_sync_env_hits_the_deadline(tokenizer):
    limits = RolloutLimits(deadline_s=0.3)
    [group] = rollout(SlowEchoEnv, ScriptedPolicy(tokenizer, echo_reply), tokenizer, 1, group_size=2, limits=limits)
    assert [t.stop_reason for t in group] == [StopReason.DEADLINE] * 2
    assert all(t.turns[0].reward == 1.0 and t.meta["elapsed_s"] < 0.9 for t in group)


@pytest.mark.parametrize("deadline_s", [None, 5.0], ids=["no-deadline", "deadline"])
def test_system_exit_in_an_env_ends_its_episode_not_the_run(tokenizer, deadline_s):
    limits = RolloutLimits(deadline_s=deadline_s)
    modes = [Task(options={"mode": m}, id=m) for m in ("exit", "ok")]
    by_mode = {g.group_id: g.trajectories for g in
               rollout(TroubleEnv, ScriptedPolicy(tokenizer, echo_reply), tokenizer, modes, group_size=2, limits=limits)}  # fmt: skip
    assert [(t.stop_reason, t.error) for t in by_mode["exit"]] == [
        (StopReason.ERROR, "RuntimeError: the episode raised SystemExit(2)")
    ] * 2
    assert all(t.stop_reason is StopReason.TERMINATED for t in by_mode["ok"])
    [group] = rollout(ExitingEnv, ScriptedPolicy(tokenizer, echo_reply), tokenizer, 1, group_size=2, limits=limits)
    assert [(t.stop_reason, t.error) for t in group] == [
        (StopReason.ERROR, "RuntimeError: the env's step raised SystemExit: 3")
    ] * 2


def test_hung_sync_steps_cannot_starve_the_episodes_after_them(tokenizer):
    # More hung steps than any default executor has threads: each holds a thread of its own, which the
    # deadline abandons, so the next call's episodes run, and the run's end does not wait for the threads.
    async def main():
        runner = Runner(StuckEnv, ScriptedPolicy(tokenizer, echo_reply), tokenizer, concurrency=64,
                        limits=RolloutLimits(deadline_s=0.5))  # fmt: skip
        stuck = await runner.run([Task(options={"stuck": True}) for _ in range(40)])
        fine = await runner.run(3, group_size=2)
        await runner.aclose()
        return stuck, fine

    started = time.perf_counter()
    stuck, fine = asyncio.run(main())
    assert {t.stop_reason for g in stuck for t in g} == {StopReason.DEADLINE}
    assert {t.stop_reason for g in fine for t in g} == {StopReason.TERMINATED}
    assert time.perf_counter() - started < 8.0  # the hung threads (10 s each) were not waited for


def test_an_episode_has_a_deadline_unless_a_run_removes_it():
    from agentrl.evaluation.config import EvalConfig
    from agentrl.learners.rl import RolloutConfig
    from agentrl.types import DEFAULT_DEADLINE_S

    assert RolloutLimits().deadline_s == RolloutConfig(env="toy-echo").episode_deadline_s == DEFAULT_DEADLINE_S
    assert EvalConfig(env="toy-echo", backend="hf", model="tiny").episode_timeout_s == DEFAULT_DEADLINE_S
    assert RolloutConfig(env="toy-echo", episode_deadline_s=None).episode_deadline_s is None


class SurrogateEchoEnv(EchoEnv):
    """An env whose own text holds lone surrogates (say, bytes from a tool decoded with surrogateescape)."""

    def reset(self, *, seed=None, options=None):
        opening, info = super().reset(seed=seed, options=options)
        return ResetResult([{**m, "content": m["content"] + " \udc80"} for m in opening], info)

    def step(self, action):
        result = super().step(action)
        return result._replace(observation=[{**m, "content": m["content"] + " \ud800"} for m in result.observation])


def test_an_envs_text_with_lone_surrogates_reaches_the_model_replaced_and_the_episode_goes_on(tokenizer):
    [group] = rollout(SurrogateEchoEnv, ScriptedPolicy(tokenizer, echo_reply), tokenizer, 1, group_size=2)
    for trajectory in group:
        assert trajectory.stop_reason is StopReason.TERMINATED, trajectory.error
        env_text = [m["content"] for m in trajectory.messages if m["role"] != "assistant"]
        assert all(text.endswith("\ufffd") for text in env_text[1:]) and len(env_text) == 4
        assert "\ufffd" in tokenizer.decode(list(trajectory.token_ids))


# ---------------------------------------------------------------------------------------------- limits
WRONG_GUESS = '<tool_call>\n{"name": "guess", "arguments": {"number": 0}}\n</tool_call>'


def play_guess(tokenizer, *, env=GuessEnv, reply=WRONG_GUESS, **options):
    [group] = rollout(env, ScriptedPolicy(tokenizer, reply), tokenizer, 1, **options)
    return group.trajectories[0]


def test_limits_each_end_the_episode_with_their_own_reason(tokenizer):
    call_tokens = len(tokenizer.encode(WRONG_GUESS, add_special_tokens=False)) + 1
    truncated = play_guess(tokenizer, env=lambda: GuessEnv(max_turns=3))
    assert (truncated.stop_reason, len(truncated.turns), truncated.truncated) == (StopReason.TRUNCATED, 3, True)
    max_turns = play_guess(tokenizer, limits=RolloutLimits(max_turns=2))
    assert (max_turns.stop_reason, len(max_turns.turns)) == (StopReason.MAX_TURNS, 2)

    budget = play_guess(tokenizer, limits=RolloutLimits(max_sampled_tokens=2 * call_tokens + 5))
    assert (budget.stop_reason, len(budget.turns), budget.num_sampled) == (StopReason.MAX_TOKENS, 3, 2 * call_tokens + 5)
    assert budget.meta["finish_reasons"] == ["stop", "stop", "length"] and budget.turns[-1].reward == 0.0
    # The cut turn was never shown to the env: it answered two turns.
    assert sum(m["role"] == "tool" for m in budget.messages) == 2

    prompt = play_guess(tokenizer, limits=RolloutLimits(max_turns=1)).prompt_length
    context = play_guess(tokenizer, limits=RolloutLimits(max_context=prompt + call_tokens + 10))
    assert context.stop_reason is StopReason.CONTEXT_OVERFLOW and len(context.token_ids) <= prompt + call_tokens + 10

    cut = play_guess(tokenizer, env=lambda: GuessEnv(max_turns=3), sampling=SamplingParams(max_tokens=4))
    # A per-turn cap is the sampler's setting, not an episode limit: the env judges the cut text.
    assert cut.stop_reason is StopReason.TRUNCATED and cut.meta["finish_reasons"] == ["length"] * 3
    assert all(t.end - t.start == 4 for t in cut.turns)
    assert all(t.stop_reason.is_truncation for t in (truncated, max_turns, budget, context))


def test_runner_refuses_bad_settings(tokenizer):
    policy = ScriptedPolicy(tokenizer, "x")
    with pytest.raises(ConfigError, match="concurrency"):
        Runner("toy-echo-v0", policy, tokenizer, concurrency=0)
    with pytest.raises(ConfigError, match="max_turns"):
        RolloutLimits(max_turns=0)
    with pytest.raises(ConfigError, match="group_size"):
        asyncio.run(Runner("toy-echo-v0", policy, tokenizer).run(1, group_size=0))
    with pytest.raises(agentrl.EnvNotFoundError):
        Runner("no-such-env-v0", policy, tokenizer)


# ---------------------------------------------------------------------------------------------- seeds
class SeedRecorder(ScriptedPolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seeds = []

    async def generate(self, prompt, sampling):
        self.seeds.append(sampling.seed)
        return await super().generate(prompt, sampling)


def test_seeds_derive_from_run_task_sample_and_turn(tokenizer):
    def seeds(run_seed):
        policy = SeedRecorder(tokenizer, echo_reply)
        rollout("toy-echo-v0", policy, tokenizer, 2, group_size=3, seed=run_seed, concurrency=1)
        return policy.seeds

    first = seeds(0)
    assert len(first) == 2 * 3 * 3 and len(set(first)) == len(first)
    assert first[0] == derive_seed(0, 0, 0, 0, 0) and first[1] == derive_seed(0, 0, 0, 0, 1)
    assert seeds(0) == first and set(seeds(1)).isdisjoint(first)


def test_successive_runs_draw_fresh_tasks_and_a_new_runner_replays_them(tokenizer):
    async def calls(n):
        runner = Runner("toy-echo-v0", ScriptedPolicy(tokenizer, echo_reply), tokenizer, seed=3)
        out = [await runner.run(2, group_size=2) for _ in range(n)]
        await runner.aclose()
        return [[t.meta["reset_seed"] for g in groups for t in g] for groups in out]

    first, second = asyncio.run(calls(2))
    assert first[0] == first[1] and set(first).isdisjoint(second)
    assert asyncio.run(calls(2)) == [first, second]
    [fixed] = rollout("toy-echo-v0", ScriptedPolicy(tokenizer, echo_reply), tokenizer, [Task(seed=5)])
    assert fixed.trajectories[0].meta["reset_seed"] == 5


def test_call_and_seed_pick_the_data_position_without_touching_the_runner_from_outside(tokenizer):
    # A learner resumed at step k passes call=k and plays what the straight run's k-th call played; the
    # harness passes a seed per episode. Both leave the next default call right after the one played.
    def played(groups):
        return [(t.meta["reset_seed"], t.meta["run_seed"], t.meta["call"]) for g in groups for t in g]

    async def straight():
        runner = Runner("toy-echo-v0", ScriptedPolicy(tokenizer, echo_reply), tokenizer, seed=3)
        out = [played(await runner.run(2, group_size=2)) for _ in range(3)]
        await runner.aclose()
        return out

    async def at(call, then_default=False, seed=None):
        runner = Runner("toy-echo-v0", ScriptedPolicy(tokenizer, echo_reply), tokenizer, seed=3)
        out = [played(await runner.run(2, group_size=2, call=call, seed=seed))]
        if then_default:
            out.append(played(await runner.run(2, group_size=2)))
        await runner.aclose()
        return out

    calls = asyncio.run(straight())
    assert asyncio.run(at(1, then_default=True)) == calls[1:]
    [reseeded] = asyncio.run(at(0, seed=11))
    assert {run_seed for _, run_seed, _ in reseeded} == {11} and {s for s, _, _ in reseeded}.isdisjoint(
        {s for s, _, _ in calls[0]}
    )
    assert reseeded[0][0] == derive_seed(11, 0, 0)


def test_hf_sampling_through_the_runner_is_reproducible(tokenizer):
    from agentrl.rollout.hf import HFPolicy

    policy = HFPolicy("tiny", tokenizer)
    sampling = SamplingParams(max_tokens=6, temperature=1.0)

    def run(seed):
        groups = rollout("toy-echo-v0", policy, tokenizer, 2, group_size=3, seed=seed, sampling=sampling)
        return [[t.token_ids for t in g] for g in groups]

    first = run(0)
    assert run(0) == first
    assert all(len(set(group)) == 3 for group in first)  # the samples of a group differ
    assert run(1) != first


def test_text_only_backends_give_untrainable_trajectories(tokenizer):
    class TextOnly(ScriptedPolicy):
        async def generate(self, prompt, sampling):
            word = echo_reply(self.tokenizer.decode(list(prompt)))
            return Generation((), None, "stop", text=word, trainable=False)

    [group] = rollout("toy-echo-v0", TextOnly(tokenizer, ""), tokenizer, 1)
    trajectory = group.trajectories[0]
    assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.total_reward == 3.0
    assert not trajectory.trainable and set(trajectory.logprobs) == {0.0}


def test_chat_backends_get_the_conversation_as_messages(tokenizer):
    class ChatOnly(ScriptedPolicy):
        async def generate(self, prompt, sampling, *, tools=None):
            assert all(isinstance(m, dict) and "role" in m for m in prompt) and tools is None  # echo has no tools
            self.prompts.append([dict(m) for m in prompt])
            return Generation((), None, "stop", text=re.findall(r"Say: (\w+)", prompt[-1]["content"])[-1],
                              trainable=False)

    policy = ChatOnly(tokenizer, "")
    policy.prompts = []
    [group] = rollout("toy-echo-v0", policy, tokenizer, 1, prompt_format="messages")
    trajectory = group.trajectories[0]
    assert trajectory.stop_reason is StopReason.TERMINATED and trajectory.total_reward == 3.0
    assert not trajectory.trainable
    assert [len(p) for p in policy.prompts] == [2, 4, 6]
    assert policy.prompts[-1] == [dict(m) for m in trajectory.messages[:6]]
    with pytest.raises(ConfigError, match="prompt_format"):
        Runner("toy-echo-v0", policy, tokenizer, prompt_format="text")


def test_chat_backends_get_the_envs_tools_and_token_backends_do_not(tokenizer):
    seen = []

    class ChatWithTools(ScriptedPolicy):
        async def generate(self, prompt, sampling, *, tools=None):
            seen.append(tools)
            return Generation((), None, "stop", text=WRONG_GUESS, trainable=False)

    env = agentrl.make("toy-guess-v0")
    rollout("toy-guess-v0", ChatWithTools(tokenizer, ""), tokenizer, 1, prompt_format="messages",
            limits=RolloutLimits(max_turns=2))
    assert seen == [env.tool_schemas()] * 2 and seen[0][0]["function"]["name"] == "guess"

    class TokenOnly(ScriptedPolicy):
        async def generate(self, prompt, sampling):  # no tools parameter: token prompts never get one
            return await super().generate(prompt, sampling)

    [group] = rollout("toy-guess-v0", TokenOnly(tokenizer, WRONG_GUESS), tokenizer, 1, limits=RolloutLimits(max_turns=2))
    assert [t.stop_reason for t in group.trajectories] == [StopReason.MAX_TURNS]


def test_weight_versions_are_recorded(tokenizer):
    policy = ScriptedPolicy(tokenizer, echo_reply)
    asyncio.run(policy.update_weights([]))
    [group] = rollout("toy-echo-v0", policy, tokenizer, 1)
    assert group.trajectories[0].policy_version == 1


def test_runner_overhead_is_small(tokenizer):
    """Not a benchmark (see `agentrl bench rollout`): a floor that catches an accidental slowdown."""
    policy = ScriptedPolicy(tokenizer, WRONG_GUESS)
    runner_options = {"limits": RolloutLimits(max_turns=8), "concurrency": 32}
    started = time.process_time()
    groups = rollout("toy-guess-v0", policy, tokenizer, 16, group_size=4, **runner_options)
    turns = sum(len(t.turns) for g in groups for t in g)
    assert turns == 16 * 4 * 8
    assert turns / (time.process_time() - started) > 300


def test_sampling_params_passed_to_the_policy_keep_the_users_settings(tokenizer):
    policy = SeedRecorder(tokenizer, echo_reply)
    seen = []

    async def generate(prompt, sampling):
        seen.append(sampling)
        return await SeedRecorder.generate(policy, prompt, sampling)

    policy.generate = generate
    user = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=(7,))
    rollout("toy-echo-v0", policy, tokenizer, 1, sampling=user)
    assert all(dataclasses.replace(s, seed=None) == dataclasses.replace(user, seed=None) for s in seen)


@pytest.mark.slow
def test_bench_rollout_prints_both_tables():
    import subprocess
    import sys

    command = [sys.executable, "-m", "agentrl.cli", "bench", "rollout", "--episodes", "8", "--batch", "4",
               "--new-tokens", "4", "--rounds", "1", "--backends", "hf", "generate"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for needle in ("runner overhead", "null (async)", "toy-echo-v0 (sync)", "hf (agentrl decode loop)",
                   "transformers generate", "turns/CPU-s"):
        assert needle in proc.stdout
