"""Unknown keys in a run config, at every level and from every layer (YAML file, ``--set``, an env's recipe):
each is named by its dotted path and where it was set, with the closest keys of its level and the class that
documents them; known keys still pass and a wrong value keeps its own message."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, ClassVar

import pytest

import agentrl
from agentrl._config_keys import closest_keys
from agentrl.errors import ConfigError
from agentrl.learners.grpo import GRPOConfig
from agentrl.pipeline.config import RunConfig, build_run_config, check_env_kwargs, resolve
from agentrl.testing import DigitsEnv

GRPO_DOCS = r"The keys under learner are the fields of agentrl\.learners\.grpo\.GRPOConfig"


def test_a_nested_typo_in_the_yaml_file_names_its_path_the_file_and_the_closest_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learner:\n  max_step: 40\n")
    with pytest.raises(ConfigError) as error:
        build_run_config("toy-digits", config)
    assert f"unknown key 'learner.max_step' (in {config}): did you mean 'learner.max_steps'?" in str(error.value)
    assert "agentrl.learners.grpo.GRPOConfig" in str(error.value)
    assert "`agentrl train --env toy-digits --dry-run` prints" in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.taks=3", r"unknown key 'eval\.taks' \(--set eval\.taks=3\): did you mean 'eval\.tasks'\? "
                        r"The keys under eval are the fields of agentrl\.pipeline\.config\.EvalSection"),
        ("learner.max_step=3", r"unknown key 'learner\.max_step' \(--set learner\.max_step=3\): "
                               rf"did you mean 'learner\.max_steps'\? {GRPO_DOCS}"),
        ("tracking.projet=x", r"'tracking\.projet' \(--set tracking\.projet=x\): did you mean 'tracking\.project'\?"),
        ("cluster.env_worker=2", r"did you mean 'cluster\.env_workers'\? .*agentrl\.cluster\.config\.ClusterConfig"),
        ("learner={max_stp: 3}", r"'learner\.max_stp' \(--set learner=\{max_stp: 3\}\): did you mean "
                                 r"'learner\.max_steps'\?"),
    ],
)  # fmt: skip
def test_a_nested_typo_set_on_the_command_line_names_the_override_and_the_closest_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config("toy-digits", overrides=[override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.learner.lr_rate=1e-3", r"unknown key 'sft\.learner\.lr_rate' \(--set sft\.learner\.lr_rate=1e-3\): "
                                     r"did you mean 'sft\.learner\.lr' or 'sft\.learner\.min_lr_ratio'\? "
                                     r"The keys under sft\.learner are the fields of agentrl\.learners\.sft\.SFTConfig"),
        ("learner.lora.rr=4", r"unknown key 'learner\.lora\.rr' .*did you mean 'learner\.lora\.r'\? The keys under "
                              r"learner\.lora are the fields of agentrl\.learners\.config\.LoRAConfig"),
        ("rl2.judge.modle=tiny", r"did you mean 'rl2\.judge\.model'\? .*agentrl\.judge\.config\.JudgeConfig"),
        ("rejection.sampling.temprature=1", r"did you mean 'rejection\.sampling\.temperature'\? .*RolloutConfig"),
    ],
)  # fmt: skip
def test_a_typo_two_levels_deep_gets_the_keys_of_its_own_level(override, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config("toy-digits", overrides=[override])


def test_every_unknown_key_is_named_at_once_each_with_where_it_was_set(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("algo: ppo\nlearner:\n  lora:\n    rank: 4\n  lam_bda: 0.9\n")
    with pytest.raises(ConfigError) as error:
        build_run_config("toy-digits", config, ["evl.tasks=3"])
    lines = str(error.value).splitlines()
    assert lines[0] == "3 unknown keys:"
    assert lines[1].startswith(f"  unknown key 'learner.lora.rank' (in {config}): did you mean 'learner.lora.r'?")
    assert lines[2].startswith(f"  unknown key 'learner.lam_bda' (in {config}): did you mean 'learner.lam'?")
    assert "agentrl.learners.ppo.PPOConfig" in lines[2]  # the algorithm's own config
    assert lines[3].startswith("  unknown key 'evl' (--set evl.tasks=3): did you mean 'eval'?")


def test_a_typo_in_an_envs_recipe_is_blamed_on_the_recipe():
    class Recipe(DigitsEnv):
        default_run: ClassVar[dict[str, Any]] = {"eval": {"tasks": 2, "pass_onn": "digits"}}

    agentrl.register("test-recipe-typo-v0", Recipe, override=True)
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.pass_onn' \(in the default_run recipe of "
                                          r"test-recipe-typo-v0\): did you mean 'eval\.pass_on'\?"):  # fmt: skip
        build_run_config("test-recipe-typo-v0")


def test_no_close_key_lists_the_keys_of_the_level():
    with pytest.raises(ConfigError) as error:
        build_run_config("toy-digits", overrides=["gold.zzz=1"])
    assert "unknown key 'gold.zzz' (--set gold.zzz=1): no key under gold is close. The keys under gold (every, " \
        "tasks, env_kwargs, metric, temperature, tolerance, patience) are the fields of " \
        "agentrl.pipeline.config.GoldSection" in str(error.value)


def test_valid_keys_at_every_level_still_pass(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learner:\n  max_steps: 40\n  lora:\n    r: 4\neval:\n  tasks: 3\n")
    sets = ["sft.demos=2", "sft.learner.lr=1e-3", "rl2.max_steps=8", "rl2.judge.model=tiny", "cluster.env_workers=3",
            "rejection.tasks=2", "rejection.sampling.temperature=0.7", "tracking.project=p", "env_kwargs={}"]  # fmt: skip
    run = build_run_config("toy-digits", config, sets)
    resolved = resolve(run, tmp_path / "run")
    assert (resolved.learner.max_steps, resolved.learner.lora.r, run.eval.tasks) == (40, 4, 3)
    assert resolved.sft.lr == pytest.approx(1e-3) and resolved.sampling.temperature == pytest.approx(0.7)
    assert (run.rl2.judge, run.cluster.env_workers, run.tracking.project) == ({"model": "tiny"}, 3, "p")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.tasks=abc", r"RunConfig\.eval\.tasks: got 'abc'; Input should be a valid integer.*"
                           r"\(tasks: held-out tasks played once each"),
        ("learner.max_steps=abc", r"learner: invalid GRPOConfig:\n  GRPOConfig\.max_steps: got 'abc'; Input should "
                                  r"be a valid integer.*\(max_steps: optimizer steps to take"),
        ("learner.lora.r=0", r"GRPOConfig\.lora\.r: got 0; Input should be greater than or equal to 1 \(r: adapter "
                             r"rank"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_keeps_its_own_message(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve(build_run_config("toy-digits", overrides=[override]))
    assert "unknown key" not in str(error.value)


def test_config_classes_built_in_python_say_the_same_at_any_depth():
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.taks': did you mean 'eval\.tasks'\?"):
        RunConfig(env="toy-digits", eval={"taks": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.rr': did you mean 'lora\.r'\? The keys under lora"):
        GRPOConfig(env="toy-digits", lora={"rr": 4})
    with pytest.raises(ConfigError, match=r"unknown key 'learner\.max_step': did you mean 'learner\.max_steps'\?"):
        resolve(RunConfig(env="toy-digits", learner={"max_step": 3}))  # a section left free-form until resolve


def test_env_kwargs_keys_are_the_envs_own_constructor_arguments():
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.env_kwargs\.hihg': did you mean 'eval\.env_kwargs\.high'"
                                          r"\? The keys under eval\.env_kwargs are the constructor arguments of toy-guess-v0 "
                                          r"\(see agentrl\.testing\.GuessEnv\)"):  # fmt: skip
        resolve(build_run_config("toy-guess", overrides=["eval.tasks=2", "eval.env_kwargs.hihg=3"]))
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(--env-arg\): no key of --env-arg is close\. The "
                                          r"keys of --env-arg \(high, max_turns, format_penalty\) are the"):  # fmt: skip
        check_env_kwargs("toy-guess", {"zzz": 3}, "--env-arg")
    check_env_kwargs("toy-guess", {"high": 3}, "env_kwargs")  # a known one passes


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("max_step", ["max_steps"]),  # the also-rans (max_seconds, max_staleness) are left out
        ("lr_rate", ["lr", "min_lr_ratio"]),  # a word of the key that is a key
        ("learning_rate", ["lr"]),  # another trainer's name for it
        ("num_generations", ["group_size"]),
        ("zzz", []),
    ],
)
def test_closest_keys(key, expected):
    assert closest_keys(key, list(GRPOConfig.model_fields)) == expected


def test_the_train_cli_dry_run_reports_a_nested_typo_and_runs_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "train", "--env", "toy-digits", "--dry-run",
         "--set", "learner.max_step=3", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and not (tmp_path / "run").exists()
    assert "agentrl: error: unknown key 'learner.max_step' (--set learner.max_step=3): did you mean " \
        "'learner.max_steps'?" in done.stderr, done.stderr


def test_the_offline_commands_name_an_unknown_set_field_the_same_way(tmp_path, capsys):
    from agentrl.cli import main

    code = main(["sft", "--env", "toy-digits", "--output-dir", str(tmp_path / "run"), "--dry-run",
                 "--set", "lora.rank=4"])  # fmt: skip
    assert code == 1 and not (tmp_path / "run").exists()
    assert "agentrl: error: unknown key 'lora.rank' (--set lora.rank=4): did you mean 'lora.r'? The keys under lora " \
        "are the fields of agentrl.learners.config.LoRAConfig" in capsys.readouterr().err


def test_a_judge_config_file_names_an_unknown_key_the_same_way(tmp_path):
    from agentrl.judge.config import load_judge_config

    path = tmp_path / "judge.yaml"
    path.write_text("model: tiny\nrubrik: be strict\n")
    with pytest.raises(ConfigError, match=r"invalid judge config: unknown key 'rubrik': did you mean 'rubric'\? The "
                                          r"keys at the top level are the fields of agentrl\.judge\.config\.JudgeConfig"):  # fmt: skip
        load_judge_config(path)
