"""Attention backends against a per-document reference: values, gradients, masks, empty rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.attention import AttentionBackend, BlockMask, LocalAttention, block_attention, select_backend
from parallel.choices import fastest_backend

# "cpu_flash" routes as the cpu preset does; "cpu_flash_dense" sends every document of 8 tokens or more
# through the dense kernel (CpuFlashDense), so that both halves of the CPU router are checked
BACKENDS = ["math", "cpu_flash", "cpu_flash_dense"]


def cpu_backend(name: str) -> AttentionBackend:
    if name == "cpu_flash_dense":
        return select_backend("cpu_flash", "cpu", dense_min=8)
    return select_backend(name, "cpu")


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
    out = LocalAttention(cpu_backend(backend), cu, max(lengths), window=window)(q, k, v)
    ref = reference(q, k, v, lengths, window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_fp64_reference(backend):
    lengths = [64, 100]
    q, k, v, cu = inputs(lengths, dtype=torch.float32)
    out = LocalAttention(cpu_backend(backend), cu, 100)(q, k, v)
    ref = reference(*(x.double() for x in (q, k, v)), lengths)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_visible_keys(backend):
    """6 queries over 3 keys, causal, bottom-right aligned: queries 0-2 see nothing; out 0, lse −inf."""
    q, k, v, _ = inputs([12])
    q, k, v = q[:6], k[:3], v[:3]
    mask = BlockMask(torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 6, 3)
    be = cpu_backend(backend)
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


class Counting(AttentionBackend):
    """A backend that counts its calls — batched ones, sequences, rows — around another (test code)."""

    def __init__(self, inner):
        self.inner, self.name, self.batches, self.calls, self.rows = inner, inner.name, 0, 0, 0

    def forward_batched(self, q, k, v, causal, scale):
        self.batches += 1
        return super().forward_batched(q, k, v, causal, scale)

    def forward(self, q, k, v, mask, scale):
        self.calls += 1
        self.rows += q.shape[0]
        return self.inner.forward(q, k, v, mask, scale)

    def backward(self, *args):
        return self.inner.backward(*args)


@pytest.mark.parametrize("causal, nq, nk", [(True, 24, 24), (False, 24, 24), (False, 10, 30)])
def test_cpu_flash_dense_batches_match_math(causal, nq, nk):
    """The CPU router's dense kernel on a batch of three sequences (grouped K/V heads) equals the math
    backend one sequence at a time: values, lse and gradients (fp64, 1e-12)."""
    from parallel.attention.backends import CpuFlashDense, MathBackend

    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, nq, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, nk, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    got, want = CpuFlashDense(), MathBackend()
    out, lse = got.forward_batched(q, k, v, causal, 0.3)
    w_out, w_lse = want.forward_batched(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, w_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, w_lse, atol=1e-12, rtol=0)
    for a, b in zip(got.backward_batched(dout, q, k, v, out, lse, causal, 0.3),
                    want.backward_batched(dout, q, k, v, w_out, w_lse, causal, 0.3)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lengths, window", [
    ([40, 33, 9, 5, 1], 0),  # longest first: two dense calls, the short ones one slice
    ([5, 40, 1, 33, 9, 12], 0),  # interleaved: 40, 33 and 12 alone, the short ones gathered
    ([3, 2, 7], 0),  # nothing long: all to the packed kernel
    ([30, 40, 30, 30], 0),  # nothing short: four dense calls, equal lengths too
    ([40, 9, 33], 6),  # a window: the packed kernel takes it all
])
def test_document_router_equals_one_kernel(lengths, window):
    """Each long document through the dense kernel in a call of its own and the rest through one
    packed call give the per-document attention of a single kernel: values, lse and q/k/v gradients
    (fp64, 1e-12)."""
    from parallel.attention.backends import CpuFlashBackend, MathBackend
    from parallel.attention.dispatch import DocumentRouter

    dense, packed = Counting(MathBackend()), Counting(CpuFlashBackend())
    router = DocumentRouter(dense, packed, dense_min=12)
    q, k, v, cu = inputs(lengths, hq=4, hkv=2)
    mask = BlockMask.packed(cu, max(lengths), window=window, lengths=tuple(lengths))
    out = block_attention(q, k, v, router, mask)
    want = block_attention(q, k, v, MathBackend(), BlockMask.packed(cu, max(lengths), window=window))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    long = [n for n in lengths if n >= 12] if not window else []
    assert dense.calls == dense.batches == len(long) and dense.rows == sum(long)
    assert packed.calls == (1 if len(long) < len(lengths) else 0)
    _, lse = router.forward(q.detach(), k.detach(), v.detach(), mask, 0.25)
    _, want_lse = MathBackend().forward(q.detach(), k.detach(), v.detach(), mask, 0.25)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)


def test_document_router_takes_rectangular_blocks_without_a_causal_mask():
    """A ring's off-diagonal block: each document's queries see all its keys (non-causal, nq ≠ nk)."""
    from parallel.attention.backends import MathBackend
    from parallel.attention.dispatch import DocumentRouter

    nq, nk = [20, 3, 14], [16, 2, 30]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(nq), 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(nk), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu = lambda n: torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    mask = BlockMask(cu(nq), cu(nk), max(nq), max(nk), causal=False, q_lengths=tuple(nq), k_lengths=tuple(nk))
    dense = Counting(MathBackend())
    out = block_attention(q, k, v, DocumentRouter(dense, MathBackend(), dense_min=12), mask)
    want = block_attention(q, k, v, MathBackend(), BlockMask(cu(nq), cu(nk), max(nq), max(nk), causal=False))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert dense.calls == 2


@pytest.mark.parametrize("shortest, longest", [(2048, 65536), (2048, 5000), (3000, 3000), (1, 70000), (4096, 4096)])
def test_cudnn_plans_one_length_per_plan(shortest, longest):
    """The lengths warmed for cuDNN: one in [shortest, longest] for every plan that lengths in that
    range need (a power of two its own, the others one per power-of-two class (c/2, c)), no two alike."""
    from parallel.attention.backends import CudnnDense

    def plan(n):
        return ("exact", n) if n & (n - 1) == 0 else ("ragged", 1 << (n - 1).bit_length())
    lengths = CudnnDense().plan_lengths(shortest, longest)
    assert all(shortest <= n <= longest for n in lengths)
    assert len({plan(n) for n in lengths}) == len(lengths)
    assert {plan(n) for n in lengths} == {plan(n) for n in range(shortest, longest + 1)}
