"""web-tools-v0: answer questions by searching and reading pages served over HTTP on loopback.

Registered in the ``agentrl.envs`` entry-point group as ``agentrl_envs.web_tools:WebToolsEnv``.
"""

from agentrl_envs.web_tools.env import WebToolsEnv

__all__ = ["WebToolsEnv"]
