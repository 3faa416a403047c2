"""Environments bundled with agentrl.

Each one is declared in the ``agentrl.envs`` entry-point group of agentrl's ``pyproject.toml``, exactly as a
third-party package declares its own; ``agentrl.make("<id>")`` imports the module only then.
"""
