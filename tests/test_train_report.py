"""The training report: plots from a run directory's log, valid PNGs, headline numbers, skipped plots named,
every piece of run text escaped."""

from __future__ import annotations

import base64
import io
import math
import re

import pytest
from PIL import Image

from agentrl.tracking import MetricRecord, RunDir, read_metrics
from agentrl.train_report import charts_for, write_train_report


def _rl_metrics(step: int, components: dict[str, float] | None = None) -> dict:
    """What ``RLStepLog.as_dict()`` holds, plus a pass rate and the reward-hacking monitors."""
    reward = 0.2 + step / 50
    return {
        "step": step, "reward_mean": reward, "reward_std": 0.3, "pass_rate": reward / 2,
        "reward_components": components or {"correct": reward - 0.1, "format": 0.1},
        "samples": 16, "trained_samples": 16, "dropped": {"failed": 0, "overlong": 0, "zero_variance": 2},
        "stop_reasons": {"terminated": 15, "max_turns": 1}, "response_tokens_mean": 30.0 + step,
        "sampled_tokens": 16 * (30 + step), "lr": 1e-5,
        "update": {"loss": 0.01, "kl": 0.001 * step, "clip_fraction": 0.0, "ratio": 1.0, "entropy": 2.0 - step / 100},
        "rollout_seconds": 1.0, "update_seconds": 0.5, "seconds": 1.5, "policy_version": step,
        "monitor": {"reward_length_corr": 0.1, "repeated_ngram_rate": 0.02, "error": 0.0, "truncated": 0.06},
    }  # fmt: skip


def _full_run(path, components=None, config=None) -> None:
    with RunDir(path, tensorboard=False) as run:
        run.write_config(config or {"env": "toy-digits-v0", "model": "tiny", "rl": {"lr": 1e-5}})
        run.start_phase("sft", total=12)
        for step in range(1, 13):
            run.log("sft", step, {"loss": 3.0 / step, "lr": 1e-4, "tokens": 500, "seconds": 0.1})
        run.finish_phase("sft")
        run.start_phase("eval-sft")
        run.log("eval-sft", 12, {"pass@1": 0.25, "pass@1/ci_low": 0.1, "pass@1/ci_high": 0.4, "pass@4": 0.5})
        run.finish_phase("eval-sft")
        run.start_phase("rl", total=45)
        for step in range(1, 46):
            run.log("rl", step, _rl_metrics(step, components))
        run.finish_phase("rl")
        run.start_phase("eval-rl")
        run.log("eval-rl", 45, {"pass@1": 0.4, "pass@4": 0.7, "reward_mean": 0.6})
        run.finish_phase("eval-rl")


