"""The resolved job: degree arithmetic, the FLOP and parameter counts, and every decision `resolve`
makes — against hand counts, a real model's parameters and the cost model's own rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launch.ray_job import _target
from parallel.layout import Layout, largest_ulysses, ring_and_ulysses
from parallel.planner.cost_model import MEMORY_RESERVE, CostModel
from parallel.planner.memory_saving import choose
from parallel.planner.hardware import PRESETS, named_profile
from parallel.planner.shape import fewest_blocks
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.job import Target, check_layout, resolve
from trainer.model import Transformer, num_params

DEMO = "configs/train/demo.yaml"
H200 = Target("cuda", "NVIDIA H200", 139.8)


@pytest.mark.parametrize("degree, heads, kv, tp, want", [
    (8, 32, 8, 1, 4), (8, 32, 2, 1, 4), (4, 6, 2, 1, 2), (6, 12, 4, 1, 2), (6, 12, 3, 1, 3), (8, 16, 4, 2, 4), (2, 8, 4, 1, 1),
    (7, 32, 8, 1, 1),
])
def test_largest_ulysses_divides_the_degree_and_fits_the_heads(degree, heads, kv, tp, want):
    assert largest_ulysses(degree, heads, kv, tp) == want


def test_ring_and_ulysses_split_a_degree():
    assert ring_and_ulysses("ring", 8, 4) == (8, 1)
    assert ring_and_ulysses("allgather", 4, 2) == (4, 1)
    assert ring_and_ulysses("ulysses", 8, 4) == (1, 8)
    assert ring_and_ulysses("hybrid", 8, 2) == (4, 2)
    with pytest.raises(ValueError, match="sp.ulysses=3 does not divide sp.degree=8"):
        ring_and_ulysses("hybrid", 8, 3)
    layout = Layout(dp=2, pp=2, tp=2, ring=2, ulysses=2, sp_method="hybrid", pp_virtual=2)
    assert (layout.sp, layout.world, layout.stages) == (4, 32, 4)
    assert layout.describe() == "dp=2 × tp=2 × pp=2 × sp=4 (hybrid, ring 2 × ulysses 2)"


def test_model_flops_and_parameters_against_hand_counts():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, window=3)
    shape = cfg.shape
    assert shape.params() == num_params(Transformer(cfg))
    tied = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    assert tied.shape.params() == num_params(Transformer(tied))
    lengths = [1, 2, 5]
    pairs = sum(sum(min(i + 1, 3) for i in range(n)) for n in lengths)  # each query sees ≤ 3 keys
    assert shape.attention_pairs(lengths).sum() == pairs
    per_layer = 32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 40
    matmul = 3 * per_layer + 32 * 50
    assert shape.model_flops(lengths) == 6 * matmul * 8 + 3 * 4 * 4 * 8 * 3 * pairs
    assert shape.attention_kernel_flops(lengths).sum() == 3.5 * 4 * 4 * 8 * 3 * pairs
    assert shape.linear_flops_per_token(recomputed=1 / 3) == 6 * matmul + 2 * per_layer
    half = shape.shard(tp=2, pp=3)
    assert (half.n_heads, half.n_kv_heads, half.hidden_dim, half.n_layers, half.vocab_size) == (2, 1, 20, 1, 25)


def test_fewest_blocks_is_the_least_count_that_fits():
    for need in range(0, 9):
        assert fewest_blocks(8, lambda k, need=need: k >= need) == need
    assert fewest_blocks(8, lambda k: False) == 8


@pytest.mark.parametrize("keep, tile, offload", [(False, 0, False), (True, 0, False), (False, 16384, True),
                                                  (True, 16384, True)])
def test_memory_does_not_grow_with_recomputed_blocks(keep, tile, offload):
    """What `fewest_blocks`'s bisection relies on: with the blocks spread as the trainer spreads
    them, each further recomputed block leaves the memory model's peak the same or lower."""
    for n_layers in (1, 2, 5, 16, 32):
        shape = replace(ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                    ffn_dim=14336).shape, n_layers=n_layers, softmax_layers=n_layers)
        peaks = [CostModel(shape, PRESETS["H200"], recomputed=k / n_layers, loss_chunk=8192, keep_attention=keep,
                           mlp_tile=tile, offload_inputs=offload).activation_bytes(65536, shard=2)
                 for k in range(n_layers + 1)]
        assert all(b <= a for a, b in zip(peaks, peaks[1:])), (n_layers, peaks)


