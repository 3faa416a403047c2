"""A tool-using environment in a few lines: two typed tools, a task set and a reward (the README's example).

Run it: ``python examples/tool_env.py``. It registers ``shop-v0``, checks it with the env checker (which
also runs Gymnasium's), and plays one episode with a scripted policy.
"""

import asyncio

import agentrl
from agentrl.checker import check_env
from agentrl.toolenv import Task, ToolEnv

PRICES = {"apple": 0.5, "pear": 0.75, "melon": 3.0}


def price(item: str) -> float:
    """The price of one item, in dollars.

    Args:
        item: What to price, e.g. "apple".
    """
    return PRICES[item.lower()]  # an unknown item raises: the model sees "Error: KeyError: ..." and goes on


async def multiply(a: float, b: float) -> float:
    """Multiply two numbers (async tools work the same way).

    Args:
        a: The first number.
        b: The second number.
    """
    await asyncio.sleep(0)
    return a * b


TASKS = [
    Task("How many dollars do 4 apples cost?", answer=2.0),
    Task("How many dollars do 3 melons cost?", answer=9.0),
    Task("How many dollars do 2 pears cost?", answer=1.5),
]


def correct(task: Task, answer: str) -> float:
    """1 if the final answer is the right number, else 0 (``answer`` is "" when a limit ended the episode)."""
    try:
        return float(abs(float(answer.strip("$ ")) - task.answer) < 1e-6)
    except ValueError:
        return 0.0


def make_shop_env() -> ToolEnv:
    return ToolEnv([price, multiply], TASKS, reward=correct, max_turns=4, format_penalty=0.1)


if __name__ == "__main__":
    agentrl.register("shop-v0", make_shop_env, max_turns=4)
    env = agentrl.make("shop-v0")
    print("passed:", ", ".join(check_env(env)))

    env = agentrl.make("shop-v0")
    obs, info = env.reset(seed=0, options={"task": 0})
    print("task:", obs[-1]["content"], "| tools:", [t["function"]["name"] for t in info["tools"]])
    for action in [
        '<tool_call>{"name": "price", "arguments": {"item": "apple"}}</tool_call>',
        '<tool_call>{"name": "multiply", "arguments": {"a": 0.5, "b": 4}}</tool_call>',
        "<answer>2.0</answer>",
    ]:
        obs, reward, terminated, truncated, info = env.step(action)
        print(f"{action[:60]!r:64} -> {[m['content'] for m in obs]} reward={reward} {info['reward_components']}")
    env.close()
