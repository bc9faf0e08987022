"""Attention backends against a per-document reference: values, gradients, masks, empty rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.attention import BlockMask, LocalAttention, Span, block_attention, select_backend

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
    """Queries that precede every key (a later ring block) see nothing: out 0, lse −inf, no NaN."""
    q, k, v, _ = inputs([12])
    qspan = Span(doc=torch.zeros(6, dtype=torch.int32), pos=torch.arange(6))
    kspan = Span(doc=torch.zeros(6, dtype=torch.int32), pos=torch.arange(3, 9))
    mask = BlockMask(qspan, kspan, causal=True)
    be = select_backend(backend, "cpu")
    out, lse = be.forward(q[:6].detach(), k[:6].detach(), v[:6].detach(), mask, 0.25)
    assert torch.isneginf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    assert (out[:3] == 0).all() and torch.isfinite(out).all()
    o = block_attention(q[:6], k[:6], v[:6], be, mask, 0.25)
    dq, dk, dv = grads(o, (q, k, v))
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv)) and (dq[:3] == 0).all()
    m_out, m_lse = select_backend("math", "cpu").forward(q[:6].detach(), k[:6].detach(), v[:6].detach(), mask, 0.25)
    torch.testing.assert_close(out, m_out)
    torch.testing.assert_close(lse, m_lse)


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("flash", "cpu")
    with pytest.raises(ValueError, match="not available here"):
        select_backend("nope", "cpu")
    assert select_backend("auto", "cpu").name == "cpu_flash"
