"""The Cluster section of the training report: drawn from the ``cluster/*`` figures a run on Ray logs with each
RL step (records built as :meth:`ClusterRollout.step_metrics` builds them, through ``RLStepLog`` and
``RunDir.log`` as the pipeline writes them), absent from a run without them."""

from __future__ import annotations

import base64
import io
import re
from collections import Counter

import pytest
from PIL import Image

from agentrl.cluster import metrics
from agentrl.data.trajectory import Trajectory, TurnSpan
from agentrl.learners.rl import RLStepLog
from agentrl.tracking import RunDir, read_metrics
from agentrl.train_report import write_train_report
from agentrl.train_report_cluster import (
    FAULT_COUNTERS,
    cluster_charts,
    cluster_phases,
    counter_total,
    fault_counts,
)

CHARTS = ["cluster_busy", "cluster_length_bias", "cluster_queues", "cluster_reward_bias", "cluster_staleness",
          "cluster_throughput"]  # fmt: skip


def ledger(version: int, reward: float, tokens: int) -> Trajectory:
    """A one-turn episode sampled by weights ``version`` with ``tokens`` sampled tokens."""
    ids = [1] + [2] * tokens
    return Trajectory(ids, [0.0] * len(ids), [0] + [1] * tokens, [TurnSpan(1, len(ids), reward)],
                      policy_version=version, meta={"turn_versions": [version]})  # fmt: skip


def cluster_figures(trained: list[Trajectory], sampled: list[Trajectory], version: int, counts: Counter[str],
                    router: dict[str, float]) -> dict[str, float]:  # fmt: skip
    """The step's ``cluster`` mapping, composed as ``ClusterRollout.step_metrics`` composes it."""
    return {
        **metrics.staleness_histogram(trained, version),
        **metrics.distribution("sampled", sampled), **metrics.distribution("trained", trained),
        "engine_busy": 0.9, "worker_busy": 0.6, "queue/episodes": 8.0, "queue/requests": 5.0,
        "queue/groups_ready": 1.0, "episodes_per_s": 4.0, "learner_idle": 0.25,
        **{name: float(n) for name, n in counts.items()},
        **{name: float(router.get(name, 0)) for name in ("engine_lost", "engine_timeout")},
    }  # fmt: skip


def step_log(step: int, cluster: dict[str, float]) -> dict:
    return RLStepLog(
        step=step, reward_mean=0.3, reward_std=0.1, reward_components={}, samples=8, trained_samples=8,
        dropped={}, stop_reasons={"terminated": 8}, response_tokens_mean=10.0, sampled_tokens=80, lr=1e-3,
        update={"loss": 0.1}, rollout_seconds=1.0, update_seconds=1.0, seconds=2.0, policy_version=step,
        cluster=cluster,
    ).as_dict()  # fmt: skip


def write_cluster_run(path, phase: str = "rl", steps: int = 6, resume: int = 0) -> None:
    """Steps 2+ train 6 fresh samples and 2 one version behind (reward 0.5, 20 tokens) out of sampled ones
    at reward 0.3 and 10 tokens; step 4 trains nothing; a worker dies at step 3 (its episode replayed), two
    requests time out from step 5; 8 episodes settle per step. ``resume``: a session resuming the phase from
    that step, its counters from 0 again (a new cluster)."""
    counts: Counter[str] = Counter()
    with RunDir(path, tensorboard=False) as run:
        run.write_config({"env": "toy", "model": "tiny", "learner": {"max_staleness": 1},
                          "cluster": {"env_workers": 2, "engines": 1, "admission": "pace"}})  # fmt: skip
        run.start_phase(phase, total=steps, step=resume)
        for step in range(resume + 1, steps + 1):
            version = step - 1
            behind = [] if step == 1 else [ledger(version - 1, 0.5, 20)] * 2
            trained = [] if step == 4 else [ledger(version, 0.5, 20)] * (8 - len(behind)) + behind
            counts["settled"] += 8
            if step == 3:
                counts.update(worker_lost=1, replayed=1)
            router = {"engine_timeout": 2} if step >= 5 else {}
            sampled = [ledger(version, 0.3, 10)] * 8
            run.log(phase, step, step_log(step, cluster_figures(trained, sampled, version, counts, router)))
        run.finish_phase(phase)


