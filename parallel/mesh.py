"""`ParallelDims`: the parallel layout (pp × dp × sp × tp), its validation and its process groups.

One object validates a layout against the world size and the model before any worker starts,
and builds the device mesh once per worker. Mesh order, outer → inner: pp, dp, sp, tp, so that
tp and sp ranks are neighbours (inside one node). Nothing else in Loom calls `new_group`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError, JobConfig

IMPLEMENTED = {"tp": 1, "pp": 1, "sp": 1}  # degrees above these are not built yet


@dataclass
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1
    sp: int = 1
    world: int = 0
    mesh: DeviceMesh | None = field(default=None, repr=False)
    checkpoint_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: JobConfig, world: int | None = None) -> "ParallelDims":
        """Resolves dp = -1 and validates the whole layout; raises ConfigError with one line."""
        p = cfg.parallel
        world = cfg.cluster.workers if world is None else world
        inner = p.pp * p.tp * p.sp.degree
        for name, degree in (("tp", p.tp), ("pp", p.pp), ("sp.degree", p.sp.degree)):
            if degree < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {degree}")
        if world % inner:
            raise ConfigError(f"{world} workers cannot hold pp={p.pp} × tp={p.tp} × sp={p.sp.degree}")
        dp = world // inner if p.dp == -1 else p.dp
        if dp < 1 or dp * inner != world:
            raise ConfigError(f"layout dp={dp} × pp={p.pp} × tp={p.tp} × sp={p.sp.degree} "
                              f"does not multiply to {world} workers")
        dims = cls(dp=dp, pp=p.pp, tp=p.tp, sp=p.sp.degree, world=world)
        dims.check_model(cfg)
        if cfg.train.global_microbatches % dp:
            raise ConfigError(f"train.global_microbatches={cfg.train.global_microbatches} "
                              f"is not divisible by dp={dp}")
        for name, limit in IMPLEMENTED.items():
            if getattr(dims, name) > limit:
                raise ConfigError(f"parallel.{name}={getattr(dims, name)} is not supported in this version of Loom")
        return dims

    def check_model(self, cfg: JobConfig) -> None:
        m = cfg.model
        if m.n_heads % self.tp:
            raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by tp={self.tp}")
        if m.n_layers % self.pp:
            raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by pp={self.pp}")
        if m.n_kv_heads % self.tp and self.tp % m.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} and tp={self.tp}: one must divide the other")

    def build(self, device: torch.device) -> "ParallelDims":
        """Creates the device mesh and every process group (call once per worker)."""
        if dist.get_world_size() != self.world:
            raise RuntimeError(f"layout expects {self.world} ranks, the process group has {dist.get_world_size()}")
        shape = (self.pp, self.dp, self.sp, self.tp)
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp", "sp", "tp"))
        self.checkpoint_group = dist.new_group(backend="gloo")
        return self

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()