def _embedded_pngs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A run with SFT, RL and two evaluations, and its report (drawn once for the tests that read it)."""
    path = tmp_path_factory.mktemp("run")
    _full_run(path)
    return path, write_train_report(path)


def test_report_draws_every_plot_the_log_has_as_valid_pngs(full_report):
    tmp_path, report = full_report
    assert report == tmp_path / "report.html"
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    expected = ["entropy", "eval", "kl", "loss", "monitors", "pass_rate", "response_length", "reward"]
    assert pngs == sorted(f"{name}.png" for name in [*expected, "reward_components"])
    for png in (tmp_path / "plots").iterdir():
        with Image.open(png) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 250
            low, high = image.convert("L").getextrema()
            assert high - low > 100  # something was drawn on it
    page = report.read_text()
    embedded = _embedded_pngs(page)
    assert len(embedded) == len(pngs)  # the page stands alone
    assert {Image.open(io.BytesIO(data)).format for data in embedded} == {"PNG"}
    assert "Not plotted" not in page and "<script" not in page


def test_report_headlines_evaluations_phases_and_config(full_report):
    page = full_report[1].read_text()
    text = re.sub(r"<[^>]+>", " ", page)
    assert "agentrl train: toy-digits-v0 · tiny" in text
    assert re.search(r"pass@1 after sft\s+0\.250\s+\[0\.1, 0\.4\], step 12", text)
    assert re.search(r"pass@1 after rl\s+0\.400\s+eval-rl, step 45 · \+0\.150 vs after sft", text)
    mean_last_10 = sum(0.2 + s / 50 for s in range(36, 46)) / 10
    assert re.search(rf"reward, rl\s+{mean_last_10:.3f}\s+mean of its last 10 steps", text)
    assert re.search(r"\brl\s+finished\s+45/45\s+\S+s\s+pass_rate 0\.55, reward_mean 1\.1", text)
    assert re.search(
        r"after sft\s+12\s+0\.25 \[0\.1, 0\.4\]\s+0\.5\s+–", text
    )  # no reward_mean logged: a dash
    assert re.search(r"rl\.lr\s+1e-05", text)


def test_report_skips_plots_without_data_and_says_so(tmp_path):
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase("sft", total=100)
        for step in range(1, 4):
            run.log("sft", step, {"loss": 2.0 / step, "lr": math.nan})
    # killed mid-phase: no finish, no config; a KL plot left by an earlier report is stale
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "kl.png").write_bytes(b"old")
    page = write_train_report(tmp_path).read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]
    assert len(_embedded_pngs(page)) == 1
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Not plotted (no data in the log)" in text
    assert "KL to the reference: no kl or update/kl" in text and "Evaluations: pass@1: no pass@k" in text
    assert re.search(r"sft\s+running\s+3/100", text)
    assert "Evaluations</h2>" not in page and "Config</h2>" not in page
    assert f"agentrl train: {tmp_path.name}" in text


def test_an_empty_run_directory_still_gets_a_page(tmp_path):
    page = write_train_report(tmp_path).read_text()
    assert "No metrics logged yet." in page and _embedded_pngs(page) == []


def test_hostile_strings_are_escaped_everywhere(tmp_path):
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    components = {hostile: 0.5, "$\\frac{a}{$": 0.1, "_hidden": 0.2}
    config = {"env": hostile, "model": "m&m\x1b[31m", hostile: {"k": hostile}}
    _full_run(tmp_path, components=components, config=config)
    page = write_train_report(tmp_path).read_text()
    assert "<script" not in page.lower()
    assert all(tag.startswith('<img src="data:image/png;base64,') for tag in re.findall(r"<img[^>]*>", page))
    assert "<title>agentrl train: &lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x" in page
    assert (
        "<th>&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;.k</th>" in page
    )
    assert "\x1b" not in page  # a control character is shown, never sent
    assert "· m&amp;m\\x1b[31m</title>" in page and "<code>&quot;m&amp;m\\u001b[31m&quot;</code>" in page
    assert (tmp_path / "plots" / "reward_components.png").stat().st_size > 1000  # math-looking names drew
    labels = {
        s.label for s in {c.name: c for c in charts_for(read_metrics(tmp_path))}["reward_components"].series
    }
    assert labels == {hostile.rsplit("/", 1)[-1], "$\\frac{a}{$", "_hidden"}


@pytest.mark.parametrize("phase", ["eval", "eval-base"])
def test_an_evaluation_of_no_training_phase_keeps_its_own_label(tmp_path, phase):
    with RunDir(tmp_path, tensorboard=False) as run:
        run.start_phase(phase)
        run.log(phase, 0, {"pass_at_k": {"1": {"value": 0.125}}})  # the eval harness's nested form
    text = re.sub(r"<[^>]+>", " ", write_train_report(tmp_path).read_text())
    label = "eval" if phase == "eval" else "base"
    assert re.search(rf"pass@1 {label}\s+0\.125", text)


def test_a_kl_that_was_never_measured_is_said_so_not_drawn_flat():
    records = [MetricRecord("rl", step, 0.0, 0.0, {"reward_mean": 0.1 * step, "update/kl": 0.0}) for step in (1, 2, 3)]
    kl = next(c for c in charts_for(records) if c.name == "kl")
    assert kl.series == [] and "not measured when beta = 0" in kl.missing
    records.append(MetricRecord("rl", 4, 0.0, 0.0, {"reward_mean": 0.4, "update/kl": 0.002}))
    assert next(c for c in charts_for(records) if c.name == "kl").series
