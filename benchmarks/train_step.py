"""End-to-end training step of Loom's trainer: tokens/s, MFU and peak memory, one JSON line per variant.

Each step trains on one sequence of `--seq` tokens per data-parallel replica, split over `--sp`
ranks (one process per GPU, spawned here). The data are real Arrow shards prepared by `loom
prepare` from random text, and each step is `Trainer.train_step` itself: loader, forward,
chunked loss, backward, clipping, AdamW. Variants run in the same process, one after another,
so each optimisation's gain is visible on the same machine:

- `loom`: what `loom train` does on a GPU — cuDNN attention, compiled element-wise regions,
  activation checkpointing chosen by the memory model (`auto`), chunked loss;
- `eager`: the same without `torch.compile`;
- `sdpa`: eager, attention through plain `F.scaled_dot_product_attention` (is_causal, one document);
- `flash`: torch's flash-attention op instead of cuDNN;
- `no_overlap` (sp > 1): the ring waits for each K/V block before computing it;
- `adaptive` (sp > 1): adaptive SP — each step's sequences regrouped over all ranks (`sp.mode=adaptive`),
  against the static SP of `loom` on the same batches; meaningful with `--data` of uneven lengths.

`--data DIR` trains on a prepared dataset (e.g. the stdlib corpus of `make demo`, long-tailed)
and `--lengths FILE` on random documents with the lengths of a corpus (one integer per line, e.g.
`../shared/data/flexsp_wikipedia_lengths.txt.gz`), instead of random documents of exactly `--seq`
tokens; `--seq` is then the context and the micro-batch budget, and `--microbatches` the
micro-batches per step. `step_s` is the mean of the timed steps (`step_times_s`), as MFU and
tokens/s are; `step_median_s` their median. Next to each measurement: the cost model's time for the very documents of
the timed steps (`predicted_step_s`), `loom plan`'s prediction for the layout from the corpus's
length histogram (`planner_step_s`, `predicted_mem_gb`), and the packing's fill.

MFU counts model FLOPs (matmuls, causal attention; no recompute) against 989 TFLOP/s (H100/H200
dense bf16). `--profile DIR` writes a torch.profiler summary of two `loom` steps.

    python benchmarks/train_step.py --model llama-1b --seq 65536 --out results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.planner.search import Candidate, Cluster, Histogram, PlanSearch  # noqa: E402
from parallel.process_group import free_port, init_distributed, shutdown_distributed  # noqa: E402
from parallel.ring_comm import set_overlap  # noqa: E402
from trainer.adaptive_work import AdaptiveWork  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.dataset import TokenDataset  # noqa: E402
from trainer.job import Target, resolve  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.metrics import peak_memory_gb  # noqa: E402
from trainer.model import Mixers  # noqa: E402
from trainer.prepare import prepare  # noqa: E402
from trainer.work import StaticWork  # noqa: E402

VARIANTS = {
    "loom": [],
    "eager": ["train.compile=false"],
    "sdpa": ["train.compile=false"],
    "flash": ["model.attention_backend=flash"],
    "no_overlap": [],
    "adaptive": ["parallel.sp.mode=adaptive"],
}


class SdpaWork(StaticWork):
    """The trainer's step with attention through plain SDPA: one causal document per micro-batch, sp = 1."""

    def sp_shard(self, batch):
        def attend(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1)
        return batch, Mixers(attend)


def random_dataset(folder: Path, lengths: list[int]) -> Path:
    """Arrow shards of documents of these lengths in byte tokens (n − 1 random letters and the EOS)."""
    rng = random.Random(0)
    source = folder / "random.jsonl"
    with source.open("w") as f:
        for n in lengths:
            f.write(json.dumps({"text": "".join(rng.choices(string.ascii_letters + " ", k=max(1, n - 1)))}) + "\n")
    prepare(source, folder / "data", show_progress=False)
    return folder / "data"


