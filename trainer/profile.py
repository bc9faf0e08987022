"""`loom profile`: fits the cost model's coefficients on this machine's device.

The model of a train config runs forward + backward (its loss chunking, compiled element-wise
regions where the trainer compiles them) on single documents of several lengths;
a least-squares fit of  t = e + attention_flops(L)/A(L) + linear_flops·L/M  gives the fixed cost
e of a micro-batch, the attention rates A (cuDNN on documents of `dense_min_tokens` or more, the
varlen kernel below) and the matmul rate M as this model really achieves them. With two or more GPUs, a send/recv between two of them gives the link bandwidth; with one,
the preset's value stays (and the file says so). The result is a `HardwareProfile` JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from parallel.attention import LocalAttention, select_backend
from parallel.planner.cost_model import CostModel
from trainer.compiled import compile_elementwise
from trainer.config import JobConfig, ParallelConfig
from trainer.job import Target, resolve
from trainer.loop import DTYPES
from trainer.model import Transformer


def _time_model(model: Transformer, length: int, backend, device: torch.device, dtype: torch.dtype,
                repeats: int, loss_chunk: int) -> float:
    tokens = torch.randint(0, model.cfg.vocab_size, (length,), device=device)
    positions = torch.arange(length, device=device)
    cu = torch.tensor([0, length], dtype=torch.int32, device=device)
    attend = LocalAttention(backend, cu, length, lengths=[length])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(tokens, positions, attend, tokens, loss_chunk)
        loss.backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return float(np.median(times))


def profile(cfg: JobConfig, lengths: list[int], repeats: int = 3) -> dict:
    one_device = replace(cfg, parallel=ParallelConfig(), cluster=replace(cfg.cluster, workers=1, nodes=1))
    job = resolve(one_device, Target.this_process())  # the job's decisions for one worker of this device
    device = torch.device(job.target.device)
    name, base, dtype = job.target.name, job.hardware, DTYPES[job.precision]
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    if job.compile:  # time the kernels the trainer runs
        compile_elementwise(model)
    backend = select_backend(job.attention_backend, device, job.hardware.dense_min_tokens)
    cost = CostModel(cfg.model.shape, base)
    measured = [_time_model(model, n, backend, device, dtype, repeats, cfg.train.loss_chunk) for n in lengths]
    n = np.array(lengths, dtype=np.float64)
    long = n >= base.dense_min_tokens  # (documents the backend routes to cuDNN: their own rate)
    design = np.stack([np.ones(len(lengths)), cost.attention_flops(n) * long, cost.attention_flops(n) * ~long,
                       cost.linear_flops_per_token() * n], axis=1)
    (e, inv_long, inv_short, inv_matmul), *_ = np.linalg.lstsq(design, np.array(measured), rcond=None)
    rate = lambda inverse, preset: 1e-12 / inverse if inverse > 0 else preset  # noqa: E731 - (no data: the preset)
    fitted = replace(base, name=name, microbatch_overhead_s=max(float(e), 0.0),
                     attention_tflops=rate(inv_long, base.attention_tflops),
                     short_attention_tflops=rate(inv_short, base.short_attention_tflops),
                     matmul_tflops=rate(inv_matmul, base.matmul_tflops))
    predicted = [CostModel(cfg.model.shape, fitted).microbatch_time([n], 1) for n in lengths]
    return {**asdict(fitted), "measured": {
        "device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": f"{cfg.model.dim}d × {cfg.model.n_layers} layers", "lengths": lengths,
        "seconds": measured, "fitted_seconds": predicted,
        "bandwidth": "measured" if torch.cuda.device_count() > 1 else f"preset {base.name} (one device)"}}


def run_profile(cfg: JobConfig, lengths: list[int], out: str) -> dict:
    result = profile(cfg, lengths)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    m = result["measured"]
    print(f"{m['device']}: micro-batch overhead {1e3 * result['microbatch_overhead_s']:.1f} ms, "
          f"attention {result['attention_tflops']:.3g} TFLOP/s, matmul {result['matmul_tflops']:.3g} TFLOP/s")
    for n, t, f in zip(m["lengths"], m["seconds"], m["fitted_seconds"]):
        print(f"  L={n:>7,}: measured {t:.4f} s, model {f:.4f} s")
    print(f"profile: {out}")
    return result
