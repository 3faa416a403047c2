"""Checkpoints are Hub-ready folders: ``from_pretrained`` loads model, tokenizer and generation config from them
as they are, and their generated ``README.md`` is a model card the Hub's own parser reads (recipe, env,
metrics, agentrl version). No hub is reachable here, so the upload itself is not run."""

from __future__ import annotations

import json

import pytest

import agentrl
from agentrl.learners import checkpoints
from agentrl.models.card import write_model_card
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.tracking import RunDir

RUN_CONFIG = {"env": "toy-echo", "env_kwargs": {"length": 3}, "model": "Qwen/Qwen2.5-0.5B-Instruct", "algo": "grpo"}
LEARNER = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "lr": 1e-4, "max_steps": 2, "group_size": 8, "env": "toy-echo"}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny"), load_tokenizer("tiny")


def _run_checkpoint(tmp_path, tiny):
    with RunDir(tmp_path / "run", tensorboard=False) as run:
        run.write_config(RUN_CONFIG)
        run.start_phase("rl", total=2)
        run.log("rl", 1, {"reward_mean": 0.25, "loss": 0.5})
        run.log("rl", 2, {"reward_mean": 0.75, "loss": 0.125})
    model, tokenizer = tiny
    path = checkpoints.step_dir(run.checkpoint_dir("rl"), 2)
    return checkpoints.save_checkpoint(path, model, tokenizer, step=2, meta={"config": LEARNER, "learner": "grpo"})


def test_a_checkpoint_loads_with_from_pretrained_as_it_is(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = _run_checkpoint(tmp_path, tiny)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "README.md"} <= names
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == tiny[0].config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == tiny[1].chat_template  # the template it trained with travels with it
    assert GenerationConfig.from_pretrained(path).eos_token_id == tiny[0].generation_config.eos_token_id


def test_the_card_holds_hub_metadata_recipe_env_metrics_and_version(tmp_path, tiny):
    from huggingface_hub import ModelCard

    path = _run_checkpoint(tmp_path, tiny)
    card = ModelCard.load(path / "README.md")  # the Hub's own parser
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert {"agentrl", "grpo", "env:toy-echo"} <= set(card.data.tags)
    text = card.text
    assert f"agentrl {agentrl.__version__} (grpo, step 2, on the `toy-echo` environment)" in text
    assert '- environment: `toy-echo` with `{"length": 3}`' in text and "lr `0.0001`" in text
    assert "| reward_mean | 0.75 |" in text and "| reward_mean | 0.25 |" not in text  # the saved step's metrics
    assert "algo: grpo" in text  # the run's whole config.yaml


def test_evaluation_results_are_added_and_kept(tmp_path, tiny):
    from huggingface_hub import ModelCard

    path = _run_checkpoint(tmp_path, tiny)
    write_model_card(path, {"held-out pass@1": 0.5, "held-out tasks": 20})
    write_model_card(path)  # a later rewrite keeps them
    text = ModelCard.load(path / "README.md").text
    assert "## Evaluation" in text and "| held-out pass@1 | 0.5 |" in text and "| held-out tasks | 20 |" in text
    assert json.loads((path / "eval_results.json").read_text()) == {"held-out pass@1": 0.5, "held-out tasks": 20}


def test_a_checkpoint_outside_a_run_directory_gets_a_card_too(tmp_path, tiny):
    from huggingface_hub import ModelCard

    model, tokenizer = tiny
    path = checkpoints.save_checkpoint(tmp_path / "my-model", model, tokenizer, step=3,
                                       meta={"config": {"model": "tiny", "lr": 0.002}, "learner": "sft"})  # fmt: skip
    card = ModelCard.load(path / "README.md")
    assert card.data.base_model is None  # 'tiny' is built locally, no Hub model
    assert card.text.startswith("\n# my-model\n") or "# my-model" in card.text.splitlines()[:3]
    assert "sft, step 3" in card.text and ".tmp-" not in card.text
