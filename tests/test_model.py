"""The model over packed documents: no leakage between documents, RoPE restarting per document."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.attention import LocalAttention, select_backend
from trainer.config import ModelConfig
from trainer.model import Transformer


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
def test_packed_batch_equals_documents_alone(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg).double()
    be = select_backend(backend, "cpu")
    lengths = [9, 1, 17, 5]
    tokens = torch.randint(0, 50, (sum(lengths),))
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = model(tokens, positions, LocalAttention(be, cu, max(lengths)))
    packed.square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone, at = [], 0
    for n in lengths:
        one = torch.tensor([0, n], dtype=torch.int32)
        alone.append(model(tokens[at: at + n], torch.arange(n), LocalAttention(be, one, n)))
        at += n
    alone = torch.cat(alone)
    alone.square().sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-12, rtol=1e-10)
    for a, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-10, rtol=1e-9)
    # and the test can fail: without document boundaries the outputs differ
    leaky = model(tokens, torch.arange(tokens.numel()), LocalAttention(be, cu[[0, -1]], int(cu[-1])))
    assert (leaky - alone).abs().max() > 1e-3


def test_chunked_loss_equals_the_full_cross_entropy():
    """The loss computed 7 tokens at a time (each chunk's gradient formed in the forward pass) equals
    cross-entropy on the full logits, values and gradients (fp64, 1e-12)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).double()
    tokens = torch.randint(0, 50, (40,))
    labels = torch.randint(0, 50, (40,))
    labels[::5] = -100
    cu = torch.tensor([0, 40], dtype=torch.int32)
    attend = LocalAttention(select_backend("math", "cpu"), cu, 40)
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        if chunk is None:
            loss = F.cross_entropy(model(tokens, torch.arange(40), attend), labels, ignore_index=-100, reduction="sum")
        else:
            loss = model(tokens, torch.arange(40), attend, labels, chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-12, rtol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_the_compiled_loss_compiles_twice_for_any_micro_batch_lengths():
    """As a real corpus's micro-batches come (65,483 tokens, then a 1,189-token end of an epoch, then
    others), the loss's compiled region is compiled for the first chunk's shape and once more with
    dynamic shapes, never again (each compile cost a step ~1 s on an H200)."""
    from trainer.loss import linear_cross_entropy, logit_grads

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(logit_grads, backend=counting_backend, dynamic=None)
    weight = torch.randn(64, 16)
    for tokens in (65483, 1189, 40000, 100, 8192):
        linear_cross_entropy(torch.randn(tokens, 16), weight, torch.randint(0, 64, (tokens,)), 8192, compiled)
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_compiled_and_selectively_checkpointed_model_equals_eager():
    """Compiled element-wise regions (Inductor's CPU code) with 2 of 3 blocks recomputed in backward
    give eager's loss and gradients (fp32, 1e-5 relative: fused kernels reorder the sums)."""
    import copy

    from trainer.compiled import compile_elementwise
    from parallel.planner.shape import recomputed_block_ids
    from trainer.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)
    eager = Transformer(cfg)
    fast = copy.deepcopy(eager)
    blocks = recomputed_block_ids(2, cfg.n_layers)
    assert blocks == {0, 1}
    apply_activation_checkpointing(fast, blocks)
    compile_elementwise(fast)
    tokens, labels = torch.randint(0, 50, (48,)), torch.randint(0, 50, (48,))
    attend = LocalAttention(select_backend("cpu_flash", "cpu"), torch.tensor([0, 20, 48], dtype=torch.int32), 28)
    positions = torch.cat([torch.arange(20), torch.arange(28)])
    losses = []
    for model in (eager, fast):
        loss = model(tokens, positions, attend, labels, 16)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert sum(1 for name, _ in fast.named_modules() if name.endswith("_checkpoint_wrapped_module")) == 2
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


class KernelCalls(TorchDispatchMode):
    """Counts the attention kernel ops that really run (a block that keeps them answers from its
    cache), and the rows of every SwiGLU activation computed."""

    def __init__(self):
        super().__init__()
        self.calls, self.silu_rows = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from trainer.parallelize import ATTENTION_KERNELS

        self.calls += func in ATTENTION_KERNELS
        if func is torch.ops.aten.silu.default:
            self.silu_rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_attention, tile, offload",
                         [(True, 0, False), (False, 16, False), (True, 16, False), (False, 0, True), (True, 16, True)])