def corpus_lengths(path: str, tokens: int) -> list[int]:
    """Documents drawn (seeded) from a file of lengths until they hold `tokens` tokens."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        pool = np.array(fh.read().split(), dtype=np.int64)
    drawn = np.random.default_rng(0).choice(pool, size=max(1, int(2 * tokens / pool.mean())))
    return drawn[: int(np.searchsorted(np.cumsum(drawn), tokens)) + 1].tolist()


def run_variant(name: str, args: argparse.Namespace, data: Path, run_dir: Path) -> dict:
    overrides = [f"model={args.model}", f"data.path={data}", f"data.context_len={args.seq}",
                 f"data.tokens_per_microbatch={args.seq}", f"train.global_microbatches={args.microbatches or args.dp}",
                 f"train.loss_chunk={args.loss_chunk}", f"train.max_steps={args.warmup + args.steps}",
                 f"train.activation_checkpointing={args.checkpointing}", "train.precision=bf16",
                 f"cluster.workers={args.dp * args.sp}", f"parallel.sp.degree={args.sp}",
                 f"parallel.sp.method={args.sp_method}", f"run_dir={run_dir}", f"name={name}",
                 *args.set, *VARIANTS[name]]
    job = resolve(load_config(None, overrides), Target.this_process())
    set_overlap(name != "no_overlap")
    trainer = Trainer(job)
    if name == "sdpa":
        trainer.work = SdpaWork(job.cfg, trainer.dims, trainer.backend, trainer.device, pipelined=False)
    times, records, steps = [], [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            reset_peak_memory()
        elapsed, result, batches = timed_step(trainer)
        if step >= args.warmup:
            times.append(elapsed)
            records.append(result)
            steps.append([b.doc_lengths() for b in batches])
    if args.profile and name == "loom":
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(2):
                timed_step(trainer)
        write_profile(profiler, Path(args.profile), args.seq)
    step_s = statistics.mean(times)  # (what MFU, tokens/s and the predictions average over)
    peak_mem = torch.tensor([peak_memory_gb(trainer.device)])
    dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    peak = job.peak_tflops
    tokens, flops = sum(r["tokens"] for r in records), sum(r["flops"] for r in records)
    figures = {
        "variant": name, "model": args.model, "params_b": round(trainer.params / 1e9, 3), "seq": args.seq,
        "dp": args.dp, "sp": args.sp, "sp_method": args.sp_method if args.sp > 1 else None,
        "attention_backend": "sdpa" if name == "sdpa" else trainer.backend.name, "compiled": job.compile,
        "blocks_recomputed": job.recomputed_blocks, "attention_kept": job.memory_saving.keep_attention,
        "mlp_tile": job.memory_saving.mlp_tile, "optimizer_offload": job.memory_saving.offload_moments,
        "inputs_offload": job.memory_saving.offload_inputs, "loss_chunk": args.loss_chunk,
        "data": args.data or (f"random text, lengths of {Path(args.lengths).name}" if args.lengths
                              else f"random, {args.seq:,}-token documents"),
        "step_s": round(step_s, 4), "step_median_s": round(statistics.median(times), 4), "step_times_s": [round(t, 4) for t in times], "tokens_per_s": round(tokens / sum(times)),
        "tokens_per_s_per_gpu": round(tokens / sum(times) / world),
        "mfu": round(flops / world / sum(times) / (peak * 1e12), 4) if peak else None,
        "peak_mem_gb": round(peak_mem.item(), 2), "loss": round(records[-1]["loss"], 4),
        "fill": round(tokens / (len(records) * args.seq * (args.microbatches or args.dp)), 4),
        "step_documents": steps,  # rank 0's micro-batches of the timed steps, as document lengths
        "steps_timed": len(times), "warmup_steps": args.warmup, "overrides": args.set,
        **predicted(trainer, args, data, records, steps),
    }
    trainer.loader.close()
    del trainer
    release_memory()
    return figures


CUDA = torch.cuda.is_available()


def predicted(trainer: Trainer, args: argparse.Namespace, data: Path, records: list[dict],
              steps: list[list[list[int]]]) -> dict:
    """The cost model's time for the documents of the timed steps, and what `loom plan` predicts for
    this very layout from the corpus's histogram (time and memory); for adaptive SP, the mean of the
    per-step plans' predictions."""
    if isinstance(trainer.work, AdaptiveWork):
        return {"predicted_step_s": round(statistics.mean(r["predicted_s"] for r in records), 4)}
    job = trainer.job
    hw = job.hardware
    gpus = args.dp * args.sp
    cost = job.cost_model()
    per_step = [sum(cost.microbatch_time(mb, args.sp) for mb in step) + cost.step_fixed_time(gpus) for step in steps]
    lengths = TokenDataset(data).lengths
    search = PlanSearch(job.model.shape, Cluster(1, replace(hw, gpus_per_node=gpus)),
                        Histogram.from_lengths(lengths, args.seq), args.seq * (args.microbatches or args.dp))
    saving = job.memory_saving
    layout = Candidate(args.dp, 1, 1, args.sp, args.sp_method, "static", args.seq,
                       recomputed=saving.recomputed / job.model.n_layers, keep_attention=saving.keep_attention,
                       mlp_tile=saving.mlp_tile, offload_moments=saving.offload_moments,
                       offload_inputs=saving.offload_inputs)
    step_s, _, _ = search.static_time(layout)
    return {"predicted_step_s": round(statistics.mean(per_step), 4), "planner_step_s": round(step_s, 4),
            "predicted_mem_gb": round(search.memory_gb(layout), 2), "profile": hw.name}


