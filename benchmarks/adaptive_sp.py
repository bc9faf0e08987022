"""Adaptive vs static sequence parallelism under the cost model: predicted step time and solve time.

For each length distribution and GPU count, draws steps of sequences (documents longer than the
context are split at it), plans them with the greedy alone, with greedy + MILP (time-capped) and
with every static SP degree that fits, and prints one JSON line: the best static degree and its
time, greedy and adaptive times, speed-up over the best static degree, solve times and the gap to
the lower bound. Model: configs/model/llama-8b.yaml; hardware: the H200 preset (8 GPUs a node).

    python benchmarks/adaptive_sp.py --out benchmarks/results/adaptive_sp_costmodel.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parallel.planner.adaptive import AdaptivePlanner  # noqa: E402
from parallel.planner.cost_model import CostModel  # noqa: E402
from parallel.planner.hardware import named_profile  # noqa: E402
from trainer.config import load_config  # noqa: E402


def distributions(context: int, stdlib: Path) -> dict[str, np.ndarray]:
    out = {}
    wiki = ROOT.parent / "shared" / "data" / "flexsp_wikipedia_lengths.txt.gz"
    if wiki.exists():
        out["wikipedia (FlexSP)"] = np.array(gzip.open(wiki).read().split(), dtype=np.int64)
    if (stdlib / "index.json").exists():
        from trainer.stats import read_lengths

        out["python stdlib (loom prepare)"] = read_lengths(stdlib)
    rng = np.random.default_rng(0)
    out["heavy tail (p99 ≥ 64K)"] = np.clip(rng.lognormal(np.log(3000), 1.9, 200_000), 16, 10**6).astype(np.int64)
    for name, lengths in out.items():  # documents longer than the context are split at it
        full, rest = np.divmod(lengths, context)
        out[name] = np.concatenate([np.full(int(full.sum()), context), rest[rest > 0]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--sequences", type=int, nargs="+", default=[256, 512, 1024], help="per step, one per --gpus")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--tokens-per-gpu", type=int, default=16384)
    p.add_argument("--milp-seconds", type=float, default=1.0)
    p.add_argument("--profile", default="H200")
    p.add_argument("--method", default="ring")
    p.add_argument("--stdlib", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    model = load_config(ROOT / "configs" / "train" / "demo.yaml", ["model=llama-8b"]).model
    cost = CostModel(model.shape, named_profile(args.profile, ""), method=args.method)
    rng = np.random.default_rng(1)
    lines = []
    cases = [(context, name, pool) for context in args.contexts
             for name, pool in distributions(context, Path(args.stdlib)).items()]
    for context, dist_name, pool in cases:
        p99 = int(np.percentile(pool, 99))
        for gpus, n in zip(args.gpus, args.sequences):
            planner = AdaptivePlanner(cost, gpus, gpus, args.tokens_per_gpu, time_limit_s=args.milp_seconds)
            greedy_only = AdaptivePlanner(cost, gpus, gpus, args.tokens_per_gpu, use_milp=False)
            rows = []
            if context > gpus * args.tokens_per_gpu:  # the longest piece needs more GPUs than there are
                continue
            for _ in range(args.steps):
                lengths = rng.choice(pool, n).tolist()
                need = planner.min_sizes(lengths).max()
                statics = {s: planner.static(lengths, s).predicted_s for s in planner.sizes if s >= need}
                best_degree = min(statics, key=statics.get)
                t0 = time.perf_counter()
                greedy = greedy_only.solve(lengths)
                greedy_ms = 1e3 * (time.perf_counter() - t0)
                plan = planner.solve(lengths)
                rows.append((statics[best_degree], best_degree, greedy.predicted_s, greedy_ms, plan))
            static_s = float(np.mean([r[0] for r in rows]))
            line = {
                "distribution": dist_name, "context": context, "p99_tokens": p99, "gpus": gpus, "sequences_per_step": n,
                "steps": args.steps, "model": "llama-8b", "profile": cost.hw.name, "sp_method": args.method,
                "tokens_per_gpu": args.tokens_per_gpu, "best_static_degree": [r[1] for r in rows],
                "best_static_s": static_s, "greedy_s": float(np.mean([r[2] for r in rows])),
                "adaptive_s": float(np.mean([r[4].predicted_s for r in rows])),
                "speedup_vs_best_static": static_s / float(np.mean([r[4].predicted_s for r in rows])),
                "adaptive_groups": [r[4].describe() for r in rows], "solver": [r[4].solver for r in rows],
                "greedy_solve_ms": float(np.median([r[3] for r in rows])),
                "adaptive_solve_ms": float(np.median([1e3 * r[4].solve_s for r in rows])),
                "gap_to_lower_bound": float(np.mean([r[4].gap for r in rows])),
                "machine": "this CI machine (2 CPU cores)", "date": datetime.date.today().isoformat(),
            }
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