def test_hardware_profile_by_device_name():
    assert named_profile("auto", "NVIDIA H100 80GB HBM3").name == "H100"
    assert named_profile("auto", "cpu").name == "cpu"
    other = named_profile("auto", "NVIDIA A100-SXM4-80GB")
    assert other.name == "NVIDIA A100-SXM4-80GB" and other.peak_tflops == 312.0
    assert named_profile("H200", "cpu") is PRESETS["H200"]


def test_resolve_decides_for_the_workers_device(small_dataset):
    cfg = load_config(DEMO, [f"data.path={small_dataset}", "model=llama-1b-long", "data.context_len=65536",
                             "data.tokens_per_microbatch=65536", "train.activation_checkpointing=auto",
                             "cluster.gpu_memory_gb=80", "cluster.profile=auto", "train.loss_chunk=8192"])
    gpu, cpu = resolve(cfg, H200), resolve(cfg, Target("cpu"))
    assert (gpu.attention_backend, gpu.precision, gpu.compile) == ("cudnn", "bf16", True)
    assert (cpu.attention_backend, cpu.precision, cpu.compile) == ("cpu_flash", "fp32", False)
    assert gpu.hardware.name == "H200" and gpu.hardware.gpu_memory_gb == 80.0  # the cluster's override wins
    assert gpu.peak_tflops == 989.0 and cpu.peak_tflops is None
    # auto memory saving: it fits, one block fewer would not, and it is no slower than recomputing whole blocks
    saving, n = gpu.memory_saving, cfg.model.n_layers
    base = CostModel(cfg.model.shape, gpu.hardware, loss_chunk=8192)
    need = lambda s: (s.applied(base).state_bytes(2) + s.applied(base).activation_bytes(65536)) / 2**30  # noqa: E731
    limit = 80.0 * MEMORY_RESERVE
    assert 0 < saving.recomputed < n and need(saving) <= limit < need(replace(saving, recomputed=saving.recomputed - 1))
    plain = choose(n, [(False, 0, False, False)], None, need, limit, lambda s: 0.0, 1.0, lambda s: 0.0)
    assert saving.applied(base).microbatch_time([65536], 1) <= plain.applied(base).microbatch_time([65536], 1)
    assert saving.keep_attention  # one GPU: keeping attention outputs beats running attention again
    with pytest.raises(ConfigError, match="model.attention_backend=cudnn needs CUDA GPUs"):
        resolve(load_config(DEMO, [f"data.path={small_dataset}", "model.attention_backend=cudnn"]), Target("cpu"))


@pytest.mark.parametrize("model, workers, context", [("llama-1b-long", 2, 65536), ("llama-8b", 8, 65536)])
def test_adaptive_preflight_on_a_cpu_head_uses_the_workers_gpu(small_dataset, model, workers, context):
    """The launcher on a head without a GPU resolves the job for the device its probe of the workers
    reports; the CPU's own profile would refuse these contexts."""
    cfg = load_config(DEMO, [f"data.path={small_dataset}", f"model={model}", "parallel.sp.mode=adaptive",
                             "parallel.sp.degree=2" if workers == 2 else "parallel.sp.degree=8",
                             f"data.context_len={context}", f"data.tokens_per_microbatch={context}",
                             f"cluster.workers={workers}", "cluster.profile=auto", "cluster.device=auto",
                             "train.global_microbatches=8", "train.loss_chunk=8192"])
    target = _target(cfg, gpus=workers, probe=lambda: H200)  # what `cluster_target` finds on a GPU cluster
    job = resolve(cfg, target)
    assert job.hardware.name == "H200" and job.layout.adaptive
    assert job.layout.sp * job.tokens_per_gpu >= context
    with pytest.raises(ConfigError, match="fits no SP group"):
        resolve(cfg, Target("cpu"))