def timed_step(trainer: Trainer) -> tuple[float, dict, list]:
    """Seconds of one `train_step` (all ranks start together, the device drained at both ends),
    its figures and this rank's micro-batches."""
    batches = trainer.loader.next_step()
    dist.barrier()
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train_step(batches)
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result, batches


def reset_peak_memory() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def release_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def write_profile(profiler: torch.profiler.profile, folder: Path, seq: int) -> None:
    """The ops that take the most GPU time in one step, as a table (and a Chrome trace)."""
    if dist.get_rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    (folder / f"profile_{seq}.txt").write_text(table)
    profiler.export_chrome_trace(str(folder / f"trace_{seq}.json"))
    print(table, flush=True)


def worker(rank: int, args: argparse.Namespace, port: int, folder: str) -> None:
    init_distributed(rank, args.dp * args.sp, "127.0.0.1", port, timeout_s=900, local_rank=rank)
    try:
        data = Path(args.data) if args.data else Path(folder) / "data"
        for name in args.variants:
            if name in ("no_overlap", "adaptive") and args.sp == 1:
                continue
            try:
                figures = run_variant(name, args, data, Path(folder) / "runs")
            except torch.OutOfMemoryError:
                figures = {"variant": name, "model": args.model, "seq": args.seq, "sp": args.sp, "error": "out of memory"}
                release_memory()
            if rank == 0:
                figures.update(device=torch.cuda.get_device_name() if CUDA else "cpu", gpus=dist.get_world_size(),
                               torch=torch.__version__, date=datetime.date.today().isoformat())
                emit(figures, args.out)
    finally:
        shutdown_distributed()


def emit(figures: dict, out: str) -> None:
    """Prints one JSON line, and appends it to `out` when given."""
    line = json.dumps(figures)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", help="a config under configs/model/")
    parser.add_argument("--seq", type=int, default=65536, help="tokens per sequence (one per dp replica per step)")
    parser.add_argument("--sp", type=int, default=1, help="GPUs per sequence (sequence parallelism)")
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--sp-method", default="ring")
    parser.add_argument("--data", default="", help="a prepared dataset instead of random documents of --seq tokens")
    parser.add_argument("--lengths", default="", help="random documents with the lengths of this file (.txt or .gz)")
    parser.add_argument("--microbatches", type=int, default=0, help="micro-batches per step over all replicas (0: dp)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--checkpointing", default="auto", help="train.activation_checkpointing of every variant")
    parser.add_argument("--loss-chunk", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="more key=value config overrides")
    parser.add_argument("--profile", default="", help="folder for a torch.profiler summary of the loom variant")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    with tempfile.TemporaryDirectory() as folder:
        if not args.data:
            # (4× what the steps take: the epoch's packing fills its micro-batches as a longer corpus's would)
            tokens = 4 * (args.warmup + args.steps + 3) * args.seq * (args.microbatches or args.dp)
            random_dataset(Path(folder), corpus_lengths(args.lengths, tokens) if args.lengths
                           else [args.seq] * ((args.warmup + args.steps + 3) * (args.microbatches or args.dp)))
        torch.multiprocessing.spawn(worker, (args, free_port(), folder), nprocs=args.dp * args.sp)


if __name__ == "__main__":
    main()
