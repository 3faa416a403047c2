"""vLLM on a CPU without AVX2/AVX-512: ``torch.compile`` is turned off (vLLM's sampler would otherwise build C++
kernels with inductor even under ``enforce_eager``), decided from torch's view of the CPU.

The end-to-end test runs one tiny generation in a subprocess under ``ATEN_CPU_CAPABILITY=default`` with no C++
compiler (``CXX`` names a missing program) and an empty inductor cache: it passes only if nothing compiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from _vllm_server import require_vllm

from agentrl.rollout._vllm_cpu import compile_blocker, vllm_cpu_env


@pytest.mark.parametrize(
    ("capability", "machine", "variable", "blocked"),
    [
        ("AVX512", "x86_64", "", False),
        ("AVX2", "x86_64", "", False),
        ("DEFAULT", "x86_64", "", True),  # an x86 CPU without AVX2
        ("DEFAULT", "x86_64", "default", True),
        ("AVX512", "x86_64", "DEFAULT", True),  # the variable wins over what torch reports
        ("DEFAULT", "aarch64", "", False),  # NEON machines report DEFAULT and vectorize fine
        ("SVE256", "aarch64", "default", True),
        ("AVX512", "x86_64", "avx2", False),
    ],
)
def test_compile_blocker(capability, machine, variable, blocked):
    reason = compile_blocker(capability, machine, variable)
    assert (reason is not None) == blocked
    if blocked:
        assert "ATEN_CPU_CAPABILITY=default" in reason if variable else capability in reason


def test_server_environment_follows_the_variable(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert vllm_cpu_env() == {"TORCH_COMPILE_DISABLE": "1"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    expected = {} if compile_blocker() is None else {"TORCH_COMPILE_DISABLE": "1"}
    assert vllm_cpu_env() == expected


GENERATE = textwrap.dedent("""
    import asyncio
    import torch
    from agentrl.rollout.policy import SamplingParams
    from agentrl.rollout.vllm import VLLMPolicy

    async def main(policy):
        try:
            greedy = await policy.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
            sampled = await policy.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=1.0, seed=0))
            return greedy, sampled
        finally:
            await policy.aclose()

    if __name__ == "__main__":
        greedy, sampled = asyncio.run(main(VLLMPolicy("tiny", max_batch=4, kv_cache_gib=0.25)))
        print("generated", min(len(greedy.token_ids), len(sampled.token_ids)) > 0, torch._dynamo.config.disable)
""")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_generates_on_a_cpu_without_vector_instructions(tmp_path):
    require_vllm()
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "default",
        "CXX": str(tmp_path / "no-such-compiler"),  # any C++ build fails
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # no kernel built earlier can be reused
        "OMP_NUM_THREADS": "1",
    }
    env.pop("TORCH_COMPILE_DISABLE", None)
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "generated True False" in done.stdout  # and the caller's thread may compile again
    assert "torch.compile is off for vLLM: ATEN_CPU_CAPABILITY=default" in done.stderr
