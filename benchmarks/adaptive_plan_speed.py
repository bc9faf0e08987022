"""How long Loom's adaptive-SP planner takes per step before its MILP polish (greedy, then the
per-round grouping: `AdaptivePlanner.greedy` + `in_rounds`), on the cases of the planning-time
goals: Wikipedia-length sequences (cut at the context) on 64 and 1,024 GPUs, Llama-8B on the H200
profile, 16K tokens per GPU, groups as the simulator (`benchmarks/adaptive_sim.py`) sizes them.
One JSON line per case: the median and the largest of `--draws` steps.

    python benchmarks/adaptive_plan_speed.py --out benchmarks/results/adaptive_plan_speed.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.adaptive_sim import distributions, fixed_degree, loom_planner  # noqa: E402
from parallel.planner.cost_model import CostModel  # noqa: E402
from parallel.planner.hardware import named_profile  # noqa: E402
from trainer.config import load_config  # noqa: E402

TOKENS_PER_GPU = 16384
CASES = [(1024, 64, 131072), (1024, 1024, 131072), (4284, 64, 131072), (66548, 1024, 131072)]  # sequences, GPUs, context


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    model = load_config(ROOT / "configs" / "train" / "demo.yaml", ["model=llama-8b"]).model
    cost = CostModel(model.shape, named_profile("H200", ""))
    wikipedia = distributions(ROOT / "data" / "stdlib")["wikipedia"]
    lines = []
    for sequences, gpus, context in CASES:
        planner = loom_planner(cost, gpus, min(gpus, max(8, 4 * fixed_degree(context, TOKENS_PER_GPU))),
                               TOKENS_PER_GPU, 0.0)
        rng = np.random.default_rng(sequences * gpus)
        times = []
        for _ in range(args.draws):
            lengths = np.minimum(rng.choice(wikipedia, sequences), context).tolist()
            start = time.perf_counter()
            planner.greedy(lengths)
            planner.in_rounds(lengths)
            times.append(time.perf_counter() - start)
        line = {"machine": "this CI machine (2 CPU cores)", "date": datetime.date.today().isoformat(),
                "case": f"Loom's planning (greedy + rounds, no MILP) of Wikipedia-length sequences cut at "
                        f"{context // 1024}K, llama-8b, H200 profile, {TOKENS_PER_GPU // 1024}K tokens per GPU, "
                        f"{args.draws} draws", "gpus": gpus, "sequences": sequences,
                "median_ms": round(1e3 * statistics.median(times), 1), "max_ms": round(1e3 * max(times), 1)}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
