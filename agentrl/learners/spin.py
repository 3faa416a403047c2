"""SPIN, self-play fine-tuning: the model learns to tell the SFT data's answers from its own, one iterate at a
time, with nothing but the SFT data (no reward, no preference labels).

One iteration ``k`` (1 to ``iterations``) starts from the iterate ``θ_{k-1}`` (``θ_0`` is ``config.model``)::

    generate  θ_{k-1}'s answer y' to each prompt x of the data (greedy or sampled, ``max_new_tokens``)
    pair      chosen = the ground-truth answer y, rejected = y'; a prompt whose y' renders exactly like y
              (the model already says it) or whose generation failed gives no pair
    train     ``train_dpo`` for ``max_steps`` optimizer steps on the pairs (any loss of DPOConfig; SPIN's
              own is the logistic one, ``loss="dpo"``), θ_{k-1} the reference and the starting point
    save      θ_k to ``<output_dir>/iteration-k/step-NNNNNN`` beside the pairs (``pairs.jsonl``); the
              next iteration starts from it

Each iteration has a fresh optimizer and warm-up + cosine schedule. An iteration that finds no pair (every
answer already matches) ends the run: the model has nothing left to tell apart. The log shows self-play
progress in log-probabilities measured on the iteration's own pairs before and after its training: the
ground truth's, and its margin over the generations (it rises within an iteration as DPO learns the pairs;
across iterations, the margin each iteration starts from rises as the model's own answers move toward the
data's).

Usage::

    from agentrl.learners.sft import read_messages_jsonl
    from agentrl.learners.spin import SPINConfig, train_spin

    data = read_messages_jsonl("sft.jsonl")  # or message lists ending with the assistant's answer
    result = train_spin(SPINConfig(model="runs/sft/step-000200", iterations=3, max_steps=100,
                                   output_dir="runs/spin"), data)
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from agentrl.errors import ConfigError
from agentrl.learners import policy_model
from agentrl.learners.dpo import DPOConfig, SequenceLogps, _dataset, _reference_logps, train_dpo
from agentrl.learners.preference_data import PreferenceConversation
from agentrl.learners.result import TrainResult
from agentrl.learners.sft import Demonstration
from agentrl.models.chat import ChatRenderer
from agentrl.rollout.complete import Completion
from agentrl.types import Message, ToolSchema

__all__ = [
    "SPINConfig",
    "SPINExample",
    "SPINIterationLog",
    "generate_answers",
    "self_play_pairs",
    "spin_examples",
    "train_spin",
]


class SPINConfig(DPOConfig):
    """A SPIN run: the preference fields of :class:`~agentrl.learners.dpo.DPOConfig` apply to every
    iteration's training (``max_steps`` counts optimizer steps per iteration, and the schedule restarts
    each iteration), plus the iteration count and how the iterate answers. Invalid values raise
    :class:`~agentrl.errors.ConfigError`."""

    iterations: int = Field(3, ge=1, description="self-play iterations (generate, pair, train), e.g. 3")
    max_new_tokens: int = Field(256, ge=1, description="the most tokens of each generated answer, e.g. 256")
    temperature: float = Field(
        1.0, ge=0, description="sampling temperature of the iterate's answers; 0 is greedy, e.g. 1.0"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the iterate's answers, 1.0 = off")
    generation_batch: int = Field(64, ge=1, description="answers generated together, e.g. 64")

    @model_validator(mode="after")
    def _no_resume(self) -> SPINConfig:
        if self.resume_from is not None:
            raise ValueError(
                "resume_from does not apply to SPIN; to continue a run, set model= to the last iteration's "
                "checkpoint and iterations= to the iterations left"
            )
        return self


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SPINExample:
    """One SFT example as self-play sees it: the conversation up to the answer, and the answer."""

    prompt: tuple[Message, ...]
    answer: Message
    tools: tuple[ToolSchema, ...] = ()


def spin_examples(data: Iterable[Sequence[Message] | Demonstration | SPINExample]) -> list[SPINExample]:
    """Split each conversation at its last assistant message: everything before it is the prompt, that
    message the ground truth (messages after it are dropped).

    Args:
        data: message lists, :class:`~agentrl.learners.sft.Demonstration` s (e.g. from
            :func:`~agentrl.learners.sft.read_messages_jsonl`; their tools are kept) or examples already split.

    Raises:
        ConfigError: a conversation without an assistant message, or one that starts with it.
    """
    out = []
    for n, item in enumerate(data):
        if isinstance(item, SPINExample):
            out.append(item)
            continue
        messages, tools = (item.messages, item.tools) if isinstance(item, Demonstration) else (item, ())
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
        if last < 1:
            what = "has no assistant message" if last < 0 else "starts with the assistant's answer"
            raise ConfigError(
                f"example {n} {what}; SPIN needs a prompt (e.g. a user message) followed by the "
                "assistant's ground-truth answer"
            )
        out.append(SPINExample(tuple(messages[:last]), messages[last], tuple(tools)))
    return out


# ---- one iteration's steps ----------------------------------------------------------------------
def generate_answers(
    model: Any, tokenizer: Any, examples: Sequence[SPINExample], config: SPINConfig, seed: int
) -> list[Completion]:
    """The iterate's answer to each example's prompt, in order, with ``config``'s sampling settings.

    Examples offering different tools are rendered with their own tools and generated together. A failed
    generation is a :class:`~agentrl.rollout.complete.Completion` with ``error`` set.
    """
    from agentrl.rollout.complete import acomplete
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams

    sampling = SamplingParams(
        max_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
    )
    by_tools: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_tools.setdefault(json.dumps(example.tools, sort_keys=True), []).append(i)

    async def run() -> list[Completion]:
        policy = HFPolicy(
            model, tokenizer, device=config.device, max_batch=config.generation_batch, seed=seed
        )
        try:
            groups = await asyncio.gather(*(
                acomplete(policy, [examples[i].prompt for i in index], sampling,
                          ChatRenderer(tokenizer, examples[index[0]].tools, config.template))
                for index in by_tools.values()
            ))  # fmt: skip
        finally:
            await policy.aclose()
        out: list[Completion | None] = [None] * len(examples)
        for index, completions in zip(by_tools.values(), groups, strict=True):
            for i, completion in zip(index, completions, strict=True):
                out[i] = completion
        return [c for c in out if c is not None]

    return asyncio.run(run())


def self_play_pairs(
    tokenizer: Any,
    examples: Sequence[SPINExample],
    answers: Sequence[Completion],
    template: str | None = None,
) -> tuple[list[PreferenceConversation], int, int]:
    """Pair each ground truth (chosen) with the iterate's answer (rejected).

    Returns:
        The pairs, the number of answers that render exactly like their ground truth (no pair: nothing to
        tell apart) and the number of failed generations (no pair).
    """
    pairs: list[PreferenceConversation] = []
    matched = failed = 0
    for example, answer in zip(examples, answers, strict=True):
        if not answer.ok or answer.text is None:
            failed += 1
            continue
        generated: Message = {"role": "assistant", "content": answer.text}
        renderer = ChatRenderer(tokenizer, example.tools, template)
        prompt = list(example.prompt)
        if renderer.render([*prompt, generated], False) == renderer.render([*prompt, example.answer], False):
            matched += 1
            continue
        pairs.append(PreferenceConversation(example.prompt, (example.answer,), (generated,), example.tools))
    return pairs, matched, failed


def _write_pairs(path: Path, pairs: Sequence[PreferenceConversation]) -> None:
    """``pairs`` in :func:`~agentrl.learners.preference_data.read_preference_jsonl`'s format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            record = {"prompt": list(p.prompt), "chosen": list(p.chosen), "rejected": list(p.rejected),
                      "tools": list(p.tools)}  # fmt: skip
            f.write(json.dumps(record) + "\n")


