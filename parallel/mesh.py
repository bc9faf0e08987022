"""A worker's device mesh and process groups for a parallel layout (`parallel.layout`).

Mesh order, outer → inner: pp, dp, sp, tp, with sp itself split into ring × ulysses, so that tp
and Ulysses ranks are neighbours (inside one node) and the ring spans the rest. FSDP shards over dp × sp (SP ranks hold replicas of the
weights). Nothing else in Loom calls `new_group`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.layout import Layout
from parallel.sequence_parallel import SPGroups


class ParallelDims:
    """A worker's mesh and process groups for a layout (built on every rank, collectively)."""

    def __init__(self, layout: Layout, device: torch.device):
        if dist.get_world_size() != layout.world:
            raise RuntimeError(f"layout expects {layout.world} ranks, the process group has {dist.get_world_size()}")
        self.layout = layout
        shape = (layout.pp, layout.dp, layout.ring, layout.ulysses, layout.tp)
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp", "ring", "ulysses", "tp"))
        self.fsdp_mesh = self.mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
        self.checkpoint_group = dist.new_group(backend="gloo")
        self.control_group = dist.new_group(backend="gloo")
        self.slice_groups: dict[tuple[int, int], dist.ProcessGroup | None] = {}  # adaptive: (start, size) → group
        self.ring_reverse_group = None
        if layout.ring > 1:  # a second communicator per ring, so the two directions never queue behind each other
            ranks = self.mesh.mesh.movedim(2, -1).reshape(-1, layout.ring)
            for ring_ranks in ranks.tolist():
                group = dist.new_group(ring_ranks)
                if dist.get_rank() in ring_ranks:
                    self.ring_reverse_group = group

    def pool(self) -> list[int]:
        """Global ranks of the data × sequence parallel ranks, in mesh order (adaptive groups slice it)."""
        return self.fsdp_mesh.mesh.flatten().tolist()

    def coordinate(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def tp_rank(self) -> int:
        return self.coordinate("tp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def sp_rank(self) -> int:
        return self.coordinate("ring") * self.layout.ulysses + self.coordinate("ulysses")

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh[dim].get_group()

    def sp_groups(self) -> SPGroups:
        layout = self.layout
        return SPGroups(layout.ring, layout.ulysses, self.coordinate("ring"), self.coordinate("ulysses"),
                        self.group("ring"), self.ring_reverse_group, self.group("ulysses"),
                        bidirectional=layout.sp_method == "ring_bidir")

    def add_slices(self, slices: list[tuple[int, int]]) -> None:
        """Creates the process groups of the pool's slices (start, size) not made yet, each once, on
        every rank in one order (collective: every rank passes the same list, as in a broadcast plan)."""
        pool, me = self.pool(), dist.get_rank()
        for start, size in slices:
            if (start, size) not in self.slice_groups:
                group = dist.new_group(pool[start: start + size])
                self.slice_groups[start, size] = group if me in pool[start: start + size] else None

    def slice_sp_groups(self, start: int, size: int) -> SPGroups:
        """SP groups of an adaptive group: the pool's ranks start … start + size − 1."""
        pg = self.slice_groups[start, size]
        rank = self.pool().index(dist.get_rank()) - start
        if self.layout.sp_method == "ulysses":
            return SPGroups(1, size, 0, rank, None, None, pg)
        return SPGroups(size, 1, rank, 0, pg, None, None)