def test_adaptive_budget_counts_the_memory_saving_it_runs_with(small_dataset):
    """Adaptive SP's per-rank token budget is what the GPU holds with the job's memory saving and
    the whole weights and gradients adaptive mode keeps: recomputing every block raises it, `auto`
    recomputes the fewest blocks that let the largest group hold the context, and each budget fits
    the memory model next to those states. Inputs offloaded to a small host cap the budget at what
    the host holds; a budget set beyond that is refused in one line."""
    base = [f"data.path={small_dataset}", "model=llama-8b", "parallel.sp.mode=adaptive", "parallel.sp.degree=8",
            "cluster.workers=8", "train.global_microbatches=8", "train.loss_chunk=8192", "optim.offload=false"]
    budgets = {}
    for setting, context in (("false", 262144), ("true", 262144), ("auto", 327680)):
        job = resolve(load_config(DEMO, [*base, f"data.context_len={context}", f"data.tokens_per_microbatch={context}",
                                         "train.offload_activations=false",
                                         f"train.activation_checkpointing={setting}"]), H200)
        budgets[setting] = job.tokens_per_gpu
        cost = job.cost_model()
        need = cost.state_bytes(8, unsharded_copy=True) + cost.activation_bytes(job.tokens_per_gpu, 1, 8)
        assert need <= job.hardware.gpu_memory_gb * 2**30 * MEMORY_RESERVE
        if setting == "auto":
            assert 0 < job.recomputed_blocks < 32 and 8 * job.tokens_per_gpu >= 327680
    assert budgets["true"] > 1.5 * budgets["false"], budgets
    offloaded = [*base, "data.context_len=262144", "data.tokens_per_microbatch=262144",
                 "train.activation_checkpointing=true", "train.offload_activations=true"]
    small_host = Target("cuda", "NVIDIA H200", 139.8, 8 * 24.0)  # 24 GB per GPU
    capped = resolve(load_config(DEMO, offloaded), small_host)
    host = capped.cost_model().host_bytes(capped.tokens_per_gpu, 8)
    assert capped.tokens_per_gpu < resolve(load_config(DEMO, offloaded), H200).tokens_per_gpu
    assert host <= 24.0 * 2**30 * 0.8 < capped.cost_model().host_bytes(capped.tokens_per_gpu + 64, 8)
    with pytest.raises(ConfigError, match=r"parallel.sp.tokens_per_gpu=200,000 puts .* GB per GPU in host memory"):
        resolve(load_config(DEMO, [*offloaded, "parallel.sp.tokens_per_gpu=200000"]), small_host)


def test_layout_rules_give_one_line(small_dataset):
    base = [f"data.path={small_dataset}", "model=tiny"]
    cases = {
        "parallel.sp.method=allgather (LASP-2H) is for hybrid models": ["parallel.sp.degree=2",
                                                                       "parallel.sp.method=allgather"],
        "adaptive SP needs a power-of-two parallel.sp.degree": ["cluster.workers=3", "parallel.sp.degree=3",
                                                               "parallel.sp.mode=adaptive"],
        "sp.ulysses=3 does not divide sp.degree=2": ["parallel.sp.degree=2", "parallel.sp.method=hybrid",
                                                     "parallel.sp.ulysses=3"],
        "adaptive SP with tp or pp > 1 is not supported": ["cluster.workers=6", "parallel.tp=2", "parallel.sp.degree=3",
                                                           "parallel.sp.mode=adaptive", "parallel.sp.group_sizes=any"],
        "groups of any size (parallel.sp.group_sizes=any) needs parallel.sp.method ring": [
            "cluster.workers=4", "parallel.sp.degree=4", "parallel.sp.method=ulysses", "parallel.sp.mode=adaptive",
            "parallel.sp.group_sizes=any"],
    }
    for message, override in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_layout(load_config(DEMO, base + override))


def test_device_of_the_workers():
    cfg = load_config(DEMO, ["cluster.device=cuda", "cluster.workers=4"])
    with pytest.raises(ConfigError, match="cluster.device=cuda needs 4 GPUs; this machine has 2"):
        _target(cfg, gpus=2, probe=lambda: H200)
    auto = load_config(DEMO, ["cluster.device=auto", "cluster.workers=4"])
    assert _target(auto, gpus=2, probe=lambda: H200) == Target("cpu")  # too few GPUs: CPU workers
    assert _target(auto, gpus=4, probe=lambda: H200) == H200
    assert _target(load_config(DEMO, ["cluster.device=cpu"]), gpus=8, probe=lambda: H200) == Target("cpu")


def test_a_micro_batch_that_cannot_fit_is_refused_naming_what_it_needs(small_dataset):
    base = [f"data.path={small_dataset}", "model=llama-1b-long", "data.context_len=131072",
            "data.tokens_per_microbatch=131072", "cluster.workers=1", "train.loss_chunk=8192"]
    with pytest.raises(ConfigError, match=r"a micro-batch of 131,072 tokens \(131,072 per GPU\) needs 1\d\d\.\d GB on "
                                          r"each GPU with 0/16 blocks recomputed, AdamW moments in host memory; the GPUs hold 139\.8 GB"):
        resolve(load_config(DEMO, base + ["train.activation_checkpointing=false", "train.mlp_tile_tokens=0"]), H200)
    job = resolve(load_config(DEMO, base + ["train.activation_checkpointing=auto", "train.mlp_tile_tokens=0"]), H200)
    assert 0 < job.recomputed_blocks < 16  # auto recomputes what it must
    tiled = resolve(load_config(DEMO, base + ["train.activation_checkpointing=false"]), H200)
    assert tiled.memory_saving.mlp_tile == 16384  # SwiGLU tiles (auto) let it fit without recomputing


