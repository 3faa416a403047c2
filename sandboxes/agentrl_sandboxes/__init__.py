"""Sandbox backends bundled with agentrl, declared in the ``agentrl.sandboxes`` entry-point group."""
