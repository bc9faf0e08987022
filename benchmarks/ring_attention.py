"""Sequence-parallel attention on the GPUs of one host: fwd+bwd time and TFLOP/s per GPU.

For each total length L and method it prints one JSON line. In the same run: one GPU with the
same kernel on the whole sequence (for the scaling efficiency T₁ / (d · T_d), the ratio
ring-flash-attn reports) and torch's native `context_parallel` on the same GPUs.

FLOPs follow flash-attention's convention: forward 4·H·D per visible (query, key) pair, backward
2.5 × forward. Usage (2 GPUs):

    python benchmarks/ring_attention.py --lengths 32768 131072 524288 --out results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.attention import LocalAttention, select_backend  # noqa: E402
from parallel.layout import Layout, ring_and_ulysses  # noqa: E402
from parallel.mesh import ParallelDims  # noqa: E402
from parallel.sequence_parallel import SequenceParallelAttention, make_layout  # noqa: E402


def attention_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    return 3.5 * 4 * heads * head_dim * pairs


def timed(fn, warmup: int, iters: int, group=None) -> float:
    """Median seconds of fn() over iters, every rank starting together; the slowest rank counts."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], device="cuda" if cuda else "cpu")
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def fwd_bwd(attend, q, k, v, dout):
    def step():
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        attend(*ins).backward(dout)
    return step


def inputs(total: int, heads: int, kv_heads: int, head_dim: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(total, h, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def native_context_parallel(q, k, v, dout, world, warmup, iters) -> float | None:
    """torch.distributed.tensor.experimental.context_parallel on the same GPUs (K/V heads repeated:
    its SDPA path takes equal head counts)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    g = q.shape[1] // k.shape[1]
    bufs = [x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k.repeat_interleave(g, 1),
                                                                    v.repeat_interleave(g, 1), dout)]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
        def step():
            ins = [x.detach().requires_grad_() for x in bufs[:3]]
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(*ins, is_causal=True).backward(bufs[3])
        return timed(step, warmup, iters, None)


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank),
                            timeout=datetime.timedelta(seconds=600))
    backend = select_backend(args.backend, "cuda")
    out_lines = []
    stamp = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
             "date": datetime.date.today().isoformat(), "heads": args.heads, "kv_heads": args.kv_heads,
             "head_dim": args.head_dim, "dtype": "bf16", "causal": True, "kernel": backend.name}
    cases = [(f"whole {L // 1024}K", [L]) for L in args.lengths]
    if args.packed:
        rng = np.random.default_rng(0)
        for L in args.packed:
            docs = rng.lognormal(np.log(L / 10), 0.8, 64).astype(int).clip(256, L // 2)
            docs = docs[np.cumsum(docs) <= L].tolist()
            docs.append(L - sum(docs))
            cases.append((f"packed {L // 1024}K ({len(docs)} docs)", docs))
    for name, lengths in cases:
        total = sum(lengths)
        iters, warmup = (2, 1) if total > 300_000 else (5, 2)
        q, k, v, dout = inputs(total, args.heads, args.kv_heads, args.head_dim)
        flops = attention_flops(lengths, args.heads, args.head_dim)
        single = None
        if rank == 0:
            cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
            for kernel in ([backend.name] if world > 1 else args.kernels):
                local = LocalAttention(select_backend(kernel, "cuda"), cu, max(lengths))
                t = timed(fwd_bwd(local, q, k, v, dout), warmup, iters)
                single = single or t
                out_lines.append({**stamp, "kernel": kernel, "case": name, "L": total, "method": "one GPU",
                                  "gpus_used": 1, "time_s": t, "tflops_per_gpu": flops / t / 1e12})
                print(json.dumps(out_lines[-1]), flush=True)
        dist.barrier()
        if world == 1:  # one GPU: kernel baselines only
            continue
        single_t = torch.tensor([single or 0.0], device="cuda")
        dist.broadcast(single_t, 0)
        for method in args.methods:
            ring, ulysses = ring_and_ulysses(method, world, world)
            groups = ParallelDims(Layout(dp=1, ring=ring, ulysses=ulysses, sp_method=method),
                                  torch.device("cuda")).sp_groups()
            layout = make_layout(lengths, groups, device="cuda")
            idx = torch.from_numpy(layout.indices(groups.rank)).cuda()
            attend = SequenceParallelAttention(layout, groups, backend)
            t = timed(fwd_bwd(attend, q[idx], k[idx], v[idx], dout[idx]), warmup, iters, dist.group.WORLD)
            line = {**stamp, "case": name, "L": total, "method": method, "gpus_used": world, "time_s": t,
                    "tflops_per_gpu": flops / world / t / 1e12, "speedup_vs_one_gpu": single_t.item() / t,
                    "efficiency": single_t.item() / (world * t)}
            out_lines.append(line)
            if rank == 0:
                print(json.dumps(line), flush=True)
        if args.native_cp and len(lengths) == 1:
            try:
                t = native_context_parallel(q, k, v, dout, world, warmup, iters)
                tt = torch.tensor([t], device="cuda")
                dist.all_reduce(tt, op=dist.ReduceOp.MAX)
                line = {**stamp, "case": name, "L": total, "method": "torch context_parallel", "gpus_used": world,
                        "time_s": tt.item(), "tflops_per_gpu": flops / world / tt.item() / 1e12,
                        "speedup_vs_one_gpu": single_t.item() / tt.item(),
                        "efficiency": single_t.item() / (world * tt.item())}
            except Exception as err:  # noqa: BLE001 - reported, not fatal
                line = {**stamp, "case": name, "L": total, "method": "torch context_parallel",
                        "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            out_lines.append(line)
            if rank == 0:
                print(json.dumps(line), flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    if rank == 0 and args.out:
        with open(args.out, "a") as fh:
            for line in out_lines:
                fh.write(json.dumps(line) + "\n")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--packed", type=int, nargs="*", default=[131072], help="total lengths of packed-document cases")
    p.add_argument("--methods", nargs="+", default=["ring", "ring_bidir", "ulysses"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backend", default="cudnn", help="kernel of the SP runs and of their one-GPU baseline")
    p.add_argument("--kernels", nargs="+", default=["cudnn", "flash"], help="kernels timed when only one GPU is there")
    p.add_argument("--native-cp", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    world = torch.cuda.device_count()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.multiprocessing.spawn(run, args=(world, args), nprocs=world)


if __name__ == "__main__":
    main()
