"""Adaptive SP at scale, by simulation: every policy on the same steps, cost model and memory limit.

A step is drawn from a real length distribution (documents longer than the context are cut at it,
as Loom's sampler does) until it holds `microbatches` × `tokens_per_gpu` tokens per GPU (a step
of gradient accumulation: every policy may run several micro-batches on a GPU). Each policy then decides
how the step's sequences run on the N GPUs, and the cost model (`parallel.planner.cost_model`,
the one that predicts one-GPU steps of real corpora within 10%) times it:

1. `fixed` — what a Megatron / DeepSpeed user sets for the run: the smallest power-of-two SP
   degree whose GPUs hold the context, data parallelism over the rest; the step's sequences are
   packed in order into micro-batches of degree × tokens_per_gpu and dealt round-robin to the
   data-parallel groups (`fixed_balanced`: the same degree, sequences assigned longest first to
   the group that finishes them soonest);
2. `best_static` — the best single degree, chosen again for every step (an oracle);
3. `dynamic_cp` — Megatron-style dynamic context parallelism: the step runs in rounds; each
   round regroups all GPUs into power-of-two groups, one per sequence at the smallest size that
   holds it (longest first), shorter sequences packed into a group's micro-batch while it has
   room; a round lasts as long as its slowest group;
4. `flexsp` — FlexSP's formulation: length buckets and a MILP over group sizes and counts,
   solved cold within the time cap;
5. `loom` — Loom's adaptive SP as the trainer runs it (`AdaptivePlanner.solve`: greedy, then the
   MILP warm-started and time-capped, against a grouping per round of micro-batches — Loom's own
   version of the dynamic CP rounds — whichever the cost model finds faster);
6. `loom_any_size` — the same planner over groups of any size, not only powers of two
   (`parallel.sp.group_sizes: any`: every size up to a node's GPUs, whole nodes beyond).

`loom_greedy` and `loom_rounds` are the two plans `loom` chooses between, each alone (their solve
times add up to Loom's planning time before the optional MILP polish).

`milp_long` (with `--optimum-seconds S`, on up to `--milp-max-gpus` GPUs) is no policy either:
the MILP given S seconds and warm-started from Loom's plan, the reference for how far Loom's
time-capped plan is from what the solver finds with time to spare.

`lower_bound` is no policy: the step if every GPU were busy all the time with the least work
any grouping needs, groups of any size allowed (communication left out) — no policy can beat it.

Per policy and case: mean step time (the optimizer step's fixed cost included, alike for all),
speedup over `fixed`, GPU idle share (rank-seconds without work over N × step time) and the
solver's time per step on this machine. Groups hold up to max(8, 4 × the fixed degree) GPUs. Groups of up to
`gpus_per_node` GPUs use NVLink, larger ones the network (the profile's figures).

    python benchmarks/adaptive_sim.py --out benchmarks/results/adaptive_sim.jsonl --plot adaptive_sim.png
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parallel.planner.adaptive import AdaptivePlanner, Group, Plan, trainer_planner  # noqa: E402
from parallel.planner.cost_model import CostModel  # noqa: E402
from parallel.planner.hardware import named_profile  # noqa: E402
from trainer.config import load_config  # noqa: E402


def distributions(stdlib: Path) -> dict[str, np.ndarray]:
    """Document lengths: the FlexSP Wikipedia sample, the stdlib corpus of `make demo`, a heavy tail."""
    out = {}
    wiki = ROOT.parent / "shared" / "data" / "flexsp_wikipedia_lengths.txt.gz"
    if wiki.exists():
        out["wikipedia"] = np.array(gzip.open(wiki).read().split(), dtype=np.int64)
    if (stdlib / "index.json").exists():
        from trainer.stats import read_lengths

        out["stdlib"] = read_lengths(stdlib)
    rng = np.random.default_rng(0)
    out["heavy_tail"] = np.clip(rng.lognormal(np.log(3000), 1.9, 200_000), 16, 4 * 2**20).astype(np.int64)
    return out


def cut(lengths: np.ndarray, context: int) -> np.ndarray:
    """Documents longer than the context as pieces of it, as the sampler cuts them."""
    full, rest = np.divmod(lengths, context)
    return np.concatenate([np.full(int(full.sum()), context), rest[rest > 0]])


def draw_step(pool: np.ndarray, tokens: int, rng: np.random.Generator) -> list[int]:
    """Sequences drawn at random until the step holds `tokens` tokens."""
    out, total = [], 0
    while total < tokens:
        n = int(pool[rng.integers(pool.size)])
        out.append(n)
        total += n
    return out


# ------------------------------------------------------------------ policies


def fixed_degree(context: int, tokens_per_gpu: int) -> int:
    return 1 << max(0, math.ceil(math.log2(context / tokens_per_gpu)))


def fixed_in_order(planner: AdaptivePlanner, lengths: list[int], degree: int) -> Plan:
    """Sequences packed in arrival order (next fit) into micro-batches, dealt round-robin."""
    cap = degree * planner.tokens_per_gpu
    mbs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > cap:
            mbs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    mbs.append(current)
    groups = [Group(g * degree, degree, mbs[g::planner.ranks // degree]) for g in range(planner.ranks // degree)]
    makespan = max(planner.group_time(lengths, g.microbatches, degree) for g in groups)
    return Plan(groups, makespan, planner.lower_bound(lengths), solver=f"fixed-{degree}")


def dynamic_cp(planner: AdaptivePlanner, lengths: list[int]) -> tuple[float, float]:
    """Rounds of regrouped GPUs (see the module's docstring): (step seconds, busy rank-seconds)."""
    need = planner.min_sizes(lengths)
    waiting = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total = busy = 0.0
    while waiting:
        free, groups, rest = planner.ranks, [], []
        for i in waiting:
            home = next((g for g in groups if g[0] >= need[i] and g[1] + lengths[i] <= g[0] * planner.tokens_per_gpu),
                        None)
            if home is not None:
                home[1] += lengths[i]
                home[2].append(i)
            elif need[i] <= free:
                groups.append([int(need[i]), lengths[i], [i]])
                free -= int(need[i])
            else:
                rest.append(i)
        times = [planner.cost.microbatch_time([lengths[i] for i in g[2]], g[0]) for g in groups]
        total += max(times)
        busy += sum(g[0] * t for g, t in zip(groups, times))
        waiting = rest
    return total, busy


def loom_planner(cost: CostModel, gpus: int, max_group: int, tokens_per_gpu: int, milp_seconds: float,
                 group_sizes: str = "powers_of_two") -> AdaptivePlanner:
    """Loom's policy: the planner exactly as the trainer builds it."""
    return trainer_planner(cost, gpus, max_group, tokens_per_gpu, milp_seconds, group_sizes=group_sizes)


def busy_seconds(planner: AdaptivePlanner, lengths: list[int], plan: Plan) -> float:
    return sum(g.size * planner.group_time(lengths, g.microbatches, g.size) for g in plan.groups)


def run_policies(cost: CostModel, gpus: int, context: int, tokens_per_gpu: int, lengths: list[int],
                 milp_seconds: float, optimum_seconds: float = 0.0) -> dict[str, dict]:
    """Every policy on one step: {policy: {step_s, idle, solve_s, groups}}."""
    max_group = min(gpus, max(8, 4 * fixed_degree(context, tokens_per_gpu)))
    planner = loom_planner(cost, gpus, max_group, tokens_per_gpu, milp_seconds)
    out: dict[str, dict] = {}

    fixed_s = cost.step_fixed_time(gpus)  # the optimizer step and its fixed cost, alike for every policy

    def record(name: str, plan: Plan, solve_s: float) -> None:
        step = plan.predicted_s + fixed_s
        out[name] = {"step_s": step, "idle": 1 - busy_seconds(planner, lengths, plan) / (gpus * step),
                     "solve_s": solve_s, "groups": plan.describe()}

    degree = fixed_degree(context, tokens_per_gpu)
    record("fixed", fixed_in_order(planner, lengths, degree), 0.0)
    t0 = time.perf_counter()
    record("fixed_balanced", planner.static(lengths, degree), time.perf_counter() - t0)
    need = int(planner.min_sizes(lengths).max())
    t0 = time.perf_counter()
    statics = [planner.static(lengths, s) for s in planner.sizes if s >= need]
    record("best_static", min(statics, key=lambda p: p.predicted_s), time.perf_counter() - t0)
    t0 = time.perf_counter()
    step, busy = dynamic_cp(planner, lengths)
    out["dynamic_cp"] = {"step_s": step + fixed_s, "idle": 1 - busy / (gpus * (step + fixed_s)),
                         "solve_s": time.perf_counter() - t0, "groups": "per round"}
    if milp_seconds > 0:
        t0 = time.perf_counter()
        cold = planner.milp(lengths, None)
        solve = time.perf_counter() - t0
        if cold is not None:
            record("flexsp", cold, solve)
    t0 = time.perf_counter()
    greedy = planner.greedy(lengths)
    greedy_s = time.perf_counter() - t0
    record("loom_greedy", greedy, greedy_s)
    t0 = time.perf_counter()
    rounds = planner.in_rounds(lengths)
    record("loom_rounds", rounds, time.perf_counter() - t0)
    t0 = time.perf_counter()
    loom = planner.solve(lengths)
    record("loom", loom, time.perf_counter() - t0)
    if optimum_seconds > 0:
        t0 = time.perf_counter()
        long = loom_planner(cost, gpus, max_group, tokens_per_gpu, optimum_seconds).milp(lengths, loom)
        if long is not None:
            record("milp_long", min(long, loom, key=lambda plan: plan.predicted_s), time.perf_counter() - t0)
    any_size = loom_planner(cost, gpus, max_group, tokens_per_gpu, milp_seconds, group_sizes="any")
    t0 = time.perf_counter()
    record("loom_any_size", any_size.solve(lengths), time.perf_counter() - t0)
    out["lower_bound"] = {"step_s": any_size.lower_bound(lengths) + fixed_s, "idle": 0.0, "solve_s": 0.0,
                          "groups": "no plan: the least work spread over every GPU"}
    return out


# ------------------------------------------------------------------ the run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288, 2097152])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tokens-per-gpu", type=int, default=16384, help="the memory limit: activations per GPU")
    p.add_argument("--microbatches", type=int, default=4, help="a step's tokens per GPU, in micro-batches")
    p.add_argument("--milp-seconds", type=float, default=1.0, help="the MILP's time cap (flexsp and loom)")
    p.add_argument("--milp-max-gpus", type=int, default=256, help="above this, no MILP (its model is too large)")
    p.add_argument("--optimum-seconds", type=float, default=0.0,
                   help="also the MILP with this time cap, warm-started from Loom's plan (milp_long)")
    p.add_argument("--profile", default="H200")
    p.add_argument("--method", default="ring")
    p.add_argument("--stdlib", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--replot", default="", help="only draw --plot from this JSON-lines file of an earlier run")
    args = p.parse_args()
    if args.replot:
        plot([json.loads(line) for line in Path(args.replot).read_text().splitlines()], args.plot)
        return
    model = load_config(ROOT / "configs" / "train" / "demo.yaml", ["model=llama-8b"]).model
    cost = CostModel(model.shape, named_profile(args.profile, ""), method=args.method)
    pools = distributions(Path(args.stdlib))
    lines = []
    for context in args.contexts:
        for name, lengths in pools.items():
            pool = cut(lengths, context)
            for gpus in args.gpus:
                if fixed_degree(context, args.tokens_per_gpu) > gpus:
                    continue  # a context piece needs more GPUs than there are
                rng = np.random.default_rng(zlib.crc32(f"{name} {context} {gpus}".encode()))
                milp = args.milp_seconds if gpus <= args.milp_max_gpus else 0.0
                steps = []
                for _ in range(args.steps):
                    step = draw_step(pool, args.microbatches * gpus * args.tokens_per_gpu, rng)
                    steps.append((len(step), run_policies(cost, gpus, context, args.tokens_per_gpu, step, milp,
                                                          args.optimum_seconds if milp else 0.0)))
                line = summarize(name, context, gpus, steps, args, cost)
                lines.append(line)
                print(json.dumps(line), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    if args.plot:
        plot(lines, args.plot)


def summarize(name: str, context: int, gpus: int, steps: list[tuple[int, dict]], args, cost: CostModel) -> dict:
    policies = [k for k in steps[0][1] if all(k in s for _, s in steps)]
    mean = {k: float(np.mean([s[k]["step_s"] for _, s in steps])) for k in policies}
    return {
        "distribution": name, "context": context, "gpus": gpus, "steps": len(steps),
        "sequences_per_step": int(np.mean([n for n, _ in steps])), "tokens_per_gpu": args.tokens_per_gpu,
        "microbatches": args.microbatches,
        "fixed_degree": fixed_degree(context, args.tokens_per_gpu),
        "step_s": mean, "speedup_vs_fixed": {k: mean["fixed"] / v for k, v in mean.items()},
        "idle": {k: float(np.mean([s[k]["idle"] for _, s in steps])) for k in policies},
        "solve_ms": {k: 1e3 * float(np.median([s[k]["solve_s"] for _, s in steps])) for k in policies},
        "loom_groups": [s["loom"]["groups"] for _, s in steps],
        "milp_seconds": args.milp_seconds if gpus <= args.milp_max_gpus else 0.0,
        "model": "llama-8b", "profile": cost.hw.name, "sp_method": args.method,
        "machine": "this CI machine (2 CPU cores)", "date": datetime.date.today().isoformat(),
    }


def plot(lines: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({line["context"] for line in lines})
    dists = sorted({line["distribution"] for line in lines})
    fig, axes = plt.subplots(len(contexts), len(dists), figsize=(4.2 * len(dists), 3.2 * len(contexts)),
                             squeeze=False)
    colors = {"best_static": "#4c72b0", "dynamic_cp": "#dd8452", "flexsp": "#55a868", "loom": "#c44e52",
              "loom_any_size": "#8172b3", "lower_bound": "#999999"}
    for r, context in enumerate(contexts):
        for c, dist in enumerate(dists):
            ax = axes[r][c]
            rows = sorted((line for line in lines if line["context"] == context and line["distribution"] == dist),
                          key=lambda line: line["gpus"])
            for policy, color in colors.items():
                pts = [(line["gpus"], line["speedup_vs_fixed"][policy]) for line in rows if policy in line["speedup_vs_fixed"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=policy,
                            linestyle=":" if policy == "lower_bound" else "-")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{dist}, {context // 1024}K context", fontsize=9)
            ax.set_xlabel("GPUs")
            if c == 0:
                ax.set_ylabel("speedup over the fixed degree")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
