"""``agentrl train``: a whole run (SFT tool-format phase, RL, held-out evaluation) from one config.

Importing this package imports nothing heavy.
"""

__all__: list[str] = []