def embedded(page: str) -> dict[str, bytes]:
    """The page's images by alt text."""
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    return {alt: base64.b64decode(data) for data, alt in found}


def fault_rows(page: str) -> dict[str, list[str]]:
    table = page[page.index('<table class="faults">') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr><td><code>(\w+)</code></td>(.*?)</tr>", table)
    return {name: re.findall(r'<td class="num">([^<]*)</td>', cells) for name, cells in rows}


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster-run")
    write_cluster_run(path)
    return path, write_train_report(path).read_text()


def test_the_records_carry_the_figures_the_section_reads(cluster_report):
    path, _ = cluster_report
    last = read_metrics(path)[-1].metrics
    assert last["cluster/staleness/0"] == 6 and last["cluster/staleness/1"] == 2
    assert last["cluster/trained/reward"] == pytest.approx(0.5) and last["cluster/sampled/length"] == 10
    assert (
        last["cluster/worker_lost"] == 1
        and last["cluster/engine_timeout"] == 2
        and "cluster/lost" not in last
    )


def test_a_cluster_run_gets_its_section_with_every_plot(cluster_report):
    path, page = cluster_report
    assert page.index("<h2>Plots</h2>") < page.index("<h2>Cluster</h2>") < page.index("<h2>Config</h2>")
    section = page[page.index("<h2>Cluster</h2>") : page.index("<h2>Config</h2>")]
    assert "2 env workers; 1 engine; asynchronous, max_staleness 1, admission pace" in section
    images = embedded(section)
    assert sorted(images) == sorted(["Throughput and learner idle", "Engine and env-worker busy", "Queues",
                                     "Staleness of trained samples", "Reward: sampled vs trained",
                                     "Length: sampled vs trained"])  # fmt: skip
    assert sorted(p.stem for p in (path / "plots").glob("cluster_*.png")) == CHARTS
    for data in images.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size[0] > 400
            low, high = image.convert("L").getextrema()
            assert high - low > 100
    assert "Not plotted" not in section


def test_the_fault_table_shows_the_final_counts_and_that_infra_failures_are_no_zero_reward(cluster_report):
    page = cluster_report[1]
    rows = fault_rows(page)
    assert list(rows) == [name for name, _ in FAULT_COUNTERS]
    assert {name: values[0] for name, values in rows.items()} == {
        "worker_lost": "1", "engine_lost": "0", "engine_timeout": "2", "engine_unavailable": "0", "sandbox_lost": "0",
        "replayed": "1",
        "lost": "0", "dropped_groups": "0", "duplicates": "0", "settled": "48",
    }  # fmt: skip
    caption = re.search(r'<caption class="sub">(.*?)</caption>', page).group(1)
    assert "never enters a group as a reward of 0" in caption


def test_the_charts_read_shares_maxima_and_the_sampled_trained_gap(cluster_report):
    path, _ = cluster_report
    rows = cluster_phases(read_metrics(path))["rl"]
    charts = {c.name: c for c in cluster_charts(rows, max_staleness=1)}
    staleness = charts["cluster_staleness"]
    assert [s.label for s in staleness.left] == ["0 behind", "1 behind"] and staleness.bound == 1
    fresh, behind = staleness.left
    assert fresh.steps == [1, 2, 3, 5, 6]  # step 4 trained nothing: no share, and its max of 0 is no maximum
    assert fresh.values == pytest.approx([1.0, 0.75, 0.75, 0.75, 0.75])
    assert behind.values == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.25])
    assert staleness.right[0].steps == [1, 2, 3, 5, 6] and staleness.right[0].values == pytest.approx(
        [0, 1, 1, 1, 1]
    )
    sampled, trained = charts["cluster_reward_bias"].left
    assert (sampled.label, trained.label) == ("sampled", "trained")
    assert sampled.values == pytest.approx([0.3] * 6) and trained.values == pytest.approx([0.5] * 5)
    assert [s.values for s in charts["cluster_length_bias"].left] == [
        pytest.approx([10] * 6),
        pytest.approx([20] * 5),
    ]
    assert charts["cluster_throughput"].right[0].values == pytest.approx([0.25] * 6)


