"""Attention backends against a per-document reference: values, gradients, masks, empty rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.attention import BlockMask, LocalAttention, block_attention, select_backend
from parallel.choices import fastest_backend

BACKENDS = ["math", "cpu_flash"]


def reference(q, k, v, lengths, window=0):
    """Each document alone through torch's SDPA with an explicit causal(/window) mask."""
    outs, at = [], 0
    g = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[at: at + n].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        i = torch.arange(n)
        mask = i[:, None] >= i[None, :]
        if window:
            mask &= (i[:, None] - i[None, :]) < window
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
        at += n
    return torch.cat(outs)


def inputs(lengths, hq=4, hkv=2, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    mk = lambda h: torch.randn(t, h, d, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return mk(hq), mk(hkv), mk(hkv), cu


def grads(out, tensors, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, dout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq, hkv, window", [(4, 4, 0), (4, 2, 0), (4, 1, 0), (4, 2, 5)])
def test_packed_documents_match_reference(backend, hq, hkv, window):
    lengths = [7, 1, 20, 13]
    q, k, v, cu = inputs(lengths, hq, hkv)
    out = LocalAttention(select_backend(backend, "cpu"), cu, max(lengths), window=window)(q, k, v)
    ref = reference(q, k, v, lengths, window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_fp64_reference(backend):
    lengths = [64, 100]
    q, k, v, cu = inputs(lengths, dtype=torch.float32)
    out = LocalAttention(select_backend(backend, "cpu"), cu, 100)(q, k, v)
    ref = reference(*(x.double() for x in (q, k, v)), lengths)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_visible_keys(backend):
    """6 queries over 3 keys, causal, bottom-right aligned: queries 0-2 see nothing; out 0, lse −inf."""
    q, k, v, _ = inputs([12])
    q, k, v = q[:6], k[:3], v[:3]
    mask = BlockMask(torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 6, 3)
    be = select_backend(backend, "cpu")
    out, lse = be.forward(q.detach(), k.detach(), v.detach(), mask, 0.25)
    assert torch.isneginf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    assert (out[:3] == 0).all() and torch.isfinite(out).all()
    o = block_attention(q, k, v, be, mask, 0.25)
    dq, dk, dv = grads(o, (q, k, v))
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv)) and (dq[:3] == 0).all()
    m_out, m_lse = select_backend("math", "cpu").forward(q.detach(), k.detach(), v.detach(), mask, 0.25)
    torch.testing.assert_close(out, m_out)
    torch.testing.assert_close(lse, m_lse)


def test_dense_mask_follows_flash_conventions():
    """Bottom-right alignment, causal, and windows, against positions written out by hand."""
    cu_q = torch.tensor([0, 4, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8], dtype=torch.int32)
    # sequence 0: 4 queries at positions 2..5 over 6 keys at 0..5; sequence 1: 2 queries over 2 keys
    for causal, left, right in [(True, -1, -1), (True, 1, -1), (False, -1, -1), (False, 1, 0), (False, 2, 1)]:
        got = BlockMask(cu_q, cu_k, 4, 6, causal, left, right).dense()
        want = torch.zeros(6, 8, dtype=torch.bool)
        for qi, (seq, qpos) in enumerate([(0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1)]):
            for kj, (kseq, kpos) in enumerate([(0, p) for p in range(6)] + [(1, 0), (1, 1)]):
                r = 0 if causal else right
                ok = seq == kseq and (r < 0 or kpos <= qpos + r) and (left < 0 or kpos >= qpos - left)
                want[qi, kj] = ok
        assert torch.equal(got, want), (causal, left, right)


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("flash", "cpu")
    with pytest.raises(ValueError, match="not available here"):
        select_backend("nope", "cpu")
    assert select_backend(fastest_backend("cpu"), "cpu").name == "cpu_flash"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("cudnn", "cpu")
