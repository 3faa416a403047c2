"""A real local judge for the tests: the tiny model taught the verdict formats by a short SFT run.

Its rule: a response with "good" in it scores 9, one with "bad" 2; of two responses the "good" one wins,
and when both are alike it answers "Verdict: A" (a position bias, on purpose, so that asking in both
orders has something to cancel).
"""

from __future__ import annotations

import random
from pathlib import Path

from agentrl.judge import verdicts
from agentrl.learners.sft import Demonstration, SFTConfig, train_sft
from agentrl.models.tiny import tiny_model_path

POINTWISE = "[Task] {prompt}\n[Response] {response}\nScore ({low}-{high})?"
PAIRWISE = "[Task] {prompt}\n[A] {a}\n[B] {b}\nVerdict?"
OPTIONS = {"pointwise_template": POINTWISE, "pairwise_template": PAIRWISE, "system": None}
"""The judge's compact questions (the tiny model learns a rule over a short prompt quickly)."""
TASKS = ["Say something about the cat.", "Describe the weather.", "Greet the user.", "Answer the question."]
WORDS = ["cat", "sun", "day", "tree", "blue", "soft", "red", "fast", "home", "code"]


def response(rng: random.Random, quality: str, boxed: bool = False) -> str:
    words = rng.sample(WORDS, 2)
    words.insert(rng.randrange(3), quality)
    if boxed:  # an answer as the math env's episodes end
        return f"{quality} \\boxed{{{rng.randint(0, 99)}}}"
    return " ".join(words)


def task(rng: random.Random) -> str:
    """One of the fixed tasks, or a math question as an episode's transcript shows it."""
    if rng.random() < 0.5:
        return rng.choice(TASKS)
    return f"user: What is {rng.randint(1, 20)} {rng.choice('+-*')} {rng.randint(1, 20)}?"


def _examples(n: int, seed: int) -> list[Demonstration]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        asked_task = task(rng)
        if i % 2 == 0:
            quality = rng.choice(["good", "bad"])
            asked = verdicts.pointwise_messages(asked_task, response(rng, quality, rng.random() < 0.3), rubric="", scale=(1, 10),
                                                template=POINTWISE, system=None)  # fmt: skip
            answer = "Score: 9" if quality == "good" else "Score: 2"
        else:
            qa, qb = rng.choice([("good", "bad"), ("bad", "good"), ("good", "good"), ("bad", "bad")])
            asked = verdicts.pairwise_messages(asked_task, response(rng, qa), response(rng, qb),
                                               rubric="", template=PAIRWISE, system=None)  # fmt: skip
            answer = "Verdict: B" if (qa, qb) == ("bad", "good") else "Verdict: A"
        out.append(Demonstration([*asked, {"role": "assistant", "content": answer}]))
    return out


def train_judge(out_dir: Path, steps: int = 200) -> Path:
    """Train the judge into ``out_dir`` and return the checkpoint directory."""
    config = SFTConfig(model=str(tiny_model_path()), max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=10,
                       max_seq_len=512, output_dir=str(out_dir), seed=0)  # fmt: skip
    result = train_sft(config, _examples(512, seed=0))
    assert result.checkpoint is not None
    return result.checkpoint
