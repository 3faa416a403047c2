"""Register a custom environment, make it by id, and check it (the README's example)."""

import gymnasium

import agentrl
from agentrl import Env, ResetResult, StepResult
from agentrl.checker import check_env


class Countdown(Env):
    """Count down from a random number; a process reward every turn."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)  # seeds self.np_random, as in Gymnasium
        self.n = int(self.np_random.integers(3, 6))
        return ResetResult(
            [{"role": "user", "content": f"Count down from {self.n}, one number per turn."}], {"tools": []}
        )

    def step(self, action):
        ok = action.strip() == str(self.n)
        self.n -= 1
        reward = 1.0 if ok else 0.0
        return StepResult([], reward, self.n == 0, False, {"reward_components": {"correct": reward}})


if __name__ == "__main__":
    agentrl.register("countdown-v0", Countdown, max_turns=6)
    env = agentrl.make("countdown")  # the bare name is the latest version
    print("passed:", ", ".join(check_env(env)))
    obs, info = gymnasium.make("agentrl/countdown-v0").reset(seed=0)
    print(obs[0]["content"])
