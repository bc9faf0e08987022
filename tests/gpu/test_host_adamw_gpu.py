"""`optim.offload` on CUDA: the moments stay in pinned host memory — for plain parameters and for
FSDP's DTensors of a CUDA mesh — while the weights come out of the streamed update exactly as from
torch's fused AdamW on the GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from parallel.process_group import free_port
from trainer.host_adamw import HostAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_against_fused_adamw(kind) -> None:
    """`kind` turns a CUDA tensor into the tensor kind under test (plain or DTensor)."""
    torch.manual_seed(0)
    shapes = [(300, 200), (1000, 64), (64,)]
    values = [torch.randn(s, device="cuda") for s in shapes]
    mine = [torch.nn.Parameter(kind(v.clone())) for v in values]
    ours = [torch.nn.Parameter(kind(v.clone())) for v in values]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    reference = torch.optim.AdamW(mine, **settings)
    host = HostAdamW(ours, bucket_bytes=1 << 20, **settings)  # several buckets
    for _ in range(4):
        for p, q in zip(mine, ours):
            grad = torch.randn(p.shape, device="cuda")
            p.grad, q.grad = kind(grad.clone()), kind(grad.clone())
        reference.step()
        host.step()
    for p, q in zip(mine, ours):
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        assert torch.equal(local(p), local(q))
        for key in ("exp_avg", "exp_avg_sq"):
            moment = local(host.state[q][key])
            assert moment.device.type == "cpu" and moment.is_pinned()
            assert torch.equal(moment, local(reference.state[p][key]).cpu())


def test_moments_of_plain_parameters_stay_on_the_host():
    check_against_fused_adamw(lambda v: v)


def test_moments_of_dtensor_parameters_stay_on_the_host():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        check_against_fused_adamw(lambda v: distribute_tensor(v, mesh, [Shard(0)]))
    finally:
        dist.destroy_process_group()
