"""``agentrl bench gpu``: the GPU path of a training step, on models shaped like Qwen3-0.6B and Qwen3-1.7B.

No weights can be downloaded where it runs, so each model is built locally with random weights from the
real architecture's shape (``Qwen3Config``), saved, and loaded back through ``from_pretrained``. Per shape:

- **decode**: the ``hf`` backend's tokens/s at batch 64 and 256 (prompts of ``--prompt`` random tokens,
  ``--new-tokens`` sampled each; end-of-sequence ignored so every row decodes the same length);
- **learner**: tokens/s of one GRPO-style update (packed rows, bf16 autocast, fp32 master weights, AdamW),
  its model FLOPs utilisation (``6 x parameters x tokens/s`` over the device's dense bf16 peak, where the
  device is known) and the peak memory of the whole step;
- **weight sync**: seconds to load the learner's weights into a separate ``hf`` engine (the path of engines
  on Ray); **identity check**: seconds of :func:`agentrl.learners.sync_check.check_sync` after it, and its gap;
- **ratio at step 0**: sampled with top-k 50 / top-p 0.9 by the learner's own weights, the mean and largest
  ``|ratio - 1|`` of the learner's truncated logprobs against the sampler's, and the mean ratio an untruncated
  learner would see (the kept mass; the bias :mod:`agentrl.algos.sampling` removes).

One run of every figure, on whatever device torch sees (``--shapes tiny`` runs in seconds on a CPU and is
what CI runs). ``--out`` writes the table as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["PEAK_BF16_FLOPS", "SHAPES", "add_arguments", "main"]

_QWEN3 = {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
          "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 1_000_000.0}  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28},
    "qwen3-1.7b": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28},
    "tiny": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096,
             "tie_word_embeddings": True, "max_position_embeddings": 2048, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2},
}  # fmt: skip
"""Model shapes by name (Qwen3's published configurations, and a tiny one for CPUs)."""

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
"""Dense bf16 peak FLOP/s by device-name fragment, for the MFU column."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"], choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256], help="decode batch sizes")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per request (default 256)")
    parser.add_argument("--new-tokens", type=int, default=128, help="sampled tokens per request (default 128)")
    parser.add_argument("--learner-rows", type=int, default=16, help="trajectories per update (default 16)")
    parser.add_argument("--learner-steps", type=int, default=3, help="timed updates after one warm-up")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for every model built
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"agentrl bench gpu: {name}, torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(_bench_shape(shape, Path(tmp), device, name, args))
        _print_row(rows[-1])
    if args.out is not None:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


def _bench_shape(shape: str, tmp: Path, device: str, device_name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from agentrl.models.loading import load_model, load_tokenizer

    path = _build(shape, tmp)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    row: dict[str, Any] = {"shape": shape}
    engine_model = load_model(path, dtype=dtype, device=device).eval()
    row["params_m"] = sum(p.numel() for p in engine_model.parameters()) / 1e6
    tokenizer = load_tokenizer("tiny")  # ids only: the engine needs an end-of-sequence id, which is ignored
    for batch in args.batches:
        row[f"decode_tok_s_b{batch}"] = asyncio.run(_decode(engine_model, tokenizer, device, batch, args))
    learner = load_model(path, dtype=torch.float32, device=device)
    if args.gradient_checkpointing:
        learner.gradient_checkpointing_enable()
    row.update(_learner(learner, device, device_name, args, row["params_m"] * 1e6))
    row.update(asyncio.run(_sync(learner, engine_model, tokenizer, device)))
    row.update(asyncio.run(_ratio(learner, tokenizer, device, args)))
    return row


def _build(shape: str, tmp: Path) -> Path:
    """A model of ``shape`` with random weights, saved as a checkpoint ``from_pretrained`` loads."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPES[shape]), dtype=torch.bfloat16)
    model.save_pretrained(tmp / shape)
    return tmp / shape


def _sync_device(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _ledger(prompt: list[int], sampled: list[int], logprobs: list[float]) -> Any:
    """A one-turn trajectory: ``prompt`` (not trained), then ``sampled`` with the sampler's ``logprobs``."""
    from agentrl.data.trajectory import Trajectory, TurnSpan

    n = len(prompt)
    return Trajectory([*prompt, *sampled], [0.0] * n + logprobs, [0] * n + [1] * len(sampled),
                      [TurnSpan(n, n + len(sampled))])  # fmt: skip


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


async def _decode(model: Any, tokenizer: Any, device: str, batch: int, args: argparse.Namespace) -> float:
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams

    policy = HFPolicy(model, tokenizer, device=device, max_batch=batch, share_prefix=False)
    policy.eos_token_ids = []  # random weights: every row decodes the whole length
    prompts = _prompts(batch, args.prompt, model.config.vocab_size, seed=batch)
    sampling = SamplingParams(args.new_tokens, 1.0)
    try:
        await asyncio.gather(*(policy.generate(p, SamplingParams(4, 1.0)) for p in prompts[:2]))  # warm-up
        _sync_device(device)
        started = time.perf_counter()
        out = await asyncio.gather(*(policy.generate(p, sampling) for p in prompts))
        _sync_device(device)
        return sum(len(g.token_ids) for g in out) / (time.perf_counter() - started)
    finally:
        await policy.aclose()


def _learner(model: Any, device: str, device_name: str, args: argparse.Namespace, params: float) -> dict[str, Any]:
    """One GRPO-style update, timed: packed rows, bf16 autocast on CUDA, AdamW."""
    import torch

    from agentrl.data.batch import collate
    from agentrl.learners.logprobs import policy_logprobs

    rows = _prompts(args.learner_rows, args.prompt + args.new_tokens, model.config.vocab_size, seed=1)
    trajectories = [_ledger(ids[: args.prompt], ids[args.prompt :], [0.0] * args.new_tokens) for ids in rows]
    batch = collate(trajectories, pad_id=0, packing=True, row_tokens=4 * (args.prompt + args.new_tokens)).to_torch(device)
    advantages = torch.randn(batch.token_ids_B_T.shape, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def update() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logprobs, _ = policy_logprobs(model, batch)
        mask = batch.loss_mask_B_T.float()
        loss = -(logprobs * advantages * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update()  # warm-up: kernels, allocator, optimizer state
    _sync_device(device)
    started = time.perf_counter()
    for _ in range(args.learner_steps):
        update()
    _sync_device(device)
    tokens_s = args.learner_steps * batch.num_tokens / (time.perf_counter() - started)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)
    return {
        "learner_tok_s": tokens_s,
        "mfu": 6 * params * tokens_s / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


async def _sync(learner: Any, engine_model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    from agentrl.learners import sync_check
    from agentrl.learners.policy_model import export_weights
    from agentrl.rollout.hf import HFPolicy

    engine = HFPolicy(engine_model, tokenizer, device=device)
    try:
        _sync_device(device)
        started = time.perf_counter()
        await engine.update_weights(list(export_weights(learner)))
        _sync_device(device)
        sync_s = time.perf_counter() - started
        probe = sync_check.probe_sequences(tokenizer)
        tolerance = sync_check.default_tolerance("bf16" if device == "cuda" else "fp32", None)
        learner.eval()
        check = await sync_check.check_sync(engine, learner, probe, tolerance, engine.version)
        assert check is not None
        return {"sync_s": sync_s, "check_s": check.seconds, "check_gap": check.mean_gap}
    finally:
        await engine.aclose()


async def _ratio(learner: Any, tokenizer: Any, device: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from agentrl.data.batch import collate
    from agentrl.learners.logprobs import policy_logprobs
    from agentrl.rollout.hf import HFPolicy
    from agentrl.rollout.policy import SamplingParams

    learner.eval()
    policy = HFPolicy(learner, tokenizer, device=device, share_prefix=False)
    prompts = _prompts(8, min(args.prompt, 64), learner.config.vocab_size, seed=2)
    sampling = SamplingParams(min(args.new_tokens, 32), 1.0, top_p=0.9, top_k=50)
    try:
        out = await asyncio.gather(*(policy.generate(p, sampling) for p in prompts))
    finally:
        await policy.aclose()
    trajectories = [_ledger(p, list(g.token_ids), list(g.logprobs or ())) for p, g in zip(prompts, out, strict=True)]
    batch = collate(trajectories, pad_id=0).to_torch(device)
    mask = batch.loss_mask_B_T.bool()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        truncated, _ = policy_logprobs(learner, batch, top_k=50, top_p=0.9)
        full, _ = policy_logprobs(learner, batch)
    sampler = batch.sampler_logprobs_B_T
    ratio = (truncated - sampler).exp()[mask]
    return {
        "ratio_err_mean": float((ratio - 1).abs().mean()), "ratio_err_max": float((ratio - 1).abs().max()),
        "untruncated_ratio_mean": float((full - sampler).exp()[mask].mean()),
    }  # fmt: skip


def _print_row(row: dict[str, Any]) -> None:
    decode = "  ".join(f"b{k.rsplit('_b', 1)[1]} {v:,.0f}" for k, v in row.items() if k.startswith("decode_tok_s_b"))
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    memory = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "-"
    print(f"{row['shape']:<11} {row['params_m']:,.1f}M params | decode tok/s {decode} | learner tok/s "
          f"{row['learner_tok_s']:,.0f}, MFU {mfu}, peak {memory} | sync {row['sync_s'] * 1e3:.0f} ms, identity "
          f"check {row['check_s'] * 1e3:.0f} ms (gap {row['check_gap']:.2g}) | step-0 |ratio-1| mean "
          f"{row['ratio_err_mean']:.2g} max {row['ratio_err_max']:.2g}; untruncated ratio mean "
          f"{row['untruncated_ratio_mean']:.3f}", flush=True)  # fmt: skip
