"""`ParallelDims`: the parallel layout (pp × dp × sp × tp), its validation and its process groups.

One object validates a layout against the world size and the model before any worker starts,
and builds the device mesh once per worker. Mesh order, outer → inner: pp, dp, sp, tp, with sp
itself split into ring × ulysses, so that tp and Ulysses ranks are neighbours (inside one node)
and the ring spans the rest. FSDP shards over dp × sp (SP ranks hold replicas of the weights).
Nothing else in Loom calls `new_group`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.sequence_parallel import SPGroups, split_degree
from parallel.ulysses import check_heads
from trainer.config import ConfigError, JobConfig

def auto_ulysses(degree: int, n_heads: int, n_kv_heads: int, tp: int) -> int:
    """The largest Ulysses size < degree that divides it and fits the heads (1 if none)."""
    for u in range(degree - 1, 1, -1):
        if degree % u == 0 and n_heads % (u * tp) == 0 and (n_kv_heads % u == 0 or u % n_kv_heads == 0):
            return u
    return 1


@dataclass
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1
    ring: int = 1
    ulysses: int = 1
    sp_method: str = "ring"
    adaptive: bool = False  # sp.mode=adaptive: every step regroups all ranks into groups of ≤ sp ranks
    mesh: DeviceMesh | None = field(default=None, repr=False)
    fsdp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp × sp flattened
    checkpoint_group: dist.ProcessGroup | None = field(default=None, repr=False)
    control_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_reverse_group: dist.ProcessGroup | None = field(default=None, repr=False)
    slice_groups: dict = field(default_factory=dict, repr=False)  # (start, size) → group, adaptive mode

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.sp * self.tp

    @classmethod
    def from_config(cls, cfg: JobConfig, world: int | None = None) -> "ParallelDims":
        """Resolves dp = -1 and validates the whole layout; raises ConfigError with one line."""
        p, m = cfg.parallel, cfg.model
        world = cfg.cluster.workers if world is None else world
        for name, degree in (("tp", p.tp), ("pp", p.pp), ("sp.degree", p.sp.degree)):
            if degree < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {degree}")
        inner = p.pp * p.tp * p.sp.degree
        if world % inner:
            raise ConfigError(f"{world} workers cannot hold pp={p.pp} × tp={p.tp} × sp={p.sp.degree}")
        dp = world // inner if p.dp == -1 else p.dp
        if dp < 1 or dp * inner != world:
            raise ConfigError(f"layout dp={dp} × pp={p.pp} × tp={p.tp} × sp={p.sp.degree} "
                              f"does not multiply to {world} workers")
        ulysses = p.sp.ulysses or auto_ulysses(p.sp.degree, m.n_heads, m.n_kv_heads, p.tp)
        try:
            ring, ulysses = split_degree(p.sp.method, p.sp.degree, ulysses)
            if ulysses > 1:
                check_heads(m.n_heads, m.n_kv_heads, ulysses)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        adaptive = p.sp.mode == "adaptive"
        if adaptive:
            if p.sp.degree & (p.sp.degree - 1) or p.sp.method not in ("ring", "ulysses"):
                raise ConfigError("adaptive SP needs a power-of-two parallel.sp.degree (the largest group) "
                                  "and parallel.sp.method ring or ulysses")
            if p.pp * p.tp > 1:
                raise ConfigError("adaptive SP with tp or pp > 1 is not supported in this version of Loom")
        dims = cls(dp=dp, pp=p.pp, tp=p.tp, ring=ring, ulysses=ulysses, sp_method=p.sp.method, adaptive=adaptive)
        dims.check_model(cfg)
        if cfg.train.global_microbatches % dp and not adaptive:
            raise ConfigError(f"train.global_microbatches={cfg.train.global_microbatches} "
                              f"is not divisible by dp={dp}")
        return dims

    def check_model(self, cfg: JobConfig) -> None:
        m, p = cfg.model, cfg.parallel
        stages = self.pp * (p.pp_virtual if self.pp > 1 else 1)
        if self.pp > 1:
            if m.n_layers % stages:
                raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by pp × pp_virtual = {stages} stages")
            microbatches = cfg.train.global_microbatches // max(1, self.dp)
            if microbatches < self.pp or (p.pp_schedule == "interleaved_1f1b" and microbatches % self.pp):
                raise ConfigError(f"pp={self.pp} needs at least pp micro-batches per data-parallel rank "
                                  f"(a multiple of pp for interleaved 1F1B); train.global_microbatches / dp = "
                                  f"{microbatches}")
            if self.adaptive:
                raise ConfigError("adaptive SP with pp > 1 is not supported")
        if m.n_heads % (self.tp * self.ulysses):
            raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by tp × ulysses = {self.tp * self.ulysses}")
        if m.n_kv_heads % self.tp:
            raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} is not divisible by tp={self.tp}")

    def build(self, device: torch.device) -> "ParallelDims":
        """Creates the device mesh and every process group (call once per worker, on every rank)."""
        if dist.get_world_size() != self.world:
            raise RuntimeError(f"layout expects {self.world} ranks, the process group has {dist.get_world_size()}")
        shape = (self.pp, self.dp, self.ring, self.ulysses, self.tp)
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp", "ring", "ulysses", "tp"))
        self.fsdp_mesh = self.mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
        self.checkpoint_group = dist.new_group(backend="gloo")
        self.control_group = dist.new_group(backend="gloo")
        if self.adaptive:  # every aligned power-of-two slice of the ranks, created once
            pool = self.pool()
            size = 2
            while size <= self.sp:
                for start in range(0, len(pool), size):
                    group = dist.new_group(pool[start: start + size])
                    if dist.get_rank() in pool[start: start + size]:
                        self.slice_groups[start, size] = group
                size *= 2
        if self.ring > 1:  # a second communicator per ring, so the two directions never queue behind each other
            ranks = self.mesh.mesh.movedim(2, -1).reshape(-1, self.ring)
            for ring_ranks in ranks.tolist():
                group = dist.new_group(ring_ranks)
                if dist.get_rank() in ring_ranks:
                    self.ring_reverse_group = group
        return self

    def pool(self) -> list[int]:
        """Global ranks of the data × sequence parallel ranks, in mesh order (adaptive groups slice it)."""
        return self.fsdp_mesh.mesh.flatten().tolist()

    def describe(self) -> str:
        if self.adaptive:
            return f"adaptive SP over {self.dp * self.sp} ranks (groups of 1–{self.sp}, {self.sp_method})"
        sp = f"sp={self.sp} ({self.sp_method}" + (f", ring {self.ring} × ulysses {self.ulysses})"
                                                  if self.sp_method == "hybrid" else ")")
        return " × ".join(p for p in (f"dp={self.dp}", f"tp={self.tp}" if self.tp > 1 else "",
                                      f"pp={self.pp}" if self.pp > 1 else "", sp if self.sp > 1 else "") if p)

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def sp_rank(self) -> int:
        return self.mesh["ring"].get_local_rank() * self.ulysses + self.mesh["ulysses"].get_local_rank()

    def sp_groups(self) -> SPGroups:
        return SPGroups(self.ring, self.ulysses, self.mesh["ring"].get_local_rank(),
                        self.mesh["ulysses"].get_local_rank(), self.mesh["ring"].get_group(),
                        self.ring_reverse_group, self.mesh["ulysses"].get_group(),
                        bidirectional=self.sp_method == "ring_bidir")
