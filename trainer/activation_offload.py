"""Recomputed blocks' inputs in host memory (`train.offload_activations`).

A recomputed block keeps only its input for backward (dim × 2 bytes per token); over many blocks
and long sequences that is most of what activation checkpointing leaves on the GPU. With this, the
input a checkpointed block saves goes to pinned host memory, copied on a side stream while the
forward goes on. In backward the blocks of a forward come back last first: when one block's
recompute takes its input, the copy back of the input the same forward saved just before (the
previous offloaded block of the same model part, same micro-batch) starts on the side stream, so
it travels while this block runs its backward, and at most one input waits on the GPU ahead of its
block. Nothing else the
block saves is touched (kept attention outputs stay). The hooks sit on the checkpoint wrapper's
forward, so the recompute in backward, which calls the wrapped block itself, saves nothing again.
On a CPU the "host copy" is a clone: the same code path, no memory saved and nothing prefetched.
Whether the inputs fit the host next to AdamW's moments is decided with the job (`trainer.job`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class HostCopy:
    """One offloaded input: its host copy, the event of the copy out, the copy its forward made
    just before (held weakly: a graph freed without its backward frees its copies), and, once
    started, its copy back to the device with that copy's event."""
    __slots__ = ("host", "copied", "before", "device_copy", "arrived", "__weakref__")

    def __init__(self, host: torch.Tensor, copied: torch.cuda.Event | None, before: weakref.ref | None):
        self.host, self.copied, self.before = host, copied, before
        self.device_copy: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


class InputOffload:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.moved = 0  # inputs sent to the host so far
        self.prefetched = 0  # inputs whose copy back started before their block's backward asked for them
        self.newest: dict[nn.Module, weakref.ref[HostCopy]] = {}  # each block's latest copy

    def attach(self, wrapped: nn.Module, previous: nn.Module | None = None) -> None:
        """Offloads the input a checkpoint-wrapped block saves in each forward; `previous` is the
        offloaded block that runs just before it in the same model part (None for the first)."""
        def start(module: nn.Module, args: tuple) -> None:
            before = self.newest.get(previous) if previous is not None else None
            module._input_offload = torch.autograd.graph.saved_tensors_hooks(
                self._packer(args[0], module, before), self._unpack)
            module._input_offload.__enter__()

        def end(module: nn.Module, args: tuple, output) -> None:
            module._input_offload.__exit__(None, None, None)
            del module._input_offload

        wrapped.register_forward_pre_hook(start)
        wrapped.register_forward_hook(end)

    def _packer(self, x: torch.Tensor, module: nn.Module, before: weakref.ref | None):
        # (the hook lives as long as what it packed: it must not hold the input itself, or the input
        # would stay on the GPU until its backward)
        pointer, shape = x.data_ptr(), x.shape

        def pack(t: torch.Tensor):
            if t.data_ptr() != pointer or t.shape != shape or t.numel() == 0:
                return t
            self.moved += 1
            if not self.cuda:
                entry = HostCopy(t.detach().clone(), None, before)
            else:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(t, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                t.record_stream(self.stream)  # its memory is not reused before the copy is done
                entry = HostCopy(host, copied, before)
            self.newest[module] = weakref.ref(entry)
            return ("host", entry)
        return pack

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "host"):
            return packed
        entry: HostCopy = packed[1]
        if entry.device_copy is None:
            self._copy_back(entry)
        else:
            self.prefetched += 1
        tensor, entry.device_copy = entry.device_copy, None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(entry.arrived)
        earlier = entry.before() if entry.before is not None else None
        if earlier is not None:  # the next input this forward's backward asks for
            self._copy_back(earlier)
        return tensor

    def _copy_back(self, entry: HostCopy) -> None:
        """Starts the copy of `entry` back to the device, on the side stream (on a CPU the clone is
        the copy)."""
        if entry.device_copy is not None:
            return
        if not self.cuda:
            entry.device_copy = entry.host
            return
        # allocated from the compute stream's memory, which uses and frees it; written on the side stream
        # once what the compute stream queued before (a previous user of that memory) is done
        compute = torch.cuda.current_stream(self.device)
        entry.device_copy = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(entry.copied)
            entry.device_copy.copy_(entry.host, non_blocking=True)
            entry.arrived = torch.cuda.Event()
            entry.arrived.record()
        entry.device_copy.record_stream(self.stream)