def test_kept_attention_and_tiled_swiglu_equal_the_plain_model(keep_attention, tile, offload):
    """Every block recomputed keeping its attention output, and/or the SwiGLU in tiles of 16 tokens
    each recomputed, and/or each block's input sent to the host until its backward: the plain
    model's loss and gradients (fp32, 1e-6 relative); a block that keeps its attention never runs
    the kernel again in backward, a tiled SwiGLU never computes its activation for more than a tile
    of tokens, and with the offload exactly one input per block went to the host, each but the
    first one backward takes started back while the block after it ran its backward."""
    import copy

    from trainer.activation_offload import InputOffload
    from trainer.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)
    plain = Transformer(cfg)
    saving = copy.deepcopy(plain)
    for block in saving.layers.values():
        block.mlp_tile = tile
    host = InputOffload(torch.device("cpu")) if offload else None
    apply_activation_checkpointing(saving, {0, 1, 2}, keep_attention, host)
    tokens, labels = torch.randint(0, 50, (72,)), torch.randint(0, 50, (72,))
    attend = LocalAttention(select_backend("cpu_flash", "cpu"), torch.tensor([0, 30, 72], dtype=torch.int32), 42)
    positions = torch.cat([torch.arange(30), torch.arange(42)])
    losses, kernels, silu_rows = [], [], []
    for model in (plain, saving):
        with KernelCalls() as counted:
            loss = model(tokens, positions, attend, labels)
            loss.backward()
        losses.append(loss.detach())
        kernels.append(counted.calls)
        silu_rows.append(counted.silu_rows)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, a), b in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert kernels[0] == cfg.n_layers  # one packed kernel call per block
    assert kernels[1] == cfg.n_layers * (1 if keep_attention else 2)
    # tiled, no SwiGLU activation ever exists for more than a tile of the 72 tokens (forward and recompute)
    assert max(silu_rows[0]) == 72 and max(silu_rows[1]) == (tile or 72) and len(silu_rows[1]) > len(silu_rows[0])
    assert (host.moved if host else 0) == (cfg.n_layers if offload else 0)
    # every input but the first that backward takes (the last block's) was on its way back before its block asked
    assert (host.prefetched if host else 0) == (cfg.n_layers - 1 if offload else 0)


@pytest.mark.parametrize("offload", [False, True])
def test_an_offloaded_block_input_does_not_stay_on_the_device(offload):
    """After the forward, the inputs recomputed blocks saved are gone from the device when they went
    to the host (here a CPU copy stands for it), and alive without the offload."""
    import gc
    import weakref

    from trainer.activation_offload import InputOffload
    from trainer.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2))
    apply_activation_checkpointing(model, {0, 1, 2}, False, InputOffload(torch.device("cpu")) if offload else None)
    inputs = []
    for block in model.layers.values():
        block.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    tokens = torch.randint(0, 50, (40,))
    attend = LocalAttention(select_backend("cpu_flash", "cpu"), torch.tensor([0, 40], dtype=torch.int32), 40)
    loss = model(tokens, torch.arange(40), attend, tokens)
    gc.collect()
    alive = [ref() is not None for ref in inputs]
    assert alive == [not offload] * 3
    loss.backward()  # (and backward still finds them)
    assert all(p.grad is not None for p in model.parameters())


def test_offloaded_inputs_come_back_along_their_own_forward():
    """Two micro-batches in flight (both forwards, then the second's backward before the first's,
    as a pipeline schedule may run them): each backward prefetches only inputs of its own forward —
    every input but the first each backward takes — and the gradients equal those without offload."""
    import copy

    from trainer.activation_offload import InputOffload
    from trainer.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)
    plain = Transformer(cfg)
    moved = copy.deepcopy(plain)
    host = InputOffload(torch.device("cpu"))
    apply_activation_checkpointing(moved, {0, 1, 2}, offload=host)
    attend = LocalAttention(select_backend("cpu_flash", "cpu"), torch.tensor([0, 40], dtype=torch.int32), 40)
    batches = [torch.randint(0, 50, (40,)) for _ in range(2)]
    for model in (plain, moved):
        losses = [model(tokens, torch.arange(40), attend, tokens) for tokens in batches]
        for loss in reversed(losses):
            loss.backward()
    for (name, a), b in zip(plain.named_parameters(), moved.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert host.moved == 2 * cfg.n_layers and host.prefetched == 2 * (cfg.n_layers - 1)
