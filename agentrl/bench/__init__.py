"""Benchmarks run as ``agentrl bench <name>``: each measures a baseline side by side and prints ratios.

A bench module provides ``add_arguments(parser)`` and ``main(args) -> int``, and is listed in
:data:`BENCHES`; it imports heavy modules inside ``main`` only, so ``agentrl --help`` stays fast.
"""

from __future__ import annotations

BENCHES: dict[str, tuple[str, str]] = {
    "sandbox": ("agentrl.bench.sandbox", "sandbox backends vs a plain subprocess runner: latency and programs/s"),
    "rollout": ("agentrl.bench.rollout", "runner overhead (turns/s) and hf vs vllm generation tokens/s"),
    "learner": ("agentrl.bench.learner",
                "our GRPO or DPO (--algo) vs TRL's GRPOTrainer / DPOTrainer: CPU-s/step, tokens/s, peak RSS"),
    "gpu": ("agentrl.bench.gpu",
            "Qwen3-0.6B/1.7B-shaped models: decode and learner tokens/s, MFU, memory, weight sync, ratio at step 0"),
    "async": ("agentrl.bench.async_bench",
              "GRPO with long-tailed tool latency: one process vs Ray sync vs Ray async (pace, drop): episodes/s"),
}
"""name -> (module, one-line help)."""
