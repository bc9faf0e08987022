"""Kept attention outputs, SwiGLU tiles and offloaded inputs on CUDA (cuDNN and flash varlen
kernels, bf16 autocast) against plain recomputation: the same loss and gradients, no attention
kernel run again in backward, inputs back one block ahead (skipped without CUDA).

Tolerance: the kept output is the one the plain recompute computes again with the same
deterministic forward kernel, so untiled the loss agrees to 1e-6 relative and the gradients to a
relative L2 error of 1e-3; tiled, bf16 matmuls over 1,024-row tiles round differently from one
call over all rows: 5e-3 on the loss, 2e-2 on the gradients (METHOD.md's bf16 range). Offloaded
inputs run the math attention, whose backward has no atomics: 1e-5 on the gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from parallel.attention import LocalAttention, select_backend
from tests.test_model import KernelCalls
from trainer.config import ModelConfig
from trainer.model import Transformer
from trainer.parallelize import apply_activation_checkpointing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_batch(lengths: list[int], vocab: int, backend: str = "cudnn"):
    """Random tokens of packed documents of these lengths, their positions and their attention
    (cudnn: documents of 2,048 tokens or more through cuDNN, the rest through the varlen kernel)."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    tokens = torch.randint(0, vocab, (sum(lengths),), device="cuda")
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    return tokens, positions, LocalAttention(select_backend(backend, "cuda", dense_min=2048), cu, max(lengths),
                                             lengths=lengths)


@pytest.mark.parametrize("tile", [0, 1024])
def test_kept_attention_on_cuda_equals_recomputing_it(tile):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64)
    with torch.device("cuda"):
        plain = Transformer(cfg)
    kept = copy.deepcopy(plain)
    for block in kept.layers.values():
        block.mlp_tile = tile
    apply_activation_checkpointing(plain, {0, 1, 2}, keep_attention=False)
    apply_activation_checkpointing(kept, {0, 1, 2}, keep_attention=True)
    # two documents through cuDNN, two through the varlen kernel
    tokens, positions, attend = packed_batch([3000, 2048, 900, 148], cfg.vocab_size)
    losses, calls = [], []
    for model in (plain, kept):
        with KernelCalls() as counted, torch.autocast("cuda", torch.bfloat16):
            loss = model(tokens, positions, attend, tokens)
            loss.backward()
        losses.append(loss.detach().float())
        calls.append(counted.calls)
    loss_tol, grad_tol = (5e-3, 2e-2) if tile else (1e-6, 1e-3)
    torch.testing.assert_close(losses[1], losses[0], rtol=loss_tol, atol=0)
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        err = ((b.grad - a.grad).norm() / a.grad.norm()).item()
        assert err < grad_tol, (name, err)
    per_forward = calls[1]
    assert calls[0] == 2 * per_forward and per_forward >= 2 * cfg.n_layers  # plain ran each kernel twice


def test_offloaded_inputs_on_cuda_come_back_prefetched_and_equal():
    """Recomputed blocks' inputs in pinned host memory, copied back on a side stream one block
    ahead of backward: the same loss and gradients as keeping them on the GPU. The attention is
    the math backend's, whose backward has no atomics (cuDNN's and the varlen kernel's spread a
    model's own gradients by up to 1.5e-3 relative L2 from one backward to the next, measured on an
    H200), so a copy back read before it arrives shows far above the 1e-5 allowed. After the
    forward the device holds less by the inputs, backward peaks lower (one input prefetched, not
    all held), and every input but the first one backward takes was on its way back before its
    block asked for it."""
    from trainer.activation_offload import InputOffload

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64)
    with torch.device("cuda"):
        kept = Transformer(cfg)
    moved = copy.deepcopy(kept)
    offload = InputOffload(torch.device("cuda"))
    apply_activation_checkpointing(kept, {0, 1, 2, 3})
    apply_activation_checkpointing(moved, {0, 1, 2, 3}, offload=offload)
    lengths = [4096, 2048, 900]
    tokens, positions, attend = packed_batch(lengths, cfg.vocab_size, backend="math")
    losses, held, peaks = [], [], []
    for model in (kept, moved):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(tokens, positions, attend, tokens)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        losses.append(loss.detach().float())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, a), b in zip(kept.named_parameters(), moved.parameters()):
        err = ((b.grad - a.grad).norm() / a.grad.norm()).item()
        assert err < 1e-5, (name, err)
    inputs = cfg.n_layers * sum(lengths) * cfg.dim * 4  # fp32 residual stream between blocks
    assert held[0] - held[1] >= 0.9 * inputs, (held, inputs)
    # (at the last block's backward: three inputs held against one prefetched; at least one input lower)
    assert peaks[0] - peaks[1] >= 0.9 * inputs / cfg.n_layers, (peaks, inputs)
    assert offload.moved == cfg.n_layers and offload.prefetched == cfg.n_layers - 1
