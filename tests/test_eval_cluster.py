"""``agentrl eval`` on a real local Ray instance (2 CPUs; every actor its own process): the episodes the env
workers play are the ones one process plays (same tasks, same seeds, same tokens), a killed env worker loses
no episode and records none twice, an episode that stays lost is reported missing (never a reward of 0) and
a rerun plays it, and ``--base-url`` policies are called from the workers."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_evaluation import eval_cli, results_of
from test_evaluation_runs import binary_search, chat_server, sample_table

import agentrl.bench.async_env  # noqa: F401  (registers bench-latency-v0 in this process; workers get `setup`)
from agentrl.evaluation.config import EvalConfig
from agentrl.evaluation.harness import evaluate
from agentrl.evaluation.metrics import PassRule

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "local_ray")]

DIGITS = ["--env", "toy-digits-v0", "--n", "4", "--k", "2", "--max-new-tokens", "12", "--pass-threshold", "0.02",
          "--quiet"]  # fmt: skip
LATENCY = {"env": "bench-latency-v0", "env_kwargs": {"turns": 2, "p50_s": 0.15, "p99_s": 0.6}, "n": 4, "k": 4,
           "max_new_tokens": 8, "pass_rule": PassRule("reward", 0.1)}  # fmt: skip
CLUSTER = {"env_workers": 2, "episodes_per_worker": 4, "setup": ["agentrl.bench.async_env"]}


def latency_config(out: Path, cluster: dict[str, Any] | None = None) -> EvalConfig:
    return EvalConfig(**LATENCY, cluster=cluster, out=out)


def saved(out: Path) -> list[dict[str, Any]]:
    """Every line of ``episodes.jsonl`` (a pair recorded twice would show twice)."""
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def keys(lines: list[dict[str, Any]]) -> Counter[tuple[int, int]]:
    return Counter((e["meta"]["task_index"], e["meta"]["sample_index"]) for e in lines)


def tokens(out: Path) -> dict[tuple[int, int], list[int]]:
    return {(e["meta"]["task_index"], e["meta"]["sample_index"]): e["token_ids"] for e in saved(out)}


def kill_when_saved(out: Path, lines: int) -> threading.Thread:
    """Kill env worker 0 of the running eval (Ray restarts it) once ``lines`` episodes are saved: the others are
    then in flight, some of them on that worker."""

    def kill() -> None:
        deadline = time.monotonic() + 120
        episodes = out / "episodes.jsonl"
        while time.monotonic() < deadline:
            if episodes.exists() and episodes.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.01)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        [name] = [n for n in names if n.startswith("agentrl-eval-") and n.endswith("env-worker-0")]
        ray.kill(ray.get_actor(name), no_restart=False)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def latency_reference(tmp_path_factory) -> Path:
    """The latency env's 4 x 4 episodes played in one process."""
    out = tmp_path_factory.mktemp("latency-one-process")
    evaluate(latency_config(out), echo=lambda _: None, show_progress=False)
    return out


# ---- the same episodes as one process ----------------------------------------------------------------------
def test_the_cli_on_two_env_workers_plays_what_one_process_plays(tmp_path):
    code, _, stderr = eval_cli(*DIGITS, "--out", str(tmp_path / "one"))
    assert code == 0, stderr
    code, stdout, stderr = eval_cli(*DIGITS, "--out", str(tmp_path / "ray"), "--env-workers", "2",
                                    "--episodes-per-worker", "2", "--cluster", "episode_retries=1")  # fmt: skip
    assert code == 0, stderr
    assert "pass@1" in stdout
    one, on_ray = results_of(tmp_path / "one"), results_of(tmp_path / "ray")
    # Sampled at temperature 1 with per-request seeds: the same tokens, whichever worker and engine batch played.
    assert sample_table(on_ray) == sample_table(one)
    assert on_ray["metrics"]["pass_at_k"]["1"]["value"] == pytest.approx(
        one["metrics"]["pass_at_k"]["1"]["value"]
    )
    assert tokens(tmp_path / "ray") == tokens(tmp_path / "one")
    assert keys(saved(tmp_path / "ray")) == Counter({(i, s): 1 for i in range(4) for s in range(2)})
    assert {e["policy_version"] for e in saved(tmp_path / "ray")} == {0}  # the checkpoint, as in one process
    config = json.loads((tmp_path / "ray" / "run.json").read_text())["config"]
    assert config["cluster"]["env_workers"] == 2 and config["cluster"]["episode_retries"] == 1


