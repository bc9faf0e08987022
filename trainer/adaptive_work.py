"""A step's work under adaptive sequence parallelism.

Every rank reads the whole step (all `global_microbatches` sampler micro-batches). Rank 0 plans
how the step's sequences split over SP groups — one grouping for the step, or one per round of
micro-batches (a rank then runs its groups in round order) (`parallel.planner.adaptive`) — the plan for step
t+1 is solved in a separate, torch-free process while step t trains — and broadcasts it; each
rank then repacks its group's sequences into micro-batches and runs them with that group's SP
(a one-rank group runs plain attention). A rank that no group uses in the first or the last round
runs a one-token micro-batch there that adds nothing, so that every rank joins the step's FSDP
collectives in step with the others.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from parallel.attention import AttentionBackend, LocalAttention
from parallel.mesh import ParallelDims
from parallel.planner.adaptive import Plan, SequenceTooLong, solve_or_explain, trainer_planner
from parallel.planner.cost_model import CostModel
from parallel.sequence_parallel import SequenceParallelAttention, make_layout
from trainer.config import JobConfig
from trainer.loader import PackedBatch
from trainer.loss import IGNORE
from trainer.work import StepWork, local_mixers

Sequence = tuple[int, int]  # (micro-batch of the step, document inside it)


def step_sequences(batches: list[PackedBatch]) -> tuple[list[Sequence], list[int]]:
    refs, lengths = [], []
    for j, b in enumerate(batches):
        for d, n in enumerate(b.doc_lengths()):
            refs.append((j, d))
            lengths.append(n)
    return refs, lengths


def repack(batches: list[PackedBatch], refs: list[Sequence]) -> PackedBatch:
    """One packed micro-batch of the given documents, cut out of the step's micro-batches."""
    parts = []
    for j, d in refs:
        b = batches[j]
        lo, hi = int(b.cu_seqlens[d]), int(b.cu_seqlens[d + 1])
        parts.append((b.tokens[lo:hi], b.labels[lo:hi], b.positions[lo:hi], b.pieces[d]))
    lengths = [p[0].numel() for p in parts]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=parts[0][0].device)
    return PackedBatch(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                       torch.cat([p[2] for p in parts]), cu, max(lengths), [p[3] for p in parts])


def idle_batch(device: torch.device) -> PackedBatch:
    """A one-token micro-batch with no label: it runs the model (and FSDP's hooks) and adds nothing."""
    one = torch.zeros(1, dtype=torch.int64, device=device)
    return PackedBatch(one, torch.full_like(one, IGNORE), one.clone(),
                       torch.tensor([0, 1], dtype=torch.int32, device=device), 1, [])


class AdaptiveWork:
    def __init__(self, cfg: JobConfig, dims: ParallelDims, backend: AttentionBackend, device: torch.device,
                 cost: CostModel, tokens_per_gpu: int, peek_next: Callable[[], list[PackedBatch]]):
        pool = dims.pool()
        self.cfg, self.dims, self.backend, self.device, self.peek_next = cfg, dims, backend, device, peek_next
        self.pool_rank = pool.index(dist.get_rank())
        solver_time_s = cfg.parallel.sp.solver_time_s
        self.planner = trainer_planner(cost, len(pool), dims.layout.sp, tokens_per_gpu, solver_time_s,
                                       cfg.parallel.sp.regroup, cfg.parallel.sp.group_sizes)
        self._pending: cf.Future | None = None
        self._solver: cf.ProcessPoolExecutor | None = None
        if dist.get_rank() == 0 and solver_time_s > 0:
            self._solver = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))

    def plan(self, batches: list[PackedBatch]) -> Plan:
        """This step's plan (solved while the last step ran), shared by rank 0 with every rank."""
        box: list = [None]
        if dist.get_rank() == 0:
            box[0] = (self._pending.result() if self._pending is not None
                      else solve_or_explain(self.planner, step_sequences(batches)[1]))
            self._pending = None
            if self._solver is not None and not isinstance(box[0], str):
                self._pending = self._solver.submit(solve_or_explain, self.planner,
                                                    step_sequences(self.peek_next())[1])
        dist.broadcast_object_list(box, src=0, group=self.dims.control_group)
        if isinstance(box[0], str):
            raise SequenceTooLong(box[0])
        return box[0]

    def __call__(self, batches: list[PackedBatch]) -> StepWork:
        plan = self.plan(batches)
        step = [b.to(self.device) for b in batches]
        predicted = plan.predicted_s + self.planner.cost.step_fixed_time(len(self.dims.pool()))
        info = {"sp_groups": plan.describe(), "predicted_s": predicted, "solve_s": plan.solve_s,
                "plan_gap": plan.gap, "solver": plan.solver}
        labels = float(sum(b.num_labels() for b in batches))
        self.dims.add_slices(sorted({(g.start, g.size) for g in plan.groups if g.size > 1}))
        mine = [g for g in plan.groups_of(self.pool_rank) if g.microbatches]
        refs, _ = step_sequences(step)
        items, flops = [], 0.0
        # Every rank's first micro-batch runs in the first round and its last in the last: FSDP gathers
        # the weights (over all ranks) during each rank's first forward and reduces the gradients during
        # its last backward, layer by layer between the group's own exchanges, so those must line up.
        if not mine or mine[0].round != 0:
            items.append(self.idle())
        window = self.cfg.model.window
        for group in mine:  # in round order: a group's ranks all reach it after their earlier rounds
            for mb in group.microbatches:
                packed = repack(step, [refs[i] for i in mb])
                flops += self.cfg.model.shape.model_flops(packed.doc_lengths()) / group.size
                if group.size == 1:
                    items.append((packed, local_mixers(self.cfg, self.backend, packed)))
                    continue
                groups = self.dims.slice_sp_groups(group.start, group.size)
                layout = make_layout(packed.doc_lengths(), groups, window=window, device=self.device)
                idx = torch.from_numpy(layout.indices(groups.rank)).to(self.device)
                local = PackedBatch(packed.tokens[idx], packed.labels[idx], packed.positions[idx], packed.cu_seqlens,
                                    packed.max_seqlen, packed.pieces)
                items.append((local, SequenceParallelAttention(layout, groups, self.backend)))
        if plan.rounds > 1 and (not mine or mine[-1].round != plan.rounds - 1):
            items.append(self.idle())
        return StepWork(items, labels, flops, info)

    def idle(self) -> tuple[PackedBatch, LocalAttention]:
        batch = idle_batch(self.device)
        return batch, LocalAttention(self.backend, batch.cu_seqlens, 1)

    def close(self) -> None:
        if self._solver is not None:
            self._solver.shutdown(cancel_futures=True)
