"""AdamW whose two moments live in host memory (`optim.offload`): 8 of the 16 bytes per parameter
that a GPU holds for mixed-precision AdamW move off it.

The fp32 weights and gradients stay on the GPU. A step streams the moments through it in buckets of
`bucket_bytes`: each bucket is copied to the GPU on one stream, updated there by the same AdamW
kernel a GPU-resident optimizer runs (so the weights come out bit for bit the same), and copied back
on another, overlapping the next bucket's copy in (PCIe moves both directions at once); at most
three buckets' copies are on the GPU at once. The moments are one flat page-locked buffer per
optimizer (pinned without the rounding up of torch's pinned allocator), viewed per parameter as the
parameter's own kind of tensor — a DTensor of the same mesh and placements under FSDP — so DCP
saves and reshards them like any optimizer state. Loading a checkpoint copies them straight into
that buffer, never all onto the GPU. On a CPU the same code runs without copies.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Iterator

import torch
from torch.optim.adamw import adamw
from torch.distributed.tensor import DTensor

from parallel.planner.cost_model import HOST_RESERVE

MOMENTS = ("exp_avg", "exp_avg_sq")
BUCKET_BYTES = 1 << 30  # moments of one bucket (both together)


class HostMemoryError(RuntimeError):
    """The moments do not fit the host's memory; one line."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` as the same kind of tensor as `param` (a DTensor of its mesh and placements), left
    where it is: `DTensor.from_local` would copy a host tensor to the mesh's device (FSDP's CPU
    offload builds its host DTensors the same way)."""
    if isinstance(param, DTensor):
        return DTensor(local, param._spec, requires_grad=False)
    return local


def host_memory_bytes() -> int:
    """The host's physical memory: what every rank of it compares its share of a host-wide need
    with (free memory would count the ranks that allocated first twice)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_memory(setting: str, need: float, what: str, fixes: str) -> None:
    """One line, before anything is allocated, where a host-wide need exceeds 80% of the host."""
    if need > HOST_RESERVE * host_memory_bytes():
        raise HostMemoryError(f"{setting} puts {need / 2**30:.1f} GB of {what} in host memory, more than "
                              f"{100 * HOST_RESERVE:.0f}% of the "
                              f"host's {host_memory_bytes() / 2**30:.1f} GB: set {setting}=false, {fixes}")


class HostAdamW(torch.optim.AdamW):
    def __init__(self, params, bucket_bytes: int = BUCKET_BYTES, local_ranks: int = 1, **kwargs):
        super().__init__(params, **kwargs)
        self.bucket_bytes = bucket_bytes
        params = [p for g in self.param_groups for p in g["params"]]
        self.device = _local(params[0]).device
        self.cuda = self.device.type == "cuda"
        offsets, total = {}, 0
        for p in params:
            offsets[p] = total
            total += 2 * _local(p).numel()
        check_host_memory("optim.offload", total * 4 * local_ranks, f"AdamW moments ({local_ranks} ranks of this host)",
                          "shard the weights over more GPUs or use hosts with more memory")
        self.flat = torch.zeros(total, dtype=torch.float32)
        if self.cuda and self.flat.numel():
            # page-locked in place: no rounding up, copies run asynchronously at PCIe speed (pageable if refused)
            cudart = torch.cuda.cudart()
            if int(cudart.cudaHostRegister(self.flat.data_ptr(), self.flat.numel() * 4, 0)) == 0:
                weakref.finalize(self, cudart.cudaHostUnregister, self.flat.data_ptr())
        self.offsets = offsets
        self.copy_in = torch.cuda.Stream(self.device) if self.cuda else None
        self.copy_out = torch.cuda.Stream(self.device) if self.cuda else None

    def _host(self, p: torch.Tensor, key: str) -> torch.Tensor:
        local = _local(p)
        start = self.offsets[p] + MOMENTS.index(key) * local.numel()
        return _like(p, self.flat[start:start + local.numel()].view(local.shape))

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.device if self.defaults["fused"] else "cpu")
            for key in MOMENTS:
                state[key] = self._host(p, key)
        return state

    def _buckets(self, params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        bucket, size = [], 0
        for p in params:
            bucket.append(p)
            size += 8 * _local(p).numel()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        in_flight: deque = deque()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in self._buckets(params):
                states = [self._state(p) for p in bucket]
                hosts = [[_local(s[key]) for s in states] for key in MOMENTS]
                moments = [self._fetch(h) for h in hosts]
                beta1, beta2 = group["betas"]
                adamw(
                    [_local(p) for p in bucket], [_local(p.grad) for p in bucket], *moments, [],
                    [s["step"] for s in states], foreach=False, capturable=False, differentiable=False,
                    fused=group["fused"], grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=False)
                in_flight.append(self._return([x for h in hosts for x in h], [x for m in moments for x in m]))
                if len(in_flight) > 2:
                    in_flight.popleft().synchronize()
        if self.cuda:
            self.copy_out.synchronize()  # the moments are home before anything reads or saves them
        return loss

    def _fetch(self, hosts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The moments of a bucket on the GPU, copied on `copy_in` (the host tensors themselves on a CPU)."""
        if not self.cuda:
            return hosts
        compute = torch.cuda.current_stream(self.device)
        moved = [torch.empty_like(h, device=self.device) for h in hosts]
        self.copy_in.wait_stream(compute)
        with torch.cuda.stream(self.copy_in):
            for dst, src in zip(moved, hosts):
                dst.copy_(src, non_blocking=True)
        compute.wait_stream(self.copy_in)
        return moved

    def _return(self, hosts: list[torch.Tensor], moved: list[torch.Tensor]):
        """Copies a bucket's updated moments home on `copy_out`; an event to wait for them."""
        if not self.cuda:
            return _Done()
        self.copy_out.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_out):
            for dst, src in zip(hosts, moved):
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.copy_out)
            done = torch.cuda.Event()
            done.record()
        return done

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader would move every moment to its parameter's device at once: the moments are
        taken out first and copied straight into the host buffer."""
        moments = {i: {k: v for k, v in s.items() if k in MOMENTS} for i, s in state_dict["state"].items()}
        rest = {i: {k: v for k, v in s.items() if k not in MOMENTS} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in moments.get(i, {}).items():
                host = self._host(p, key)
                _local(host).copy_(_local(value))
                self.state[p][key] = host


class _Done:
    def synchronize(self) -> None:
        """Nothing to wait for on a CPU."""
