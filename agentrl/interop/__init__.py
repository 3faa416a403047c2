"""Environments from other ecosystems (verifiers packages, Harbor task folders, ...) as agentrl envs."""
