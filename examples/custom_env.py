"""A custom env end to end: define, register, check, then SFT on demonstrations, GRPO and the eval harness in the
process that registered it. Run it: ``python examples/custom_env.py`` (minutes on a CPU); ``--small``: seconds."""

import sys
import tempfile

import agentrl
from agentrl import Env, ResetResult, StepResult
from agentrl.checker import check_env


class Countdown(Env):
    """Count down from a random number; a process reward every turn."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)                       # seeds self.np_random, as in Gymnasium
        self.n = int(self.np_random.integers(3, 6))
        return ResetResult([{"role": "user", "content": f"Count down from {self.n}, one number per turn."}],
                           {"tools": []})

    def step(self, action):
        ok = action.strip() == str(self.n)
        self.n -= 1
        reward = 1.0 if ok else 0.0
        return StepResult([], reward, self.n == 0, False, {"reward_components": {"correct": reward}})


if __name__ == "__main__":
    from agentrl.evaluation.config import EvalConfig
    from agentrl.evaluation.harness import evaluate
    from agentrl.learners.grpo import GRPOConfig, train_grpo
    from agentrl.learners.sft import Demonstration, SFTConfig, train_sft

    agentrl.register("countdown-v0", Countdown, max_turns=6)
    env = agentrl.make("countdown")                         # the bare name is the latest version
    print("checked:", ", ".join(check_env(env)))            # our contract checks + gymnasium's own check_env

    sft_steps, steps, tasks, group = (4, 2, 4, 4) if "--small" in sys.argv else (60, 30, 16, 8)
    out = tempfile.mkdtemp(prefix="countdown-")
    demos = [Demonstration([{"role": "user", "content": f"Count down from {n}, one number per turn."},
                            *({"role": "assistant", "content": str(k)} for k in range(n, 0, -1))]) for n in (3, 4, 5)]
    sft = train_sft(SFTConfig(max_steps=sft_steps, batch_size=3, warmup_steps=0, output_dir=f"{out}/sft"), demos)
    config = GRPOConfig(env="countdown-v0", model=str(sft.checkpoint), max_steps=steps, prompts_per_step=tasks,
                        group_size=group, max_new_tokens=3, lr=3e-4, warmup_steps=0, output_dir=f"{out}/rl")
    result = train_grpo(config, on_step=lambda log: print(f"step {log.step} reward {log.reward_mean:.2f}"))
    outcome = evaluate(EvalConfig(env="countdown-v0", model=str(result.checkpoint), n=2 * tasks, max_new_tokens=3,
                                  out=f"{out}/eval"), show_progress=False)
    print(f"eval: {outcome.results['metrics']['reward']['value']:.2f} numbers right per episode (of 3-5)")
    print(f"report: {outcome.out / 'report.html'}")
