"""The scripted player of the verifiers tests' higher/lower guessing game (v0 and v1 packages alike)."""

from __future__ import annotations

import re


def binary_search(prompt: str) -> str:
    """The next guess in 1..10 from the rendered prompt's earlier guesses and "higher"/"lower" replies."""
    low, high = 1, 10
    guesses = [int(g) for g in re.findall(r"<\|im_start\|>assistant\n(\d+)", prompt)]
    answers = re.findall(r"<\|im_start\|>user\n(higher|lower)", prompt)
    for guess, answer in zip(guesses, answers, strict=False):
        low, high = (guess + 1, high) if answer == "higher" else (low, guess - 1)
    return str((low + high) // 2)
