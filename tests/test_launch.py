"""`loom train` end to end on an embedded local Ray cluster: two workers, checkpoints, resume, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import tiny_overrides

LOOM = [sys.executable, "-m", "launch.cli", "train", "configs/train/demo.yaml"]
ROOT = Path(__file__).resolve().parent.parent


def loom_train(overrides: list[str], timeout: int = 240) -> str:
    done = subprocess.run(LOOM + overrides, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_train_on_ray_checkpoints_and_resumes(small_dataset, tmp_path):
    ov = tiny_overrides(small_dataset, tmp_path, name="ray") + [
        "train.max_steps=6", "train.run_steps=3", "checkpoint.every=3", "train.log_every=1"]
    first = loom_train(ov)
    assert "2 workers on CPU" in first and "(rank0" in first
    assert "trained steps 1–3 of 6" in first and "the same command resumes at step 3" in first
    second = loom_train(ov)
    assert "resumed from" in second and "step-0000003 (step 3/6)" in second
    assert "trained steps 4–6 of 6" in second
    run = tmp_path / "ray"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "tokens", "tokens_per_s", "mfu", "peak_mem_gb", "data_wait_frac"):
        assert key in records[0]
    assert records[0]["tokens"] > 0 and records[0]["mfu"] is None  # no MFU on CPU
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    assert all((run / "checkpoints" / c / "COMPLETE.json").is_file() for c in ckpts)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    third = loom_train(ov)
    assert "nothing to do: the run is complete (6/6 steps)" in third


def test_ctrl_c_stops_every_worker(small_dataset, tmp_path):
    ov = tiny_overrides(small_dataset, tmp_path, name="interrupt") + ["train.max_steps=100000", "train.run_steps=0",
                                                                      "checkpoint.every=100000"]  # (runs until stopped)
    # (Ctrl-C as a terminal sends it: with SIGINT at its default, whatever this test process inherited)
    proc = subprocess.Popen(LOOM + ov, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "interrupt" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.5)
    family = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in family if "TrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # leave no cluster behind for the tests after this one
        for p in [psutil.Process(proc.pid), *family]:
            if p.is_running():
                p.kill()
        raise
    assert proc.returncode == 130, out
    assert "loom: interrupted" in out
    time.sleep(2)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
