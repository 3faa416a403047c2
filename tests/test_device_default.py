"""Where the learner trains when nothing says: the GPU and bf16 where torch sees a GPU that has it, else the
CPU in fp32; ``agentrl train`` says which at start-up and ``--dry-run`` shows it resolved. The GPU case runs
here with torch's CUDA queries answered as a GPU machine answers them (this machine has none); on a GPU
machine the same test runs unpatched in its first case."""

from __future__ import annotations

import pytest
import torch
import yaml

from agentrl.cli import main
from agentrl.learners.grpo import GRPOConfig
from agentrl.learners.sft import SFTConfig
from agentrl.pipeline.cli_train import device_line


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3")


def test_nothing_set_means_what_this_machine_offers():
    config = GRPOConfig(env="toy-digits-v0")
    expected = ("cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp32") if torch.cuda.is_available() else ("cpu", "fp32")
    assert (config.device, config.precision) == expected


def test_a_visible_gpu_is_taken_in_bf16_unless_told_otherwise(gpu):
    assert (GRPOConfig(env="toy-digits-v0").device, GRPOConfig(env="toy-digits-v0").precision) == ("cuda", "bf16")
    assert SFTConfig(device="cpu").precision == "fp32"  # the CPU keeps fp32
    assert GRPOConfig(env="toy-digits-v0", precision="fp32").device == "cuda"
    assert GRPOConfig(env="toy-digits-v0", device="cuda:1").precision == "bf16"
    assert "auto" not in GRPOConfig(env="toy-digits-v0").model_dump_json()


def test_train_says_where_it_trains(gpu, capsys):
    assert main(["train", "--env", "toy-digits-v0", "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["learner (resolved)"]["device"] == "cuda"
    assert resolved["learner (resolved)"]["precision"] == "bf16"
    line = device_line("cuda", "bf16")
    assert line.startswith("device: cuda (NVIDIA H100 80GB HBM3), precision bf16") and "learner.device=cpu" in line
    assert device_line("cpu", "fp32").startswith("device: cpu, precision fp32 (no GPU visible")
