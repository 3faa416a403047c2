"""``agentrl bench learner --algo dpo --vs trl``: our DPO and TRL's ``DPOTrainer`` side by side on one setup.

The setup: the learner bench's SFT warm start of the tiny model (cached), and preference pairs on its
addition task: the prompt "Add a and b. Put the result in <answer></answer>." (a, b in 10..99), chosen
``<answer>a+b</answer>``, rejected the same tags around a wrong sum (off by 1 or 10 either way). Both sides
get the same conversations: ours as :class:`~agentrl.learners.dpo.PreferenceConversation` s, TRL's in its
conversational ``prompt``/``chosen``/``rejected`` format. 8 pairs per step, sigmoid loss, beta 0.1,
constant lr 5e-5, AdamW (fused on both sides, no weight decay), grad-norm clip 1.0, fp32 unless
``--precision bf16``, one torch thread, no gradient checkpointing (TRL's default is on; we do not
checkpoint either, so it would only slow TRL down). Each side runs in its own process (so peak RSS is its
own), one epoch over ``8 x (steps + 2)`` pairs: two untimed warm-up steps, then ``--steps`` timed ones.

The reference's sequence logprobs are either precomputed once before training on both sides (ours:
``precompute_reference=True``, our default; TRL: ``precompute_ref_log_probs=True``) or computed for each
batch from a loaded reference on both sides (``False``, TRL's default); ``--ref`` picks one or both, and
each ratio compares the same choice. TRL keeps its defaults otherwise: its fused LM head, which also
computes its logged entropy and logit metrics, ``disable_dropout``, ``max_length=1024``. Its tokenization of
a conversation ends with the newline after the last ``<|im_end|>`` and scores it as part of the completion,
so its rows are one token longer than ours (48 vs 47 tokens, completions of 14 vs 13); tokens/s counts each
side's own non-padding tokens.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from typing import Any

from agentrl.types import Message

__all__ = ["WARMUP_STEPS", "add_arguments", "preference_conversations", "run_side"]

WARMUP_STEPS = 2
PAIRS_PER_STEP = 8
BETA = 0.1
LR = 5e-5
Mark = tuple[float, float, int, float]  # after a step: process time, wall time, tokens in its batch, loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ref", choices=["precomputed", "online", "both"], default="both",
        help="dpo: the reference's logprobs precomputed before training or computed per batch, on both sides",
    )  # fmt: skip


def preference_conversations(n: int, seed: int) -> list[dict[str, list[Message]]]:
    """``n`` addition pairs ``{"prompt", "chosen", "rejected"}`` of chat messages, drawn from ``seed``."""
    from agentrl.bench.learner import question

    rng = random.Random(seed)
    out: list[dict[str, list[Message]]] = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice((-10, -1, 1, 10))
        out.append({"prompt": [{"role": "user", "content": question(a, b)}],
                    "chosen": [{"role": "assistant", "content": f"<answer>{a + b}</answer>"}],
                    "rejected": [{"role": "assistant", "content": f"<answer>{wrong}</answer>"}]})  # fmt: skip
    return out


def run_side(side: str, model: str, steps: int, precision: str, seed: int, ref: str) -> dict[str, Any]:
    """Train one side in this process; its figures over the steps after the first ``WARMUP_STEPS``."""
    from agentrl.bench.learner import _summary

    run = _ours if side == "agentrl" else _trl
    result = _summary(run(model, steps, precision, seed, ref == "precomputed"), warmup=WARMUP_STEPS)
    result["tokens_per_s"] = result.pop("completion_tokens_per_s")
    result["losses"] = result.pop("rewards")
    return result


def _ours(model: str, steps: int, precision: str, seed: int, precomputed: bool) -> list[Mark]:
    import time

    from agentrl.learners import optim
    from agentrl.learners.dpo import DPOConfig, PreferenceConversation, _dataset, train_dpo
    from agentrl.models.loading import load_tokenizer

    total = steps + WARMUP_STEPS
    data = [PreferenceConversation(c["prompt"], c["chosen"], c["rejected"])
            for c in preference_conversations(PAIRS_PER_STEP * total, seed)]  # fmt: skip
    config = DPOConfig(
        model=model, loss="dpo", beta=BETA, lr=LR, batch_size=PAIRS_PER_STEP, max_steps=total,
        warmup_steps=0, min_lr_ratio=1.0, grad_clip=1.0, weight_decay=0.0, precision=precision,
        precompute_reference=precomputed, seed=seed,
    )  # fmt: skip
    # Each step's tokens, from the seeded batch order train_dpo draws (counted before the clock starts).
    dataset = _dataset(config, load_tokenizer(model), data)
    batches = optim.iterate_batches(len(dataset), PAIRS_PER_STEP, seed)
    tokens = [sum(len(dataset.chosen[i].token_ids) + len(dataset.rejected[i].token_ids) for i in next(batches))
              for _ in range(total)]  # fmt: skip
    marks: list[Mark] = []

    def on_step(log: Any) -> None:
        marks.append((time.process_time(), time.perf_counter(), tokens[log.step - 1], log.loss))

    train_dpo(config, data, on_step=on_step)
    return marks


def _trl(model: str, steps: int, precision: str, seed: int, precomputed: bool) -> list[Mark]:
    import time

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    total = steps + WARMUP_STEPS
    data = Dataset.from_list(preference_conversations(PAIRS_PER_STEP * total, seed))
    clock: list[tuple[float, float]] = []
    step_logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                step_logs.append(dict(logs))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.append((time.process_time(), time.perf_counter()))

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, use_cpu=True, bf16=precision == "bf16", per_device_train_batch_size=PAIRS_PER_STEP,
            loss_type=["sigmoid"], beta=BETA, learning_rate=LR, lr_scheduler_type="constant",
            precompute_ref_log_probs=precomputed, gradient_checkpointing=False, max_steps=total,
            logging_steps=1, report_to="none", save_strategy="no", seed=seed, dataloader_num_workers=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, callbacks=[Clock()])
        trainer.train()
    seen = [int(entry["num_tokens"]) for entry in step_logs]  # TRL logs the running total
    tokens = [now - before for before, now in zip([0, *seen], seen, strict=False)]
    return [(cpu, wall, n, float(entry["loss"]))
            for (cpu, wall), n, entry in zip(clock, tokens, step_logs, strict=True)]  # fmt: skip