def _score(model: Any, rows: Sequence[Any], pad_id: int, config: DPOConfig) -> SequenceLogps:
    """Sequence logprobs of ``rows`` under ``model`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        return _reference_logps(model, model, rows, pad_id, config, config.batch_size)
    finally:
        model.train(was_training)


# ---- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SPINIterationLog:
    """One iteration. The log-probabilities are sums over each answer's tokens, averaged over the
    iteration's pairs, under its starting iterate (``_before``) and its trained one (``_after``); NaN where
    the iteration found no pair.

    Attributes:
        matched: answers that rendered exactly like the ground truth; failed: generations that errored.
        loss, step_accuracy: DPO's mean loss and batch accuracy over the iteration's steps (each measured
            before its update, so the first step's accuracy is 0: policy and reference are equal).
        accuracy: the fraction of pairs whose ground truth gained more log-probability than the generation
            did (DPO's implicit-reward ranking of its training pairs, summed over tokens).
        truth_logp_*: the ground truth's log-probability.
        margin_*: the ground truth's log-probability less the generation's.
        checkpoint: the iterate this iteration saved (None when it found no pair, or without output_dir).
    """

    iteration: int
    prompts: int
    pairs: int
    matched: int
    failed: int
    loss: float
    step_accuracy: float
    accuracy: float
    truth_logp_before: float
    truth_logp_after: float
    margin_before: float
    margin_after: float
    checkpoint: Path | None
    generate_seconds: float
    seconds: float


def train_spin(
    config: SPINConfig,
    data: Iterable[Sequence[Message] | Demonstration | SPINExample],
    on_iteration: Callable[[SPINIterationLog, list[PreferenceConversation]], None] | None = None,
) -> TrainResult:
    """Run up to ``config.iterations`` self-play iterations from ``config.model``; see the module docstring.

    Args:
        config: the run's settings. Without ``output_dir`` each iterate is kept in a temporary directory
            that is deleted at the end (the checkpoints in the result are then None).
        data: the SFT data (see :func:`spin_examples`).
        on_iteration: called after each iteration with its log and its pairs.

    Returns:
        The last iterate (in train mode; the starting model when the first iteration found no pair), its
        tokenizer and checkpoint, and one :class:`SPINIterationLog` per iteration run.

    Raises:
        ConfigError: a conversation without a prompt or an answer; no pair with an answer token within
            ``max_seq_len``.
    """
    examples = spin_examples(data)
    if not examples:
        raise ConfigError("SPIN needs at least one example (a prompt and its ground-truth answer)")
    history: list[SPINIterationLog] = []
    model: Any = None
    tokenizer: Any = None
    with tempfile.TemporaryDirectory(prefix="agentrl-spin-") as scratch:
        root = config.output_dir if config.output_dir is not None else Path(scratch)
        start: str | Path = config.model
        checkpoint: Path | None = None
        for k in range(1, config.iterations + 1):
            model = None  # the previous iterate is on disk: free it before loading the next
            model, tokenizer, saved, log, pairs = _iteration(
                config, k, start, examples, root / f"iteration-{k}"
            )
            history.append(log)
            if on_iteration is not None:
                on_iteration(log, pairs)
            if not pairs:  # every prompt answered like the data (or failed): nothing left to tell apart
                break
            assert saved is not None  # train_dpo always saves its last step with an output_dir
            checkpoint = start = saved
        model.train()
    return TrainResult(model, tokenizer, tuple(history), checkpoint if config.output_dir is not None else None)


def _iteration(
    config: SPINConfig, k: int, start: str | Path, examples: Sequence[SPINExample], out: Path
) -> tuple[Any, Any, Path | None, SPINIterationLog, list[PreferenceConversation]]:
    """Generate with the iterate ``start``, pair, score the pairs under it, train DPO, score them again.

    Returns:
        The trained model (``start`` loaded when there was no pair), its tokenizer and checkpoint (None
        without a pair), the log and the pairs.
    """
    from agentrl.models.loading import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(start)
    model: Any = load_model(start, dtype=torch.float32, device=torch.device(config.device))
    answers = generate_answers(model, tokenizer, examples, config, seed=config.seed + k)
    generate_s = time.perf_counter() - started
    pairs, matched, failed = self_play_pairs(tokenizer, examples, answers, config.template)
    counts: dict[str, Any] = {"iteration": k, "prompts": len(examples), "pairs": len(pairs),
                              "matched": matched, "failed": failed, "generate_seconds": generate_s}  # fmt: skip
    if not pairs:
        log = SPINIterationLog(**counts, **_no_training(), checkpoint=None, seconds=time.perf_counter() - started)
        return model, tokenizer, None, log, pairs

    _write_pairs(out / "pairs.jsonl", pairs)
    dpo = DPOConfig(**{**config.model_dump(include=set(DPOConfig.model_fields)), "model": str(start),
                       "output_dir": out})  # fmt: skip
    # Scored as pairs whatever the loss (KTO would lay the rows out as unpaired examples).
    dataset = _dataset(dpo.model_copy(update={"loss": "dpo"}), tokenizer, pairs)
    rows = [*dataset.chosen, *dataset.rejected]
    pad_id = policy_model.pad_id(tokenizer)
    before = _score(model, rows, pad_id, dpo).sum_N
    model = None  # train_dpo loads its own policy and reference from the same checkpoint
    result = train_dpo(dpo, pairs)
    after = _score(result.model, rows, pad_id, dpo).sum_N

    n, steps = len(dataset), result.history
    gain_c, gain_r = after[:n] - before[:n], after[n:] - before[n:]
    log = SPINIterationLog(
        **counts,
        loss=sum(s.loss for s in steps) / len(steps),
        step_accuracy=sum(s.accuracy for s in steps) / len(steps),
        accuracy=float((gain_c > gain_r).float().mean()),
        truth_logp_before=float(before[:n].mean()),
        truth_logp_after=float(after[:n].mean()),
        margin_before=float((before[:n] - before[n:]).mean()),
        margin_after=float((after[:n] - after[n:]).mean()),
        checkpoint=result.checkpoint if config.output_dir is not None else None,
        seconds=time.perf_counter() - started,
    )
    return result.model, result.tokenizer, result.checkpoint, log, pairs


def _no_training() -> dict[str, Any]:
    keys = ("loss", "step_accuracy", "accuracy", "truth_logp_before", "truth_logp_after", "margin_before",
            "margin_after")  # fmt: skip
    return dict.fromkeys(keys, math.nan)
