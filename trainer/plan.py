"""`loom plan`: the best parallel layout for a corpus, a model and a cluster.

Reads the length statistics (a prepared dataset or its `stats.json`), searches the layouts
(`parallel.planner.search`) on the hardware profile the job resolves to, prints the ranked table and why the others lost, and writes into
OUT: `plan.yaml` (the winner as a train config that `loom train` accepts unchanged),
`candidates.jsonl` (every candidate) and `plan.png` (the candidates compared).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from parallel.planner.search import Candidate, Cluster, Histogram, PlanSearch, loss_chunk
from trainer.config import ConfigError, JobConfig, config_from_dict, dump_config
from trainer.job import Target, check_layout, hardware

PLANNED_GPU = Target("cuda", "H200")  # what `cluster.profile: auto` plans for where this machine has no GPU


def cluster_spec(cfg: JobConfig) -> Cluster:
    """The cluster to plan for: `cluster.nodes` nodes of the profile the job resolves to (auto: this
    machine's GPU, or an H200 on a machine without one)."""
    here = Target.this_process()
    per_node = cfg.cluster.workers // cfg.cluster.nodes
    if per_node & (per_node - 1):
        raise ConfigError(f"cluster: {per_node} GPUs per node is not a power of two")
    return Cluster(cfg.cluster.nodes, hardware(cfg, here if here.device == "cuda" else PLANNED_GPU))


def histogram(source: str, context: int) -> Histogram:
    path = Path(source)
    if path.is_dir():
        from trainer.stats import read_lengths

        return Histogram.from_lengths(read_lengths(path), context)
    if path.is_file():
        return Histogram.from_stats(json.loads(path.read_text()), context)
    raise ConfigError(f"no dataset or stats file at {source}")


def budgets_for(context: int) -> list[int]:
    return [context * k for k in (1, 2, 4, 8, 16)]


def winner_config(cfg: JobConfig, c: Candidate, global_tokens: int) -> JobConfig:
    raw = cfg.to_dict()
    raw["parallel"] = {"dp": c.dp, "tp": c.tp, "pp": c.pp,
                       "sp": {**raw["parallel"]["sp"], "degree": c.sp, "method": c.sp_method, "mode": c.mode,
                              "tokens_per_gpu": c.budget if c.mode == "adaptive" else 0}}
    budget = c.budget if c.mode == "static" else max(cfg.data.context_len, c.budget * c.sp)
    raw["data"]["tokens_per_microbatch"] = budget
    microbatches = max(1, round(global_tokens / budget), c.pp * c.dp)  # pipelines need ≥ pp per dp rank
    raw["train"]["global_microbatches"] = -(-microbatches // c.dp) * c.dp
    raw["train"]["activation_checkpointing"] = round(c.recomputed * cfg.model.n_layers)
    raw["train"]["keep_attention"] = c.keep_attention
    raw["train"]["mlp_tile_tokens"] = c.mlp_tile
    raw["optim"]["offload"] = c.offload_moments
    raw["train"]["offload_activations"] = c.offload_inputs
    raw["train"]["loss_chunk"] = loss_chunk(c)
    raw["cluster"]["device"] = "cuda" if raw["cluster"]["profile"] not in ("cpu",) else raw["cluster"]["device"]
    return config_from_dict(raw)


def print_table(found: list[Candidate], top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="layouts, fastest first (predicted)")
    for col in ("#", "layout", "ckpt", "budget", "step s", "tokens/s", "MFU", "GB/GPU", "note"):
        table.add_column(col, justify="right" if col not in ("layout", "note") else "left")
    for i, c in enumerate([c for c in found if c.feasible][:top], 1):
        budget = f"{c.budget:,}" + ("/GPU" if c.mode == "adaptive" else "")
        ge, le = ("≥ ", "≤ ") if "lower bound" in c.verdict else ("", "")
        ckpt = (f"{c.recomputed:.0%}" + (" attn kept" if c.keep_attention else "") if c.recomputed else "no") + (
            f", tiles {c.mlp_tile // 1024}K" if c.mlp_tile else "") + (
            ", inputs on host" if c.offload_inputs else "") + (", moments on host" if c.offload_moments else "")
        table.add_row(str(i), c.layout, ckpt, budget, f"{ge}{c.step_s:.3f}",
                      f"{le}{c.tokens_per_s:,.0f}", f"{le}{100 * c.mfu:.1f}%", f"{c.memory_gb:.1f}", c.verdict or "best")
    console = Console(width=None if Console().is_terminal else 160)
    console.print(table)
    kinds: dict[str, list[Candidate]] = {}
    for c in found:
        if not c.feasible:
            kind = ("out of memory" if c.verdict.startswith("out of memory") else
                    "the longest sequence does not fit" if "does not fit" in c.verdict else c.verdict)
            kinds.setdefault(kind, []).append(c)
    for kind, group in kinds.items():
        example = group[0]
        console.print(f"rejected {len(group)}: {kind} — e.g. {example.layout}, budget {example.budget:,}: {example.verdict}")


def plot(found: list[Candidate], path: Path, memory_gb: float, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feasible = [c for c in found if c.feasible]
    best = feasible[:top]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.2, 1]})
    labels = [f"{c.layout}{f' ckpt {c.recomputed:.0%}' if c.recomputed else ''} · {c.budget:,}" for c in best]
    colors = ["#c44e52"] + ["#55a868"] * (len(best) - 1)
    ax1.barh(range(len(best))[::-1], [c.tokens_per_s for c in best], color=colors)
    ax1.set_yticks(range(len(best))[::-1], labels, fontsize=7)
    ax1.set_xlabel("predicted tokens/s")
    ax1.set_title(f"the {len(best)} fastest layouts")
    for mode, marker in (("static", "o"), ("adaptive", "^")):
        pts = [c for c in feasible if c.mode == mode]
        ax2.scatter([c.memory_gb for c in pts], [c.step_s for c in pts], s=12, alpha=0.6, marker=marker, label=mode)
    ax2.axvline(memory_gb, color="gray", ls="--", lw=1, label="GPU memory")
    if best:
        ax2.scatter([best[0].memory_gb], [best[0].step_s], s=80, color="#c44e52", label="plan", zorder=3)
    ax2.set_yscale("log")
    ax2.set_xlabel("GB per GPU")
    ax2.set_ylabel("predicted step time (s)")
    ax2.legend(fontsize=8)
    ax2.set_title("every feasible layout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_plan(cfg: JobConfig, source: str, out: str, top: int = 15) -> Candidate:
    t0 = time.perf_counter()
    cluster = cluster_spec(cfg)
    hist = histogram(source, cfg.data.context_len)
    global_tokens = cfg.train.global_microbatches * cfg.data.tokens_per_microbatch
    search = PlanSearch(cfg.model.shape, cluster, hist, global_tokens, seed=cfg.train.seed)
    found = search.run(budgets_for(cfg.data.context_len))
    winner = next((c for c in found if c.feasible), None)
    elapsed = time.perf_counter() - t0
    print(f"{len(found):,} layouts of {cluster.gpus} GPUs ({cluster.nodes} × {cluster.gpus_per_node}, "
          f"{cluster.hw.name}) for {hist.counts.sum():,.0f} sequences, {global_tokens:,} tokens per step, "
          f"searched in {elapsed:.1f} s")
    print_table(found, top)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "candidates.jsonl", "w") as fh:
        for c in found:
            fh.write(json.dumps({**dataclasses.asdict(c), "layout": c.layout}) + "\n")
    plot(found, folder / "plan.png", cluster.hw.gpu_memory_gb)
    if winner is None:
        raise ConfigError("no layout fits: every candidate runs out of memory or cannot hold the longest sequence")
    plan_cfg = winner_config(cfg, winner, global_tokens)
    check_layout(plan_cfg)  # the plan must be a layout `loom train` accepts
    (folder / "plan.yaml").write_text(f"# loom plan: {winner.layout}, predicted {winner.step_s:.3f} s/step, "
                                      f"{winner.tokens_per_s:,.0f} tokens/s, {winner.memory_gb:.1f} GB/GPU\n"
                                      + dump_config(plan_cfg))
    print(f"plan: {winner.layout}{f' recomputing {winner.recomputed:.0%} of the blocks' if winner.recomputed else ''} → "
          f"{folder / 'plan.yaml'} (candidates: {folder / 'plan.png'})")
    return winner