def test_a_run_without_a_cluster_shows_nothing_new(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "cluster_busy.png").write_bytes(b"left by an earlier report")
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("rl", total=3)
        for step in (1, 2, 3):
            run.log("rl", step, step_log(step, {}))  # a single-process run's cluster mapping is empty
    assert not any(k.startswith("cluster") for r in read_metrics(tmp_path) for k in r.metrics)
    page = write_train_report(tmp_path).read_text()
    assert "<h2>Plots</h2>" in page and "Cluster" not in page and "faults" not in page
    assert list((tmp_path / "plots").glob("cluster_*")) == []


def test_a_resumed_phase_adds_up_its_counters_and_phases_stand_apart(tmp_path):
    assert counter_total([0, 1, 3, 3]) == pytest.approx(3)
    assert counter_total([1, 3, 0, 2]) == pytest.approx(5)  # resumed after 3: counting from 0 again
    assert counter_total([]) == pytest.approx(0)
    write_cluster_run(tmp_path / "resumed", steps=4)
    write_cluster_run(tmp_path / "resumed", steps=6, resume=3)  # step 4 dropped, steps 4-6 count from 0
    settled = [r.metrics["cluster/settled"] for r in read_metrics(tmp_path / "resumed")]
    assert settled == [8, 16, 24, 8, 16, 24]
    counts = fault_rows(write_train_report(tmp_path / "resumed").read_text())
    assert (counts["settled"], counts["worker_lost"], counts["engine_timeout"]) == (["48"], ["1"], ["2"])
    write_cluster_run(tmp_path / "a", phase="rl", steps=3)
    write_cluster_run(tmp_path / "a", phase="rl2", steps=5)
    phases = cluster_phases(read_metrics(tmp_path / "a"))
    assert list(phases) == ["rl", "rl2"]
    assert fault_counts(phases["rl"])["settled"] == pytest.approx(24)
    assert fault_counts(phases["rl2"])["engine_timeout"] == pytest.approx(2)
    page = write_train_report(tmp_path / "a").read_text()
    assert {name: values for name, values in fault_rows(page).items()}["settled"] == ["24", "40"]
    assert "Staleness of trained samples (rl2)" in embedded(page)
    assert (tmp_path / "a" / "plots" / "cluster_staleness_rl.png").is_file()


def test_a_run_that_trained_nothing_says_why_its_staleness_is_not_plotted(tmp_path):
    with RunDir(tmp_path, tensorboard=False) as run:  # every group dropped (e.g. zero variance): none trained
        run.start_phase("rl", total=2)
        for step in (1, 2):
            sampled = [ledger(step - 1, 0.0, 10)] * 4
            run.log(
                "rl",
                step,
                step_log(step, cluster_figures([], sampled, step - 1, Counter(settled=4 * step), {})),
            )
    page = write_train_report(tmp_path).read_text()
    section = page[page.index("<h2>Cluster</h2>") :]
    assert (
        "<li>Staleness of trained samples: no cluster/staleness/&lt;k&gt; (no step trained a sample)</li>"
        in section
    )
    assert "Staleness of trained samples" not in embedded(
        section
    ) and "Reward: sampled vs trained" in embedded(section)
    assert not (tmp_path / "plots" / "cluster_staleness.png").exists()
    assert fault_rows(page)["settled"] == ["8"]