def test_cluster_flags_become_the_cluster_section_and_bad_ones_name_the_key():
    import argparse

    from agentrl.errors import ConfigError
    from agentrl.evaluation.cli import _config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--env", "toy-digits-v0", "--engines", "2", "--ray-address", "auto",
                              "--cluster-setup", "agentrl.bench.async_env", "--cluster", "engine_gpus=1"])  # fmt: skip
    cluster = _config(args).cluster
    assert (cluster.env_workers, cluster.engines, cluster.address, cluster.setup, cluster.engine_gpus) == (
        2, 2, "auto", ["agentrl.bench.async_env"], pytest.approx(1.0),
    )  # fmt: skip
    assert _config(parser.parse_args(["--env", "toy-digits-v0"])).cluster is None
    with pytest.raises(ConfigError, match="did you mean 'env_workers'"):
        _config(parser.parse_args(["--env", "toy-digits-v0", "--cluster", "env_worker=3"]))
    with pytest.raises(ConfigError, match="--cluster-setup no_such_module"):
        _config(parser.parse_args(["--env", "toy-digits-v0", "--cluster-setup", "no_such_module"]))


# ---- faults --------------------------------------------------------------------------------------------------
def test_a_killed_env_worker_loses_no_episode_and_records_none_twice(tmp_path, latency_reference):
    out, said = tmp_path / "killed", []
    killer = kill_when_saved(out, 2)
    outcome = evaluate(latency_config(out, CLUSTER), echo=said.append, show_progress=False)
    killer.join()
    lines = saved(out)
    counted = outcome.results["timing"]["cluster"]  # in results.json, not only said
    assert counted["settled"] == 16 and counted["replayed"] >= 1 and counted["worker_lost"] >= 1, counted
    assert results_of(out)["timing"]["cluster"] == counted
    assert keys(lines) == Counter({(i, s): 1 for i in range(4) for s in range(4)})
    assert any(e["meta"].get("replays") for e in lines)  # some were in flight on the killed worker
    assert any("worker_lost" in line and "replayed" in line for line in said), said
    # A replayed episode is the episode one process plays: same seeds, same tokens, same score.
    assert tokens(out) == tokens(latency_reference)
    assert sample_table(results_of(out)) == sample_table(results_of(latency_reference))


def test_an_episode_that_stays_lost_is_missing_not_failed_and_a_rerun_plays_it(tmp_path, latency_reference):
    out, said = tmp_path / "lost", []
    killer = kill_when_saved(out, 2)
    outcome = evaluate(latency_config(out, {**CLUSTER, "episode_retries": 0}), echo=said.append,
                       show_progress=False)  # fmt: skip
    killer.join()
    lost = 16 - len(saved(out))
    assert lost >= 1 and keys(saved(out)) == Counter(dict.fromkeys(keys(saved(out)), 1))
    assert any(f"{lost} of 16 episodes were lost to the cluster" in line for line in said), said
    # Scored over the episodes played, the lost ones listed nowhere (never as failed attempts with reward 0).
    assert outcome.results["metrics"]["episodes"] == 16 - lost
    assert outcome.results["timing"]["cluster"]["lost"] == lost
    assert sum(len(t["samples"]) for t in outcome.results["tasks"]) == 16 - lost
    assert f"{lost} planned episodes are missing" in (out / "report.html").read_text()
    # The same directory, resumed in one process: only the lost ones are played, and the run is complete.
    again = evaluate(latency_config(out), echo=lambda _: None, show_progress=False)
    assert again.played == lost and again.resumed == 16 - lost
    assert tokens(out) == tokens(latency_reference)


# ---- an OpenAI-compatible endpoint ---------------------------------------------------------------------------
def test_env_workers_call_an_openai_compatible_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTRL_TEST_KEY", "sk-loopback")
    args = ["--env", "toy-guess", "--model", "searcher", "--api-key-env", "AGENTRL_TEST_KEY", "--n", "3", "--k",
            "2", "--pass-on", "solved", "--quiet", "--env-workers", "2"]  # fmt: skip
    with chat_server(binary_search) as (url, seen):
        code, _, stderr = eval_cli(*args, "--base-url", url, "--out", str(tmp_path / "served"))
    assert code == 0, stderr
    assert seen and {r["auth"] for r in seen} == {"Bearer sk-loopback"}  # the key reached the workers
    results = results_of(tmp_path / "served")
    assert results["metrics"]["pass_at_k"]["1"]["value"] == pytest.approx(1.0)
    assert keys(saved(tmp_path / "served")) == Counter({(i, s): 1 for i in range(3) for s in range(2)})
    assert len(seen) == sum(
        s["turns"] for t in results["tasks"] for s in t["samples"]
    )  # one request per turn


# ---- without a cluster -----------------------------------------------------------------------------------------
def test_an_eval_without_cluster_flags_imports_no_ray_and_no_cluster_module(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from agentrl.cli import main; "
            f"main(['eval', *{DIGITS!r}, '--n', '1', '--k', '1', '--out', {str(tmp_path)!r}]); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('agentrl.cluster')))")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "run.json").read_text())["config"]["cluster"] is None
