"""A Ray cluster of two nodes on loopback (`ray start` twice), a 4-worker job submitted across them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.process_group import free_port
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # else Ray refuses a second node on one host
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    port, dashboard = free_port(), free_port()
    env = ray_env()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true", '--resources={"node_a": 1}', *common],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *common],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def loom(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=ray_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_submit_across_two_nodes(two_node_cluster, small_dataset, tmp_path):
    ov = tiny_overrides(small_dataset, tmp_path, name="multinode") + [
        "cluster.workers=4", "cluster.nodes=2", "parallel.sp.degree=2", "train.max_steps=6", "checkpoint.every=3",
        "train.log_every=1", "cluster.env={GLOO_SOCKET_IFNAME: lo}"]
    done = loom("submit", "configs/train/demo.yaml", "--address", two_node_cluster, *ov)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    job = re.search(r"submitted (\S+)", out).group(1)
    placement = re.search(r"placement: (.*)", out).group(1)
    nodes = [sorted(map(int, re.findall(r"\d+", ranks))) for ranks in re.findall(r"ranks \[([^\]]*)\]", placement)]
    assert sorted(nodes) == [[0, 1], [2, 3]]  # two nodes, each holding one whole SP group
    assert "trained steps 1–6 of 6" in out
    run = tmp_path / "multinode"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    status = loom("status", job, "--address", two_node_cluster)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = loom("logs", job, "--address", two_node_cluster)
    assert "step     6/6" in logs.stdout
    stop = loom("stop", job, "--address", two_node_cluster)
    assert stop.returncode == 0 and "not running" in stop.stdout


def test_address_must_be_the_dashboard(small_dataset, tmp_path):
    done = loom("submit", "configs/train/demo.yaml", "--address", "ray://127.0.0.1:10001",
                *tiny_overrides(small_dataset, tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("loom: error: --address ray://127.0.0.1:10001: give the cluster's dashboard")


@pytest.mark.slow
def test_embedded_mode_starts_its_own_cluster_beside_a_running_one(two_node_cluster, small_dataset, tmp_path):
    """With `ray start` clusters on this machine, an empty cluster.address still means a private one."""
    done = loom("train", "configs/train/demo.yaml", *tiny_overrides(small_dataset, tmp_path, name="beside"),
                "train.max_steps=2", "checkpoint.every=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ray: local cluster, 2 workers on CPU" in done.stdout and "trained steps 1–2 of 2" in done.stdout
