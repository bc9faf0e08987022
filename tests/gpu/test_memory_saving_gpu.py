"""Kept attention outputs and SwiGLU tiles on CUDA (cuDNN and flash varlen kernels, bf16 autocast)
against plain recomputation: the same loss and gradients, and no attention kernel run again in
backward (skipped without CUDA).

Tolerance: the kept output is the one the plain recompute computes again with the same
deterministic forward kernel, so untiled the loss agrees to 1e-6 relative and the gradients to a
relative L2 error of 1e-3; tiled, bf16 matmuls over 1,024-row tiles round differently from one
call over all rows: 5e-3 on the loss, 2e-2 on the gradients (METHOD.md's bf16 range).
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
    lengths = [3000, 2048, 900, 148]  # two documents through cuDNN, two through the varlen kernel
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    tokens = torch.randint(0, 512, (sum(lengths),), device="cuda")
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    attend = LocalAttention(select_backend("cudnn", "cuda", dense_min=2048), cu, max(lengths), lengths=lengths)
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
