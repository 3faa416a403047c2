"""Environments from other ecosystems, and ours served to them.

- ``mcp:<config file>``: a tool env whose tools come from MCP servers (:mod:`agentrl.interop.mcp`).
- ``openenv:<url>``: an env that drives an OpenEnv server (:mod:`agentrl.interop.openenv`).
- ``verifiers:<env-id>``: an installed verifiers environment package (:mod:`agentrl.interop.verifiers`); a
  verifiers 0.4 (v1) taskset plays in a bridge process of the interpreter that has it
  (:mod:`agentrl.interop.verifiers_v1`, ``AGENTRL_VERIFIERS_PYTHON``).
- ``harbor:<path>``: Harbor task folders, run in the docker sandbox (:mod:`agentrl.interop.harbor`).
- ``agentrl serve <env-id>``: any agentrl env as an OpenEnv server (:mod:`agentrl.interop.serve`).

Each module imports its ecosystem's packages (``mcp``, ``websockets``, ``fastapi``, ``verifiers``) only
when used; install them with ``pip install 'agentrl[interop]'`` or ``'agentrl[verifiers]'``.
"""

__all__: list[str] = []
