"""Where a training step's GPU memory goes, block by block, next to the cost model's memory terms.

For each layout (`--layouts`: recomputed blocks, kept attention, SwiGLU tiles, offloaded inputs)
one process builds Loom's trainer on one GPU, runs a warm-up step (compilation) and then a traced
step of one random `--seq`-token document. A hook on each block's output fires when backward
reaches that block, so the trace reads, for every block: the memory allocated when its backward
starts (what the blocks before it still hold, plus the gradients formed so far) and the peak
while it runs (its recompute and its backward's working set). One JSON line per layout gives,
per token: what all blocks hold at the start of backward, the highest peak of one block's
backward above what it started from, and the step's peak, each next to what `CostModel` says;
also the traced step's seconds (warm; the trace synchronises once per block) next to the model's.

    python benchmarks/activation_memory.py --model llama-1b-long --seq 65536 --layers 4 \
        --layouts 0 2 4 4:keep 4:keep:offload 4:tile 2:keep:offload --out memory.jsonl

A layout is `N[:keep][:tile][:offload]`: N of the `--layers` blocks recomputed (spread evenly, as
the trainer spreads them), `keep` their attention output kept, `tile` the SwiGLU in tiles of
16,384 tokens, `offload` their inputs in host memory.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel.planner.memory_saving import MLP_TILE  # noqa: E402
from parallel.process_group import free_port, init_distributed, shutdown_distributed  # noqa: E402
from train_step import emit, random_dataset, release_memory  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.job import Target, resolve  # noqa: E402
from trainer.loop import Trainer  # noqa: E402

GIB = 2**30


def layout_overrides(spec: str) -> list[str]:
    count, *flags = spec.split(":")
    unknown = set(flags) - {"keep", "tile", "offload"}
    if unknown or not count.isdigit():
        raise SystemExit(f"activation_memory: a layout is N[:keep][:tile][:offload], got {spec!r}")
    return [f"train.activation_checkpointing={int(count)}", f"train.keep_attention={'keep' in flags}",
            f"train.mlp_tile_tokens={MLP_TILE if 'tile' in flags else 0}",
            f"train.offload_activations={'offload' in flags}", "optim.offload=false"]


class BlockTrace:
    """Memory when each block's backward starts, and the peak since the previous block's started."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.at_start: dict[int, float] = {}
        self.peak_before: dict[int, float] = {}
        self.handles = [block.register_forward_hook(self._forward(i)) for i, block in enumerate(blocks)]

    def _forward(self, index: int):
        def hook(module, args, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._reached(index))
        return hook

    def _reached(self, index: int) -> None:
        torch.cuda.synchronize()
        self.peak_before[index] = torch.cuda.max_memory_allocated()
        self.at_start[index] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(spec: str, args: argparse.Namespace, data: Path, run_dir: Path) -> dict:
    overrides = [f"model={args.model}", f"model.n_layers={args.layers}", f"data.path={data}",
                 f"data.context_len={args.seq}", f"data.tokens_per_microbatch={args.seq}",
                 "train.global_microbatches=1", f"train.loss_chunk={args.loss_chunk}", "train.max_steps=2",
                 "train.precision=bf16", "cluster.workers=1", f"run_dir={run_dir}", f"name=m{abs(hash(spec))}",
                 *layout_overrides(spec)]
    job = resolve(load_config(None, overrides), Target.this_process())
    trainer = Trainer(job)
    trainer.train_step(trainer.loader.next_step())  # compilation, cuDNN plans, AdamW states
    batches = trainer.loader.next_step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trace = BlockTrace(list(trainer.parts[0].layers.values()))
    started = time.perf_counter()
    trainer.train_step(batches)
    torch.cuda.synchronize()
    step_s = time.perf_counter() - started
    trace.remove()
    end_peak = torch.cuda.max_memory_allocated()
    order = sorted(trace.at_start, reverse=True)  # backward order: the last block first
    # block i's backward runs between the hook of block i and that of block i − 1 (block 0: the step's end)
    peaks = {i: (trace.peak_before[order[k + 1]] if k + 1 < len(order) else end_peak) for k, i in enumerate(order)}
    rise = {i: peaks[i] - trace.at_start[i] for i in order}
    cost = job.cost_model()
    tokens = args.seq
    saving = job.memory_saving
    record = {
        "model": args.model, "layers": args.layers, "seq": tokens, "layout": spec,
        "memory_saving": saving.describe(args.layers),
        "states_gib": round(before / GIB, 2),
        "held_at_backward_kb_per_token": round((trace.at_start[order[0]] - before) / tokens / 1e3, 2),
        "block_backward_rise_kb_per_token": {str(i): round(rise[i] / tokens / 1e3, 2) for i in order},
        "block_start_kb_per_token": {str(i): round((trace.at_start[i] - before) / tokens / 1e3, 2) for i in order},
        "step_peak_gib": round(max([end_peak, *trace.peak_before.values()]) / GIB, 2),
        "step_s": round(step_s, 3),
        "model_step_s": round(cost.microbatch_time([tokens], 1) + cost.step_fixed_time(1), 3),
        "model_peak_gib": round((cost.state_bytes(1) + cost.activation_bytes(tokens)) / GIB, 2),
        "model_states_gib": round(cost.state_bytes(1) / GIB, 2),
        "model_block_kb_per_token": {"recomputed": round(cost.block_bytes_per_token(True) / 1e3, 2),
                                     "whole": round(cost.block_bytes_per_token(False) / 1e3, 2)},
        "model_backward_kb_per_token": round(cost.backward_bytes_per_token() / 1e3, 2),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    trainer.loader.close()
    del trainer
    release_memory()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b-long")
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--layers", type=int, default=4, help="model.n_layers for the probe")
    parser.add_argument("--layouts", nargs="+", default=["0", "2", "4", "4:keep", "4:keep:offload", "4:tile"])
    parser.add_argument("--loss-chunk", type=int, default=8192)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("activation_memory: needs a CUDA GPU")
    for spec in args.layouts:
        layout_overrides(spec)
    init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=900, local_rank=0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            data = random_dataset(Path(folder), [args.seq] * 2)
            for spec in args.layouts:
                emit(measure(spec, args, data, Path(folder) / "runs"), args.out)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
