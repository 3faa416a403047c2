"""``examples/code_sandbox_on_ray.py`` runs in its small configuration: code-sandbox trained through ``agentrl
train`` with two env workers (their sandboxes in their own processes) and an engine on a local Ray instance; the
run's report shows what the cluster did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.tracking import read_metrics
from agentrl.train_report import write_train_report

pytest.importorskip("ray")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "code_sandbox_on_ray.py"

pytestmark = pytest.mark.slow


def test_code_sandbox_trains_with_env_workers_on_ray(tmp_path):
    # TMPDIR stays: Ray keeps its sockets under it, and a socket path has at most 107 bytes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--small", "--output-dir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    steps = re.findall(r"(?m)^step +(\d+)  reward ([\d.]+)  staleness max (\d+) .* lost (\d+)$", proc.stdout)
    assert [int(s[0]) for s in steps] == [1, 2, 3], proc.stdout
    assert all(int(s[2]) <= 1 and int(s[3]) == 0 for s in steps)
    page = write_train_report(tmp_path / "run").read_text()
    cluster = page[page.index("<h2>Cluster</h2>") :]
    for title in ("Throughput and learner idle", "Engine and env-worker busy", "Queues"):
        assert f'alt="{title}"' in cluster
    settled = read_metrics(tmp_path / "run")[-1].metrics["cluster/settled"]
    assert settled >= 12  # 3 steps x 2 tasks x 2 samples, each settled once
    assert re.search(rf'<code>settled</code></td><td class="num">{settled:.0f}</td>', cluster)
    assert re.search(r'<code>lost</code></td><td class="num">0</td>', cluster)
