"""AdamW with its moments in host memory (`optim.offload`) against torch's AdamW, alone and in
training on gloo: the same weights bit for bit, and checkpoints that resume either way."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.distributed import run_ranks
from tests.test_training import job_for, train_rank
from trainer.host_adamw import HostAdamW, HostMemoryError


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def test_streamed_moments_update_exactly_like_adamw():
    """Buckets smaller than one parameter's moments and larger than several: weights and moments
    equal torch's AdamW exactly (fp32) after 6 steps; a state dict loads back into the host buffer."""
    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(50, 30)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(30))]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for bucket in (1000, 40_000):
        ours = [torch.nn.Parameter(p.detach().clone()) for p in reference]
        mine = [torch.nn.Parameter(p.detach().clone()) for p in reference]
        torch_adamw = torch.optim.AdamW(groups(mine), **settings)
        host = HostAdamW(groups(ours), bucket_bytes=bucket, **settings)
        for _ in range(6):
            for p, q in zip(mine, ours):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            torch_adamw.step()
            host.step()
        for p, q in zip(mine, ours):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(torch_adamw.state[p][key], host.state[q][key])
        restored = HostAdamW(groups(ours), **settings)
        restored.load_state_dict(host.state_dict())
        assert torch.equal(restored.flat, host.flat)
        assert restored.state[ours[0]]["exp_avg"].data_ptr() == restored.flat.data_ptr()  # back in the buffer
    # the comparison can fail: another learning rate moves the weights elsewhere
    other = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    off = HostAdamW(groups(other), lr=2e-2, betas=(0.9, 0.95))
    for p in other:
        p.grad = torch.ones_like(p)
    off.step()
    assert not torch.equal(other[0], reference[0])


def test_moments_beyond_host_memory_are_refused():
    with pytest.raises(HostMemoryError, match="optim.offload puts .* GB of AdamW moments"):
        HostAdamW([torch.nn.Parameter(torch.zeros(4))], local_ranks=10**12)


def test_offloaded_training_equals_gpu_moments_and_resumes_either_way(small_dataset, tmp_path):
    """2 gloo ranks, FSDP-sharded moments: 4 steps with optim.offload=true give the losses and
    weights of optim.offload=false exactly; its step-2 checkpoint resumes with offload off (and
    the reverse) onto the same trajectory, bit for bit."""
    ov = tiny_overrides(small_dataset, tmp_path) + ["train.max_steps=4", "checkpoint.every=2"]
    assert job_for(ov + ["optim.offload=true"], 2).memory_saving.offload_moments
    assert not job_for(ov + ["optim.offload=auto"], 2).memory_saving.offload_moments  # (it fits without)
    (plain, p_plain), _ = run_ranks(train_rank, 2, ov + ["name=plain", "optim.offload=false"])
    (host, p_host), _ = run_ranks(train_rank, 2, ov + ["name=host", "optim.offload=true"])
    assert host["losses"] == plain["losses"]
    for name in p_plain:
        assert torch.equal(p_host[name], p_plain[name]), name
    for first, then in (("true", "false"), ("false", "true")):
        name = f"switch-{first}"
        run_ranks(train_rank, 2, ov + [f"name={name}", f"optim.offload={first}", "train.run_steps=2"])
        (resumed, p_resumed), _ = run_ranks(train_rank, 2, ov + [f"name={name}", f"optim.offload={then}"])
        assert resumed["start_step"] == 2
        assert resumed["losses"] == plain["losses"][2:]
        for key in p_plain:
            assert torch.equal(p_resumed[key], p_plain[key]), key


@pytest.mark.parametrize("tokens, offload", [(32768, False), (131072, True)])
def test_auto_offloads_where_the_moments_make_the_difference(tokens, offload):
    """Llama-3.1-8B on one H200: at 32K the states and activations fit the GPU; at 128K they fit
    only with the moments in host memory, which `auto` then chooses; refused without it."""
    from parallel.planner.hardware import named_profile
    from trainer.config import ConfigError, load_config
    from trainer.job import check_layout, check_memory, memory_saving

    hw = named_profile("H200", "H200")
    overrides = ["model=llama-8b", "data.path=unused", f"data.context_len={tokens}", f"data.tokens_per_microbatch={tokens}",
                 "train.global_microbatches=1", "cluster.workers=1", "train.loss_chunk=8192",
                 "train.activation_checkpointing=auto", "train.offload_activations=false"]
    cfg = load_config(None, overrides)
    saving = memory_saving(cfg, check_layout(cfg, 1), hw)
    assert saving.offload_moments is offload
    check_memory(cfg, check_layout(cfg, 1), hw, saving)
    if offload:
        cfg = load_config(None, overrides + ["optim.offload=false"])
        with pytest.raises(ConfigError, match="needs .* GB on each GPU"):
            check_memory(cfg, check_layout(cfg, 1), hw, memory_saving(cfg, check_layout(cfg, 1), hw))
