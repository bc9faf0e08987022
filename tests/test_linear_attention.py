"""Linear attention: chunkwise kernel, LASP-2 and LASP-1 against the serial recurrence; LASP-2H;
bytes that do not grow with the sequence; hybrid models with sp=2 against sp=1.
Tolerances: fp64 atol 1e-10 (values and gradients); training losses rtol 1e-5, parameters atol 5e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallel import linear_attention as la
from tests.conftest import tiny_overrides
from tests.distributed import run_ranks
from tests.test_training import train_rank


def serial_reference(q, k, v, log_decay, starts) -> torch.Tensor:
    """The recurrence token by token: S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t."""
    t, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    lam = torch.exp(log_decay.to(torch.float64))
    state = torch.zeros(hkv, k.shape[2], v.shape[2], dtype=torch.float64)
    out = torch.zeros(t, hq, v.shape[2], dtype=torch.float64)
    for i in range(t):
        if starts[i]:
            state = torch.zeros_like(state)
        state = lam[:, None, None] * state + k[i].double()[:, :, None] * v[i].double()[:, None, :]
        for h in range(hq):
            out[i, h] = q[i, h].double() @ state[h // g]
    return out


def case(lengths, hq=4, hkv=2, dk=6, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, dk, generator=g, dtype=torch.float64)
    k = torch.randn(t, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(t, hkv, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(t, hq, dv, generator=g, dtype=torch.float64)
    starts = torch.zeros(t, dtype=torch.bool)
    starts[np.cumsum([0, *lengths[:-1]])] = True
    return q, k, v, dout, starts


def grads(fn, tensors, dout):
    ins = [x.clone().requires_grad_() for x in tensors]
    out = fn(*ins)
    out.backward(dout)
    return [out.detach(), *(x.grad for x in ins)]


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("lengths, hkv, chunk", [([40], 2, 8), ([7, 1, 19, 13], 2, 5), ([30, 11], 1, 64), ([9, 9], 4, 4)])
def test_chunkwise_kernel_equals_the_recurrence(decay, lengths, hkv, chunk):
    q, k, v, dout, starts = case(lengths, hkv=hkv)
    log_decay = la.decay_rates(hkv, decay).double() * 6  # stronger decay than the model's, to test it
    got = grads(lambda a, b, c: la.local(a, b, c, log_decay, la.Segments(starts), chunk), (q, k, v), dout)
    want = grads(lambda a, b, c: serial_reference(a, b, c, log_decay, starts), (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def lasp_rank(rank: int, world: int, cases: list) -> list[float]:
    from parallel.attention import LocalAttention, select_backend
    from parallel.allgather_attention import AllGatherAttention
    from parallel.lasp import SequenceParallelLinear
    from parallel.layout import Layout
    from parallel.mesh import ParallelDims
    from parallel.sequence_parallel import make_layout

    groups = ParallelDims(Layout(dp=1, ring=world), torch.device("cpu")).sp_groups()
    errors = []
    for lengths, decay, method in cases:
        q, k, v, dout, starts = case(lengths, seed=len(errors))
        log_decay = la.decay_rates(2, decay).double() * 6
        layout = make_layout(lengths, groups, zigzag=False)
        idx = torch.from_numpy(layout.indices(groups.rank))
        if method == "allgather":  # LASP-2H softmax attention against the whole sequence on one rank
            q, k, v, dout, _ = case(lengths, dv=6, seed=len(errors))
            cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
            want = grads(LocalAttention(select_backend("math", "cpu"), cu, max(lengths)), (q, k, v), dout)
            got = grads(AllGatherAttention(layout, groups, select_backend("math", "cpu")),
                        (q[idx], k[idx], v[idx]), dout[idx])
        else:
            want = grads(lambda a, b, c: serial_reference(a, b, c, log_decay, starts), (q, k, v), dout)
            mixer = SequenceParallelLinear(layout, groups, method, chunk=4)
            got = grads(lambda a, b, c: mixer(a, b, c, log_decay), (q[idx], k[idx], v[idx]), dout[idx])
        errors.append(max(((a - b[idx]).abs().max().item() if a.numel() else 0.0) for a, b in zip(got, want)))
    return errors


CASES = [([64], True, "lasp2"), ([64], False, "lasp2"), ([61], True, "lasp1"),  # 61: not divisible
         ([5, 17, 1, 30], True, "lasp2"), ([5, 17, 1, 30], False, "lasp1"),  # packed
         ([2], True, "lasp2"),  # ranks without tokens
         ([12, 12, 12, 12], True, "lasp2"),  # boundaries on rank edges (4 ranks)
         ([5, 17, 1, 30], None, "allgather"), ([40], None, "allgather")]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp_equals_the_recurrence(world):
    for errors in run_ranks(lasp_rank, world, CASES):
        assert max(errors) < 1e-10, errors


def bytes_rank(rank: int, world: int) -> dict:
    from parallel.lasp import SequenceParallelLinear
    from parallel.layout import Layout
    from parallel.mesh import ParallelDims
    from parallel.ring_comm import COMM_STATS
    from parallel.sequence_parallel import make_layout

    groups = ParallelDims(Layout(dp=1, ring=world), torch.device("cpu")).sp_groups()
    out = {}
    for method in ("lasp2", "lasp1"):
        for length in (64, 1024):
            q, k, v, dout, _ = case([length], hq=4, hkv=2, dk=8, dv=8)
            layout = make_layout([length], groups, zigzag=False)
            idx = torch.from_numpy(layout.indices(groups.rank))
            COMM_STATS.clear()
            ins = [x[idx].float().requires_grad_() for x in (q, k, v)]
            SequenceParallelLinear(layout, groups, method)(*ins, la.decay_rates(2, True)).sum().backward()
            out[(method, length)] = dict(COMM_STATS)
    return out


def test_bytes_do_not_depend_on_the_sequence_length():
    for rank, counts in enumerate(run_ranks(bytes_rank, 2)):
        assert counts[("lasp2", 64)] == counts[("lasp2", 1024)]
        state = 2 * 8 * 8 * 4  # K/V heads × d_k × d_v, fp32
        assert counts[("lasp2", 64)] == {"lasp2_ops": 1, "lasp2_bytes": state + (2 + 1) * 4,
                                         "lasp2_grad_ops": 1, "lasp2_grad_bytes": state}
        assert counts[("lasp1", 64)] == counts[("lasp1", 1024)]
        assert counts[("lasp1", 64)] == ({"lasp1_ops": 1, "lasp1_bytes": state} if rank == 0 else
                                         {"lasp1_grad_ops": 1, "lasp1_grad_bytes": state})


@pytest.mark.parametrize("softmax, linear", [("ring", "lasp2"),
                                             pytest.param("allgather", "lasp1", marks=pytest.mark.slow)])
def test_hybrid_model_with_sp2_equals_sp1(small_dataset, tmp_path, softmax, linear):
    ov = tiny_overrides(small_dataset, tmp_path) + ["train.max_steps=10", "checkpoint.every=100",
                                                    "train.global_microbatches=2", "model.layer_pattern=LS",
                                                    "data.tokens_per_microbatch=1024", "model.linear_chunk=64"]
    (ref, p_ref), = run_ranks(train_rank, 1, ov + ["name=sp1"])
    (got, p_got), _ = run_ranks(train_rank, 2, ov + ["name=sp2", "parallel.sp.degree=2",
                                                    f"parallel.sp.method={softmax}", f"parallel.sp.linear_method={linear}"])
    assert ref["losses"][-1] < ref["losses"][0] - 0.3  # the hybrid model learns
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    for name in p_ref:
        torch.testing.assert_close(p_got[name], p_ref[name], atol=5e-6, rtol=0, msg=name)
