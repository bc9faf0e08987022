"""Step metrics: memory, the run's metrics.jsonl, TensorBoard, console lines and the loss plot.

metrics.jsonl holds one JSON object per step (`step`, `loss`, `tokens`, `tokens_per_s`, `fill` —
tokens over the step's token budget —, `mfu`, `peak_mem_gb`, `data_wait_frac`, `lr`, `grad_norm`,
`step_time_s`, `skipped`, …). On resume the lines after
the resumed step are dropped, so the file always describes one consistent history; a line cut
short by a crash is repaired away, and a run that starts over keeps the old file beside it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class MetricsWriter:
    """Rank 0's record of the run: metrics.jsonl, TensorBoard events, console lines."""

    def __init__(self, run_path: Path, resumed_step: int, total_steps: int, log_every: int):
        self.path = run_path / "metrics.jsonl"
        self.total_steps = total_steps
        self.log_every = log_every
        if self.path.exists():
            records = _records(self.path.read_text())
            if records and resumed_step == 0:  # a run started over: the earlier history is kept beside
                self.path.rename(self.path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            else:
                kept = [json.dumps(r) for r in records if r["step"] <= resumed_step]
                self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_path / "tb"), purge_step=resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            print(format_line(record, self.total_steps), flush=True)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def format_line(r: dict[str, Any], total_steps: int) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    line = (f"step {r['step']:>5}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad {r['grad_norm']:.2f} | {r['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
            f"mem {r['peak_mem_gb']:.2f} GB | fill {100 * r['fill']:.0f}% | "
            f"data wait {100 * r['data_wait_frac']:.1f}%")
    if "sp_groups" in r:
        line += (f" | groups {r['sp_groups']} | predicted {r['predicted_s']:.3f} s vs {r['step_time_s']:.3f} s"
                 f" | solve {1e3 * r['solve_s']:.0f} ms")
    return line


def _records(text: str) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl; a line cut short by a crash mid-write is left out."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_metrics(run_path: Path) -> list[dict[str, Any]]:
    path = Path(run_path) / "metrics.jsonl"
    return _records(path.read_text()) if path.exists() else []


def plot_loss(run_path: Path) -> Path | None:
    records = read_metrics(run_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in records], lw=1, alpha=0.5, label="loss")
    k = max(1, len(records) // 50)
    smooth = [sum(r["loss"] for r in records[max(0, i - k): i + 1]) / len(records[max(0, i - k): i + 1])
              for i in range(len(records))]
    ax.plot(steps, smooth, lw=2, label=f"mean of {k + 1} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{Path(run_path).name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_path) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def log0(*args: Any) -> None:
    """Prints from rank 0 only."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True, file=sys.stdout)
