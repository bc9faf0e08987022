"""Linear-attention sequence parallelism: LASP-2 against LASP-1, and linear against softmax attention.

For each total length L it prints JSON lines: one device running the whole sequence (the
baseline of the scaling efficiency T₁ / (d · T_d)), then LASP-2 (one all-gather of the d_k × d_v
states) and LASP-1 (states passed rank to rank) on all devices, and softmax attention by the ring
at the same L. Times are forward + backward of one attention layer (per-head decay, GQA, fp32
accumulation, bf16 inputs on GPU). Softmax on one device is skipped above `--softmax-max` tokens.

    python benchmarks/lasp.py --lengths 131072 524288 2097152 --out results.jsonl   (all GPUs of the host)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ring_attention import fwd_bwd, timed  # noqa: E402
from parallel.attention import LocalAttention, select_backend  # noqa: E402
from parallel.choices import fastest_backend  # noqa: E402
from parallel.lasp import LocalLinearAttention, SequenceParallelLinear  # noqa: E402
from parallel.linear_attention import decay_rates  # noqa: E402
from parallel.layout import Layout  # noqa: E402
from parallel.mesh import ParallelDims  # noqa: E402
from parallel.process_group import free_port  # noqa: E402
from parallel.sequence_parallel import SequenceParallelAttention, make_layout  # noqa: E402


def make_inputs(total: int, heads: int, kv_heads: int, head_dim: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda h: torch.randn(total, h, head_dim, device=device, dtype=dtype, generator=g)  # noqa: E731
    return make(heads) * head_dim ** -0.5, make(kv_heads) * head_dim ** -0.5, make(kv_heads), make(heads)


def run(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=900))
    backend = select_backend(fastest_backend(device.type), device)
    decay = decay_rates(args.kv_heads, True).to(device)
    stamp = {"device": torch.cuda.get_device_name() if cuda else "cpu", "gpus": world, "torch": torch.__version__,
             "date": datetime.date.today().isoformat(), "heads": args.heads, "kv_heads": args.kv_heads,
             "head_dim": args.head_dim, "chunk": args.chunk, "decay": True}
    groups = ParallelDims(Layout(dp=1, ring=world), device).sp_groups() if world > 1 else None
    lines = []

    def report(line: dict) -> None:
        lines.append({**stamp, **line})
        if rank == 0:
            print(json.dumps(lines[-1]), flush=True)

    for total in args.lengths:
        warmup, iters = (1, 2) if total > 300_000 else (1, 3)
        q, k, v, dout = make_inputs(total, args.heads, args.kv_heads, args.head_dim, device)
        cu = torch.tensor([0, total], dtype=torch.int32, device=device)
        one = {"linear": None, "softmax": None}
        if rank == 0:
            linear = LocalLinearAttention(cu, args.chunk)
            one["linear"] = timed(fwd_bwd(lambda *x: linear(*x, decay), q, k, v, dout), warmup, iters)
            report({"L": total, "attention": "linear", "method": "one device", "time_s": one["linear"],
                    "tokens_per_s": total / one["linear"]})
            if total <= args.softmax_max:
                one["softmax"] = timed(fwd_bwd(LocalAttention(backend, cu, total), q, k, v, dout), warmup, iters)
                report({"L": total, "attention": "softmax", "kernel": backend.name, "method": "one device",
                        "time_s": one["softmax"], "tokens_per_s": total / one["softmax"]})
        if groups is not None:
            baseline = [one]
            dist.broadcast_object_list(baseline, src=0)
            one = baseline[0]
            layout = make_layout([total], groups, device=device, zigzag=False)
            idx = torch.from_numpy(layout.indices(groups.rank)).to(device)
            mine = [x[idx] for x in (q, k, v, dout)]
            for method in ("lasp2", "lasp1"):
                attend = SequenceParallelLinear(layout, groups, method, args.chunk)
                t = timed(fwd_bwd(lambda *x: attend(*x, decay), *mine), warmup, iters, dist.group.WORLD)
                report({"L": total, "attention": "linear", "method": method, "time_s": t, "tokens_per_s": total / t,
                        "efficiency": one["linear"] / (world * t) if one["linear"] else None})
            zigzag = make_layout([total], groups, device=device)
            idx = torch.from_numpy(zigzag.indices(groups.rank)).to(device)
            ring = SequenceParallelAttention(zigzag, groups, backend)
            t = timed(fwd_bwd(ring, *(x[idx] for x in (q, k, v, dout))), warmup, iters, dist.group.WORLD)
            report({"L": total, "attention": "softmax", "kernel": backend.name, "method": "ring", "time_s": t,
                    "tokens_per_s": total / t,
                    "efficiency": one["softmax"] / (world * t) if one["softmax"] else None})
        del q, k, v, dout
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0 and args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 2097152])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024, help="chunk length of the chunkwise computation")
    p.add_argument("--softmax-max", type=int, default=524288, help="longest L for softmax on one device")
    p.add_argument("--devices", type=int, default=0, help="processes (0: every GPU, or 2 on CPU)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    world = args.devices or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    torch.multiprocessing.spawn(run, args=(world, args, free_port()), nprocs=world)


if __name__ == "__main__":
    main()
