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


def response(rng: random.Random, quality: str) -> str:
    words = rng.sample(WORDS, 2)
    words.insert(rng.randrange(3), quality)
    return " ".join(words)


def _examples(n: int, seed: int) -> list[Demonstration]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = rng.choice(TASKS)
        if i % 2 == 0:
            quality = rng.choice(["good", "bad"])
            asked = verdicts.pointwise_messages(task, response(rng, quality), rubric="", scale=(1, 10),
                                                template=POINTWISE, system=None)  # fmt: skip
            answer = "Score: 9" if quality == "good" else "Score: 2"
        else:
            qa, qb = rng.choice([("good", "bad"), ("bad", "good"), ("good", "good"), ("bad", "bad")])
            asked = verdicts.pairwise_messages(task, response(rng, qa), response(rng, qb),
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