def test_offloads_fit_the_host_with_the_gpu(small_dataset):
    """An 8B model at 224K on one H200: AdamW's moments (60 GB) and the recomputed blocks' inputs
    (54 GB) would fill a 125 GB host (the lent machine's; a run there was killed), so `auto` keeps
    the inputs on the GPU, and offloads them too with a 512 GB host; both asked for on the small
    host is refused in one line that names host memory, and so is 256K, where no setting fits."""
    base = [f"data.path={small_dataset}", "model=llama-8b", "data.context_len=229376",
            "data.tokens_per_microbatch=229376", "cluster.workers=1", "train.global_microbatches=1",
            "train.loss_chunk=8192", "train.activation_checkpointing=auto"]
    small, large = Target("cuda", "NVIDIA H200", 139.8, 125.0), Target("cuda", "NVIDIA H200", 139.8, 512.0)
    on_small = resolve(load_config(DEMO, base), small)
    assert on_small.memory_saving.offload_moments and not on_small.memory_saving.offload_inputs
    assert on_small.hardware.host_memory_gb == 125.0
    on_large = resolve(load_config(DEMO, base), large).memory_saving
    assert on_large.offload_moments and on_large.offload_inputs
    with pytest.raises(ConfigError, match=r"puts 1\d\d\.\d GB per GPU in host memory .* 80% of the host's 125\.0 GB"):
        resolve(load_config(DEMO, base + ["optim.offload=true", "train.offload_activations=true"]), small)
    longer = [*base, "data.context_len=262144", "data.tokens_per_microbatch=262144"]
    with pytest.raises(ConfigError, match=r"in host memory .*: no memory saving Loom weighs fits: lower"):
        resolve(load_config(DEMO, longer), small)  # (every setting auto: nothing left to let Loom choose)


def test_auto_memory_saving_counts_what_tp_and_pp_split(small_dataset):
    """The rule behind `auto` sees each GPU's share: with tp = 4 (heads, SwiGLU columns, states) or
    pp = 4 (layers, states) an 8B model at 32K recomputes fewer blocks than on one GPU, and what it
    chooses passes the memory check."""
    base = [f"data.path={small_dataset}", "model=llama-8b", "data.context_len=32768", "data.tokens_per_microbatch=32768",
            "train.loss_chunk=0", "train.activation_checkpointing=auto", "optim.offload=false"]
    one = resolve(load_config(DEMO, base + ["cluster.workers=1", "train.global_microbatches=1"]), H200)
    tp4 = resolve(load_config(DEMO, base + ["cluster.workers=4", "parallel.tp=4", "train.global_microbatches=1"]), H200)
    pp4 = resolve(load_config(DEMO, base + ["cluster.workers=4", "parallel.pp=4", "train.global_microbatches=4"]), H200)
    assert tp4.recomputed_blocks < one.recomputed_blocks and pp4.recomputed_blocks < one.recomputed_blocks


def test_the_memory_model_chunks_the_loss_only_where_the_trainer_does(small_dataset):
    """`train.loss_chunk` applies with tp = pp = 1; with tp (a loss-parallel cross-entropy over
    sharded logits) or pp the trainer computes every row's logits at once, and so does the model."""
    base = [f"data.path={small_dataset}", "model=llama-8b", "data.context_len=32768", "data.tokens_per_microbatch=32768",
            "train.loss_chunk=8192", "train.activation_checkpointing=auto", "optim.offload=false"]
    one = resolve(load_config(DEMO, base + ["cluster.workers=1", "train.global_microbatches=1"]), H200)
    tp2 = resolve(load_config(DEMO, base + ["cluster.workers=2", "parallel.tp=2", "train.global_microbatches=1"]), H200)
    pp2 = resolve(load_config(DEMO, base + ["cluster.workers=2", "parallel.pp=2", "train.global_microbatches=2"]), H200)
    assert one.cost_model().loss_chunk == 8192 and tp2.cost_model().loss_chunk == 0 == pp2.cost_model().loss_chunk
