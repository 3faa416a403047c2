"""math-v0: math questions with a verified final answer, single-turn or with a calculator / python tool.

Registered in the ``agentrl.envs`` entry-point group as ``agentrl_envs.math:MathEnv``.
"""

from agentrl_envs.math.calculator import CalculatorError, calculate
from agentrl_envs.math.env import MathEnv
from agentrl_envs.math.tasks import LEVELS, MathTask, generate_task, generate_tasks, load_jsonl

__all__ = [
    "LEVELS",
    "CalculatorError",
    "MathEnv",
    "MathTask",
    "calculate",
    "generate_task",
    "generate_tasks",
    "load_jsonl",
]
