"""What a new user meets in the first hour: precision that fails before any work where the CPU cannot do it,
warm-up defaults that fit a short run."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

import agentrl
from agentrl.errors import ConfigError
from agentrl.learners import optim
from agentrl.learners.dpo import DPOConfig
from agentrl.learners.grpo import GRPOConfig
from agentrl.learners.sft import SFTConfig, env_demonstrations, train_sft


# ---- bf16 where the CPU cannot run it --------------------------------------------------------------------
def test_bf16_on_a_cpu_without_its_kernels_fails_before_loading_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(optim, "cpu_bf16_error", lambda: "pack_vnni2 is only supported when avx512 is supported")
    loaded = []
    monkeypatch.setattr("agentrl.learners.policy_model.load_trainable", lambda config: loaded.append(config))
    with pytest.raises(ConfigError, match=r"bf16 does not run on this CPU .*pack_vnni2.*set precision='fp32'"):
        train_sft(SFTConfig(max_steps=2, warmup_steps=0, precision="bf16"), [])
    assert loaded == []
    optim.check_precision("fp32", "cpu")  # fp32 never asks


_PROBE = """
import torch
from agentrl.errors import ConfigError
from agentrl.learners import optim
print("capability", torch.backends.cpu.get_cpu_capability())
print("probe", optim.cpu_bf16_error())
try:
    optim.check_precision("bf16", "cpu")
    print("check passed")
except ConfigError as exc:
    print("check refused:", exc)
"""


def test_the_probe_sees_what_default_cpu_kernels_cannot_do():
    """Under ``ATEN_CPU_CAPABILITY=default`` (kernels without AVX-512, as on many AMD EPYC machines) x86 torch
    cannot run a bf16 attention step; the probe must say so and the check must refuse."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "probe None" in out.stdout:
        assert "check passed" in out.stdout
        pytest.skip(f"bf16 attention runs on this CPU even with default kernels: {out.stdout}")
    assert "check refused: bf16 does not run on this CPU" in out.stdout and "DEFAULT" in out.stdout, out.stdout


# ---- warm-up defaults on short runs ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "fields", "expected"),
    [(GRPOConfig, {"env": "x", "max_steps": 3}, 0), (SFTConfig, {"max_steps": 30}, 3),
     (SFTConfig, {"max_steps": 12}, 1), (DPOConfig, {"max_steps": 10}, 1), (SFTConfig, {"max_steps": 31}, 30)],
)  # fmt: skip
def test_a_default_warmup_too_long_for_a_short_run_shrinks_with_a_note(config, fields, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config(**fields).warmup_steps == expected
    notes = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    if expected == config.model_fields["warmup_steps"].default:
        assert notes == []
    else:
        assert notes and f"not fewer than max_steps {fields['max_steps']}" in notes[0]


def test_a_warmup_set_by_hand_is_never_changed():
    with pytest.raises(ConfigError, match=r"warmup_steps \(5\) must be fewer than max_steps \(3\)"):
        SFTConfig(max_steps=3, warmup_steps=5)
    assert SFTConfig(max_steps=3, warmup_steps=2).warmup_steps == 2


def test_a_three_step_sft_run_trains_with_the_default_warmup(one_thread):
    env = agentrl.make("math-v0", tools=["calculator"])
    try:
        demos = env_demonstrations(env, range(2))
    finally:
        env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_sft(SFTConfig(max_steps=3, batch_size=2), demos)
    assert len(result.history) == 3
