"""The training loop every worker runs, with torch.distributed already initialised.

Order of a step: fetch this rank's micro-batches; all-reduce the step's label count; forward
and backward each micro-batch with its summed loss scaled by dp / that global count (FSDP
averages over dp, so the update equals a single worker's on the same global batch); clip, step the
optimizer and the schedule; log; checkpoint every `checkpoint.every` steps and at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

from launch.distributed import collective_guard
from parallel.allgather_attention import AllGatherAttention
from parallel.attention import LocalAttention, select_backend
from parallel.lasp import LocalLinearAttention, SequenceParallelLinear
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp, checkpointed_blocks
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.mesh import ParallelDims
from parallel.planner.cost_model import CostModel, device_name, device_profile, hardware_profile
from parallel.pipeline import Pipeline, clip_grad_norm, split_model, stage_ids
from parallel.sequence_parallel import SequenceParallelAttention, make_layout
from parallel.tensor_parallel import apply_tp
from trainer.adaptive_step import AdaptiveStep
from trainer.checkpoint import Checkpointer, ModelAndOptimizer
from trainer.compiled import compile_elementwise, should_compile
from trainer.config import JobConfig, dump_config
from trainer.dataset import TokenDataset
from trainer.ledger import Ledger
from trainer.loader import IGNORE, PackedBatch, StepLoader
from trainer.metrics import MetricsWriter, log0, peak_memory_gb, peak_tflops, plot_loss, training_flops
from trainer.model import Mixers, Transformer, num_params
from trainer.optim import Schedules, build_optimizer, build_scheduler
from trainer.sampler import PackedSampler


@dataclass
class Progress:
    """The step counter, as a checkpointable object."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def compute_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class Trainer:
    def __init__(self, cfg: JobConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or worker_device()
        self.rank = dist.get_rank()
        self.dims = ParallelDims.from_config(cfg, dist.get_world_size()).build(self.device)
        torch.manual_seed(cfg.train.seed)  # the whole model is initialised alike on every rank, then split
        model = Transformer(cfg.model).to(self.device)
        self.params = num_params(model)
        self.dtype = compute_dtype(cfg, self.device)
        p, dims = cfg.parallel, self.dims
        virtual = p.pp_virtual if dims.pp > 1 else 1
        self.stages = stage_ids(dims.pp_rank, dims.pp, virtual) if dims.pp > 1 else [0]
        self.parts = [split_model(model, s, dims.pp * virtual) for s in self.stages] if dims.pp > 1 else [model]
        deepspeed = p.dp_engine == "deepspeed"
        self.checkpointed = checkpointed_blocks(checkpoint_count(cfg, dims, self.device), cfg.model.n_layers)
        self.compiled = should_compile(cfg.train.compile, self.device)
        for part in self.parts:  # the torchtitan order: tp, activation checkpointing, compile, fsdp
            if dims.tp > 1:
                apply_tp(part, dims.mesh["tp"])
            apply_activation_checkpointing(part, self.checkpointed)
            if self.compiled:
                compile_elementwise(part)
            if not deepspeed:  # adaptive groups run different numbers of micro-batches: gather once per step
                apply_fsdp(part, dims.fsdp_mesh, param_dtype=self.dtype, reshard_after_forward=not dims.adaptive)
        self.sp_groups = dims.sp_groups() if dims.sp > 1 and not dims.adaptive else None
        self.optimizers = [build_optimizer(part, cfg.optim) for part in self.parts]
        self.schedulers = Schedules([build_scheduler(o, cfg.optim, cfg.train.max_steps) for o in self.optimizers])
        self.engine = None
        if deepspeed:
            self.engine = DeepSpeedEngine(cfg, self.parts[0], self.optimizers[0], self.schedulers.schedulers[0],
                                          cfg.train.global_microbatches // dims.dp, self.dtype == torch.bfloat16)
        self.model = self.engine or self.parts[0]
        self.backend = select_backend(cfg.model.attention_backend, self.device)
        self.pipeline = None
        if dims.pp > 1:
            self.pipeline = Pipeline(self.parts, self.stages, dims.pp * virtual, cfg.train.global_microbatches // dims.dp,
                                     p.pp_schedule, dims.mesh["pp"].get_group(), self.device, self.pipeline_loss)
            self.loss_scale = 0.0
        dataset = TokenDataset(cfg.data.path)
        sampler = PackedSampler(dataset.lengths, cfg.data.context_len, cfg.data.tokens_per_microbatch,
                                cfg.train.global_microbatches, cfg.data.seed, cfg.data.bucket_edges,
                                dataset.fingerprint)
        if self.dims.adaptive:  # every rank reads the whole step; the plan decides who runs what
            self.loader = StepLoader(dataset, sampler, 0, 1, cfg.data.prefetch)
            self.adaptive = AdaptiveStep(self.dims, self.backend, self.device, *adaptive_budget(cfg, self.device),
                                         cfg.parallel.sp.solver_time_s, cfg.model.window)
        else:
            self.loader = StepLoader(dataset, sampler, self.dims.dp_rank, self.dims.dp, cfg.data.prefetch)
            self.adaptive = None
        self.progress = Progress()
        self.ledger = Ledger()
        self.checkpointer = Checkpointer(cfg.checkpoint_folder, cfg.checkpoint.keep_last,
                                         self.dims.checkpoint_group, cfg.checkpoint.async_save)
        self.peak = peak_tflops(self.device, cfg.cluster.peak_tflops)

    def app_state(self) -> dict[str, Any]:
        state = {"loader": self.loader, "progress": self.progress}
        if self.engine is None:  # DeepSpeed saves model, optimizer and schedule itself
            state.update(train=ModelAndOptimizer(self.parts, self.optimizers), scheduler=self.schedulers)
        return state

    def resume(self) -> int:
        latest = self.checkpointer.latest()
        if latest is None:
            return 0
        step, path = latest
        self.checkpointer.load(path, self.app_state())
        if self.engine is not None:
            self.engine.load(Path(path))
        self.ledger = Ledger.load(path)
        log0(f"resumed from {path} (step {self.progress.step}/{self.cfg.train.max_steps})")
        return step

    def save(self) -> None:
        self.checkpointer.save(self.progress.step, self.app_state(), self.cfg.to_dict(), self.ledger.save,
                               every_rank_files=self.engine.save if self.engine is not None else None)

    def shard(self, batch: PackedBatch) -> tuple[PackedBatch, Mixers]:
        """This rank's tokens of a micro-batch and the token mixing that sees the rest of it, padded
        to a multiple of tp (sequence-parallel activations) or, with pp, to the pipeline's fixed length."""
        local, mixers = self.sp_shard(batch)
        if self.pipeline is not None:
            sp = self.dims.sp
            length = -(-self.cfg.data.tokens_per_microbatch // sp)
        else:
            length = local.num_tokens
        return pad_to(local, mixers, -(-length // self.dims.tp) * self.dims.tp)

    def sp_shard(self, batch: PackedBatch) -> tuple[PackedBatch, Mixers]:
        m, sp = self.cfg.model, self.cfg.parallel.sp
        if self.sp_groups is None:
            return batch, Mixers(LocalAttention(self.backend, batch.cu_seqlens, batch.max_seqlen, window=m.window),
                                 LocalLinearAttention(batch.cu_seqlens, m.linear_chunk) if m.has_linear else None)
        # linear layers pass one state per rank over contiguous slices, and pipeline stages need a
        # bounded length per rank; otherwise documents are balanced by zigzag
        layout = make_layout(batch.doc_lengths(), self.sp_groups, window=m.window, device=self.device,
                             zigzag=not m.has_linear and self.pipeline is None)
        idx = torch.from_numpy(layout.indices(self.sp_groups.rank)).to(self.device)
        local = PackedBatch(batch.tokens[idx], batch.labels[idx], batch.positions[idx], batch.cu_seqlens,
                            batch.max_seqlen, batch.pieces)
        softmax = (AllGatherAttention(layout, self.sp_groups, self.backend) if sp.method == "allgather"
                   else SequenceParallelAttention(layout, self.sp_groups, self.backend))
        linear = SequenceParallelLinear(layout, self.sp_groups, sp.linear_method, m.linear_chunk) if m.has_linear else None
        return local, Mixers(softmax, linear)

    def static_work(self, batches: list[PackedBatch]):
        """This rank's micro-batches (its SP share of its dp share), the step's label count, its FLOPs."""
        # labels counted on the host batches, once per dp replica (its tp, pp and sp ranks share them)
        counts = self.dims.tp_rank == 0 and self.dims.pp_rank == 0 and self.dims.sp_rank == 0
        labels = torch.tensor([float(sum(b.num_labels() for b in batches)) * counts], dtype=torch.float64)
        dist.all_reduce(labels)
        shards = [self.shard(b.to(self.device)) for b in batches]
        flops = training_flops(self.cfg.model, [n for b in batches for n in b.doc_lengths()]) / self.dims.sp * counts
        return shards, labels.item(), flops, {}

    def adaptive_work(self, batches: list[PackedBatch]):
        plan = self.adaptive.plan(batches, self.loader.peek)
        step = [b.to(self.device) for b in batches]
        items, lengths = self.adaptive.work(plan, step)
        group = plan.group_of(self.adaptive.pool_rank)
        flops = training_flops(self.cfg.model, lengths) / group.size if group and lengths else 0.0
        info = {"sp_groups": plan.describe(), "predicted_s": plan.predicted_s, "solve_s": plan.solve_s,
                "plan_gap": plan.gap, "solver": plan.solver}
        return items, float(sum(b.num_labels() for b in batches)), flops, info

    def run_microbatches(self, items: list[tuple[PackedBatch, Mixers]], loss_scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch in turn; the summed token loss (on the device)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (batch, mixers) in enumerate(items):
            last = i == len(items) - 1
            if self.engine is None:
                self.model.set_requires_gradient_sync(last)
                if self.adaptive:  # keep weights gathered until this rank's last backward
                    self.model.set_reshard_after_backward(last)
            with self.vocab_parallel():
                with self.autocast():
                    loss = self.microbatch_loss(batch, mixers)
                self.backward(loss * loss_scale)
            loss_sum += full(loss).detach().double()
        return loss_sum

    def microbatch_loss(self, batch: PackedBatch, mixers: Mixers) -> torch.Tensor:
        if self.dims.tp > 1:  # logits sharded over the vocabulary: a loss-parallel cross-entropy
            logits = self.model(batch.tokens, batch.positions, mixers)
            return F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE, reduction="sum")
        # the loss inside the model, `train.loss_chunk` tokens at a time: never all logits at once
        return self.model(batch.tokens, batch.positions, mixers, batch.labels, self.cfg.train.loss_chunk)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer itself at the step's last micro-batch
        else:
            loss.backward()

    def vocab_parallel(self):
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def run_pipeline(self, items: list[tuple[PackedBatch, Mixers]], loss_scale: float) -> torch.Tensor:
        """The step's micro-batches through the pipeline schedule; the last stage's summed token loss."""
        self.loss_scale = loss_scale
        tokens = torch.stack([b.tokens for b, _ in items])
        labels = torch.stack([b.labels for b, _ in items])
        with self.autocast(), self.vocab_parallel():
            losses = self.pipeline.step(tokens, labels, [(b.positions, mixers) for b, mixers in items])
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:  # (only the last stage has losses)
            total += full(loss).detach().double()
        return total / loss_scale

    def pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return loss * self.loss_scale

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batches: list[PackedBatch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the global figures."""
        items, global_labels, flops, info = (self.adaptive_work if self.adaptive else self.static_work)(batches)
        # FSDP averages over its dp × sp ranks: see parallel/data_parallel.py
        loss_scale = self.dims.dp * self.dims.sp / global_labels
        lr = self.engine.lr() if self.engine is not None else self.schedulers.last_lr()
        loss_sum = (self.run_pipeline if self.pipeline else self.run_microbatches)(items, loss_scale)
        if self.engine is not None:  # DeepSpeed clipped and stepped at the step's last micro-batch
            norm = self.engine.grad_norm()
        else:
            params = [p for part in self.parts for p in part.parameters()]
            norm = clip_grad_norm(params, self.cfg.optim.grad_clip,
                                  self.dims.mesh["pp"].get_group() if self.dims.pp > 1 else None)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.schedulers.step()
        first = self.dims.tp_rank == 0 and self.dims.pp_rank == 0
        last = self.dims.tp_rank == 0 and (self.pipeline is None or self.pipeline.last)
        # the step's one host synchronisation: its figures, summed over ranks, for the log
        figures = torch.stack([loss_sum.to(self.device, torch.float64) * last,
                               torch.tensor(float(sum(b.num_real for b, _ in items) * first), dtype=torch.float64,
                                            device=self.device),
                               torch.tensor(flops, dtype=torch.float64, device=self.device),
                               torch.as_tensor(norm, dtype=torch.float64).to(self.device) * (self.rank == 0)])
        dist.all_reduce(figures)  # (the norm is global already: rank 0's copy is kept)
        loss, tokens, flops, grad_norm = figures.tolist()
        return {"loss": loss / global_labels, "tokens": int(tokens), "flops": flops, "grad_norm": grad_norm,
                "lr": lr, **info}

    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Trains to max_steps (or run_steps more); `on_step(step)` runs after each step."""
        cfg = self.cfg
        log0(f"model: {self.params / 1e6:.2f}M parameters, {str(self.dtype).split('.')[-1]} compute, "
             f"attention backend '{self.backend.name}', layout {self.dims.describe()}, device {self.device.type}, "
             f"{len(self.checkpointed)}/{cfg.model.n_layers} blocks recomputed, "
             f"{'compiled' if self.compiled else 'eager'} element-wise ops")
        start = self.resume()
        if self.rank == 0:
            cfg.run_path.mkdir(parents=True, exist_ok=True)
            (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
        writer = MetricsWriter(cfg.run_path, start, cfg.train.max_steps, cfg.train.log_every) if self.rank == 0 else None
        stop_at = cfg.train.max_steps if not cfg.train.run_steps else min(cfg.train.max_steps, start + cfg.train.run_steps)
        losses = []
        try:
            while self.progress.step < stop_at:
                t0 = time.perf_counter()
                self.loader.wait_s = 0.0
                batches = self.loader.next_step()
                with collective_guard(self.rank, f"step {self.progress.step + 1}", cfg.cluster.timeout_s):
                    result = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                self.progress.step += 1
                self.ledger.record(self.progress.step, self.loader.step_pieces)
                losses.append(result["loss"])
                flops_per_device = result["flops"] / dist.get_world_size()
                record = {
                    "step": self.progress.step, "loss": result["loss"], "tokens": result["tokens"],
                    "tokens_per_s": result["tokens"] / elapsed,
                    "mfu": flops_per_device / elapsed / (self.peak * 1e12) if self.peak else None,
                    "peak_mem_gb": peak_memory_gb(self.device), "data_wait_frac": self.loader.wait_s / elapsed,
                    "lr": result["lr"], "grad_norm": result["grad_norm"], "step_time_s": elapsed,
                    **{k: result[k] for k in ("sp_groups", "predicted_s", "solve_s", "plan_gap") if k in result},
                }
                if writer:
                    writer.write(record)
                with collective_guard(self.rank, f"the checkpoint of step {self.progress.step}", cfg.cluster.timeout_s):
                    self.checkpointer.wait()  # an async save started last step is finalised here
                    if self.progress.step % cfg.checkpoint.every == 0 or self.progress.step == stop_at:
                        self.save()
                if on_step:
                    on_step(self.progress.step)
            self.checkpointer.wait()
        finally:
            self.loader.close()
            if self.adaptive:
                self.adaptive.close()
            if writer:
                writer.close()
        plot = plot_loss(cfg.run_path) if self.rank == 0 and losses else None
        return {"start_step": start, "step": self.progress.step, "max_steps": cfg.train.max_steps,
                "losses": losses, "loss_plot": str(plot) if plot else None}


def full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (the loss under tensor parallelism), a plain tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def pad_to(batch: PackedBatch, mixers: Mixers, length: int) -> tuple[PackedBatch, Mixers]:
    """Pads the token stream to `length` with label-less tokens; mixing sees the real rows only."""
    pad = length - batch.num_tokens
    if pad == 0:
        return batch, mixers
    n = batch.num_tokens
    extend = lambda t, value: torch.cat([t, t.new_full((pad,), value)])  # noqa: E731
    padded = PackedBatch(extend(batch.tokens, 0), extend(batch.labels, IGNORE), extend(batch.positions, 0),
                         batch.cu_seqlens, batch.max_seqlen, batch.pieces, real_tokens=n)

    def strip(fn):
        if fn is None:
            return None

        def mix(q, k, v, *rest):
            out = fn(q[:n], k[:n], v[:n], *rest)
            return torch.cat([out, out.new_zeros((pad, *out.shape[1:]))])
        return mix

    return padded, Mixers(strip(mixers.softmax), strip(mixers.linear))


def checkpoint_count(cfg: JobConfig, dims: ParallelDims, device: torch.device) -> int:
    """How many blocks recompute their activations: the configured count, or for `auto` the fewest
    that let one micro-batch's share of this rank (tokens / sp) fit the device's memory."""
    setting, n = cfg.train.activation_checkpointing, cfg.model.n_layers
    if isinstance(setting, bool):
        return n if setting else 0
    if isinstance(setting, int):
        return setting
    cost = CostModel(cfg.model, device_profile(cfg.cluster.profile, device), loss_chunk=cfg.train.loss_chunk)
    return cost.blocks_to_checkpoint(cfg.data.tokens_per_microbatch // dims.sp, dims.dp * dims.sp)


def adaptive_budget(cfg: JobConfig, device: torch.device) -> tuple[CostModel, int]:
    """The cost model of adaptive SP and each rank's activation budget in tokens."""
    cost = CostModel(cfg.model, hardware_profile(cfg.cluster.profile, device_name(device)), method=cfg.parallel.sp.method)
    budget = cfg.parallel.sp.tokens_per_gpu or cost.tokens_per_gpu(cfg.cluster.workers, unsharded_copy=True)
    return cost, budget


def train(cfg: JobConfig) -> dict[str, Any]:
    """Entry point of every worker."""
    return Trainer(cfg).fit()
