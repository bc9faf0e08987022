"""Attention over packed documents on one GPU: the flash varlen op alone against Loom's `cudnn`
backend (each document of `dense_min` tokens or more through a cuDNN call of its own, the rest in
one varlen call), with cuDNN set as Loom's workers set it (`CUDNN_ENVIRONMENT`).

Packings of `--tokens` tokens, made by Loom's own sampler where they come from a corpus: one
document; 4 equal documents; a typical micro-batch (the median document count) of the FlexSP
Wikipedia lengths (`../shared/data/flexsp_wikipedia_lengths.txt.gz`) and of the stdlib corpus of
`make demo` (a prepared dataset, `--stdlib`); then each corpus's average over micro-batches
spread across an epoch (what training sees); a sweep of equal documents for the routing
threshold; and what cuDNN's first call at a new length costs. Forward + backward, causal FLOPs
inside documents (flash convention: backward 2.5 × forward), one JSON line each, with the cost
model's prediction next to Loom's time.

    python benchmarks/packed_attention.py --stdlib data/stdlib --out results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ring_attention import attention_flops, fwd_bwd, inputs, timed  # noqa: E402
from parallel.attention import LocalAttention, select_backend  # noqa: E402
from parallel.planner.cost_model import CostModel  # noqa: E402
from parallel.planner.hardware import named_profile  # noqa: E402
from parallel.planner.shape import ModelShape  # noqa: E402
from parallel.process_group import CUDNN_ENVIRONMENT  # noqa: E402
from trainer.sampler import PackedSampler  # noqa: E402

WIKIPEDIA = ROOT.parent / "shared" / "data" / "flexsp_wikipedia_lengths.txt.gz"


def corpus_packing(lengths: np.ndarray, tokens: int) -> list[int]:
    """A typical micro-batch of Loom's sampler over a corpus's document lengths (budget = context =
    tokens): the one whose document count is the epoch's median."""
    plan = PackedSampler(lengths, tokens, tokens, 1).plan(0)
    counts = np.diff(plan.bounds)
    return [p.length for p in plan.microbatch(int(np.argsort(counts)[len(counts) // 2]))]


def new_shape_cost(heads: int, kv_heads: int, head_dim: int) -> dict:
    """cuDNN's first fwd + bwd at a length it has not seen (its plan is built then) against a repeat."""
    backend = select_backend("cudnn", "cuda")
    first, again = [], []
    for n in (17000, 25000, 33000, 41000):  # documents of new (padded) lengths, alone
        q, k, v, dout = inputs(n, heads, kv_heads, head_dim)
        attend = LocalAttention(backend, torch.tensor([0, n], dtype=torch.int32, device="cuda"), n)
        first.append(timed(fwd_bwd(attend, q, k, v, dout), 0, 1))
        again.append(timed(fwd_bwd(attend, q, k, v, dout), 0, 3))
    return {"case": "cuDNN at a new length", "first_ms": round(1e3 * float(np.median(first)), 2),
            "repeat_ms": round(1e3 * float(np.median(again)), 2)}


def packings(tokens: int, stdlib: str, wikipedia: str) -> dict[str, list[int]]:
    out = {"one document": [tokens], "4 equal documents": [tokens // 4] * 4}
    if Path(wikipedia).exists():
        wiki = np.array(gzip.open(wikipedia).read().split(), dtype=np.int64)
        out["Wikipedia lengths"] = corpus_packing(wiki, tokens)
    if stdlib and (Path(stdlib) / "index.json").exists():
        from trainer.stats import read_lengths

        out["stdlib corpus"] = corpus_packing(read_lengths(stdlib), tokens)
    return out


def time_paths(lengths: list[int], args: argparse.Namespace, dense_min: int, iters: int) -> dict[str, float]:
    """Seconds of fwd + bwd over one packing: the flash varlen op alone, and Loom's cudnn backend."""
    q, k, v, dout = inputs(sum(lengths), args.heads, args.kv_heads, args.head_dim)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    times = {}
    for path, backend in (("flash varlen", "flash"), ("loom cudnn", "cudnn")):
        attend = LocalAttention(select_backend(backend, "cuda", dense_min), cu, max(lengths), lengths=lengths)
        times[path] = timed(fwd_bwd(attend, q, k, v, dout), min(3, iters), iters)
    return times


def epoch_sample(lengths: np.ndarray, tokens: int, count: int) -> list[list[int]]:
    """`count` micro-batches spread evenly over an epoch of Loom's sampler."""
    plan = PackedSampler(lengths, tokens, tokens, 1).plan(0)
    return [[p.length for p in plan.microbatch(int(i))] for i in np.linspace(0, len(plan) - 1, count)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--stdlib", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--wikipedia", default=str(WIKIPEDIA), help="the FlexSP Wikipedia document lengths")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--epoch-sample", type=int, default=16, help="micro-batches per corpus for the epoch average")
    p.add_argument("--dense-min", type=int, default=0, help="the routing threshold (0: the profile's)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.update(CUDNN_ENVIRONMENT)
    device = torch.cuda.get_device_name()
    hw = named_profile("auto", device)
    hw = replace(hw, dense_min_tokens=args.dense_min or hw.dense_min_tokens)
    shape = ModelShape(vocab_size=1, dim=args.heads * args.head_dim, n_layers=1, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, head_dim=args.head_dim, hidden_dim=1, softmax_layers=1)
    cost = CostModel(shape, hw)
    stamp = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
             "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bf16",
             "dense_min": hw.dense_min_tokens}
    lines = []

    def report(line: dict) -> None:
        lines.append({**stamp, **line})
        print(json.dumps(lines[-1]), flush=True)

    for name, lengths in packings(args.tokens, args.stdlib, args.wikipedia).items():
        times = time_paths(lengths, args, hw.dense_min_tokens, args.iters)
        flops = attention_flops(lengths, args.heads, args.head_dim)
        for path, t in times.items():
            report({"packing": name, "documents": len(lengths), "tokens": sum(lengths), "longest": max(lengths),
                    "path": path, "time_ms": round(1e3 * t, 3), "tflops": round(flops / t / 1e12, 1),
                    "speedup_vs_flash_varlen": round(times["flash varlen"] / t, 3),
                    **({"predicted_ms": round(1e3 * float(np.sum(cost.attention_time(lengths, 1))), 3)}
                       if path == "loom cudnn" else {})})
    corpora = {"Wikipedia lengths": np.array(gzip.open(args.wikipedia).read().split(), dtype=np.int64)
               if Path(args.wikipedia).exists() else None}
    if args.stdlib and (Path(args.stdlib) / "index.json").exists():
        from trainer.stats import read_lengths

        corpora["stdlib corpus"] = read_lengths(args.stdlib)
    for name, lengths in corpora.items():  # what training sees: the average over an epoch's micro-batches
        if lengths is None:
            continue
        sample = epoch_sample(lengths, args.tokens, args.epoch_sample)
        totals = {"flash varlen": 0.0, "loom cudnn": 0.0}
        for mb in sample:
            for path, t in time_paths(mb, args, hw.dense_min_tokens, 3).items():
                totals[path] += t
        flops = sum(attention_flops(mb, args.heads, args.head_dim) for mb in sample)
        predicted = sum(float(np.sum(cost.attention_time(mb, 1))) for mb in sample)
        report({"packing": f"{name}, {len(sample)} micro-batches across an epoch", "documents": sum(map(len, sample)),
                "flash_varlen_tflops": round(flops / totals["flash varlen"] / 1e12, 1),
                "loom_cudnn_tflops": round(flops / totals["loom cudnn"] / 1e12, 1),
                "speedup_vs_flash_varlen": round(totals["flash varlen"] / totals["loom cudnn"], 3),
                "time_ms": round(1e3 * totals["loom cudnn"], 2), "predicted_ms": round(1e3 * predicted, 2)})
    for n in (1024, 2048, 3000, 4096, 6000, 8192, 12000, 16384):  # where a cuDNN call per document overtakes varlen
        lengths = [n] * (args.tokens // n)
        times = time_paths(lengths, args, n, args.iters)
        report({"packing": f"{len(lengths)} documents of {n}", "threshold_sweep": n,
                "flash_varlen_tflops": round(attention_flops(lengths, args.heads, args.head_dim)
                                             / times["flash varlen"] / 1e12, 1),
                "cudnn_per_document_tflops": round(attention_flops(lengths, args.heads, args.head_dim)
                                                   / times["loom cudnn"] / 1e12, 1),
                "speedup_vs_flash_varlen": round(times["flash varlen"] / times["loom cudnn"], 3)})
    report(new_shape_cost(args.heads, args.kv_heads, args.head_dim))
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
