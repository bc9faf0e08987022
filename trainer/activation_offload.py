"""Recomputed blocks' inputs in host memory (`train.offload_activations`).

A recomputed block keeps only its input for backward (dim × 2 bytes per token); over many blocks
and long sequences that is most of what activation checkpointing leaves on the GPU. With this, the
input a checkpointed block saves goes to pinned host memory, copied on a side stream while the
forward goes on, and comes back on the compute stream when the block's backward recomputes it;
nothing else the block saves is touched (kept attention outputs stay). The hooks sit on the
checkpoint wrapper's forward, so the recompute in backward, which calls the wrapped block itself,
saves nothing again. On a CPU the "host copy" is a clone: the same code path, no memory saved.
Whether the inputs fit the host next to AdamW's moments is decided with the job (`trainer.job`).
"""

from __future__ import annotations

import torch
from torch import nn


class InputOffload:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.moved = 0  # inputs sent to the host so far

    def attach(self, wrapped: nn.Module) -> None:
        """Offloads the input a checkpoint-wrapped block saves in each forward."""
        def start(module: nn.Module, args: tuple) -> None:
            module._input_offload = torch.autograd.graph.saved_tensors_hooks(self._packer(args[0]), self._unpack)
            module._input_offload.__enter__()

        def end(module: nn.Module, args: tuple, output) -> None:
            module._input_offload.__exit__(None, None, None)
            del module._input_offload

        wrapped.register_forward_pre_hook(start)
        wrapped.register_forward_hook(end)

    def _packer(self, x: torch.Tensor):
        # (the hook lives as long as what it packed: it must not hold the input itself, or the input
        # would stay on the GPU until its backward)
        pointer, shape = x.data_ptr(), x.shape

        def pack(t: torch.Tensor):
            if t.data_ptr() != pointer or t.shape != shape or t.numel() == 0:
                return t
            self.moved += 1
            if not self.cuda:
                return ("host", t.detach().clone(), None)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            t.record_stream(self.stream)  # its memory is not reused before the copy is done
            return ("host", host, copied)
        return pack

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "host"):
            return packed
        _, host, copied = packed
        if not self.cuda:
            return host
        torch.cuda.current_stream(self.device).wait_event(copied)
        return host.to(self.device, non_blocking=True)
