"""``code-sandbox-v0``: write Python functions with a sandboxed ``run_python`` tool, graded by hidden tests.

- :class:`CodeSandboxEnv`: the environment (registered in the ``agentrl.envs`` entry-point group).
- :func:`generate_tasks` / :data:`PRESETS`: the bundled procedural tasks; :func:`demonstration` gives each
  task's reference episode for SFT.
- :func:`load_humaneval` / :func:`load_mbpp` / :func:`load_tasks`: HumanEval- and MBPP-format files.
- :func:`grade`: the grader, whose verdict the program under test cannot forge (see :mod:`.grading`).
"""

from agentrl_envs.code_sandbox.datasets import load_humaneval, load_mbpp, load_tasks
from agentrl_envs.code_sandbox.env import CodeSandboxEnv
from agentrl_envs.code_sandbox.generator import PRESETS, GeneratorConfig, generate_tasks
from agentrl_envs.code_sandbox.grading import GradeConfig, GradeResult, SandboxPair, grade
from agentrl_envs.code_sandbox.prompts import demonstration
from agentrl_envs.code_sandbox.tasks import AssertTests, Call, CodeTask, IOTests

__all__ = [
    "PRESETS",
    "AssertTests",
    "Call",
    "CodeSandboxEnv",
    "CodeTask",
    "GeneratorConfig",
    "GradeConfig",
    "GradeResult",
    "IOTests",
    "SandboxPair",
    "demonstration",
    "generate_tasks",
    "grade",
    "load_humaneval",
    "load_mbpp",
    "load_tasks",
]
