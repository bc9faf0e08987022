"""How long `loom plan` takes on a large problem: 512 GPUs (64 nodes × 8) and a 4,096-bucket length
histogram (a long-tailed corpus up to 1M tokens, context 512K). Prints one JSON line.

    python benchmarks/plan_speed.py
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.plan import run_plan  # noqa: E402


def histogram_file(folder: Path, buckets: int = 4096) -> Path:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(3000), 1.8, 2_000_000), 16, 2**20)
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, 2 * buckets)))
    edges = edges[np.linspace(0, edges.size - 1, buckets + 1).round().astype(int)]  # exactly `buckets`
    edges[-1] += 1
    which = np.searchsorted(edges, lengths, side="right") - 1
    rows = []
    for b in range(len(edges) - 1):
        inside = lengths[which == b]
        rows.append({"min": float(edges[b]), "max": float(edges[b + 1]), "documents": int(inside.size),
                     "tokens": float(inside.sum())})
    path = folder / "stats.json"
    path.write_text(json.dumps({"buckets": rows}))
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stats = histogram_file(Path(tmp))
        n_buckets = len(json.loads(stats.read_text())["buckets"])
        cfg = load_config(ROOT / "configs" / "train" / "llama-8b-long.yaml",
                          ["cluster.nodes=64", "cluster.workers=512", "data.context_len=524288",
                           "data.tokens_per_microbatch=524288", "train.global_microbatches=256"])
        t0 = time.perf_counter()
        winner = run_plan(cfg, str(stats), str(Path(tmp) / "plan"), top=5)
        seconds = time.perf_counter() - t0
    print(json.dumps({"benchmark": "loom plan", "gpus": 512, "histogram_buckets": n_buckets, "seconds": seconds,
                      "plan": winner.layout, "predicted_step_s": winner.step_s,
                      "machine": "this CI machine (2 CPU cores)", "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    main()
