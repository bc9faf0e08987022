"""The resolved job: a config turned, once, into every decision a run needs.

`resolve(cfg, target)` checks every layout and compatibility rule and decides the parallel
degrees, the hardware profile (the workers' device, its memory, the cluster's overrides), the
attention backend, precision and compilation, how activations fit (recomputed blocks, kept
attention outputs, SwiGLU tiles) and the adaptive SP budget. The CLI's pre-flight, `loom plan`, `loom profile`, the launcher, every
worker and the benchmarks use its `Job`, so no two of them can disagree; a mistake is one
`ConfigError` line before any worker starts. `Target` is the device the workers run on: the
launcher finds it (this machine for an embedded cluster, a probe of a remote one) and hands it in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from parallel.choices import CUDA_BACKENDS, AttentionBackendName, fastest_backend
from parallel.layout import Layout, largest_ulysses, ring_and_ulysses
from parallel.planner.cost_model import HOST_RESERVE, MEMORY_RESERVE, CostModel
from parallel.planner.hardware import HardwareProfile, UnknownProfile, named_profile
from parallel.planner.memory_saving import MemorySaving, choose, options
from trainer.config import ConfigError, JobConfig, ModelConfig, config_from_dict

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Target:
    """The device each worker of the job runs on."""

    device: Literal["cpu", "cuda"]
    name: str = "cpu"  # as torch names it, e.g. "NVIDIA H200"
    memory_gb: float = 0.0  # the device's memory (0 on CPU: the profile's figure stands)
    host_memory_gb: float = 0.0  # its host's physical memory, shared by the host's workers (0: the profile's)

    @classmethod
    def this_process(cls) -> "Target":
        """This process's device: its first visible GPU, else the CPU."""
        import torch

        if not torch.cuda.is_available():
            return cls("cpu")
        from trainer.host_adamw import host_memory_bytes

        props = torch.cuda.get_device_properties(0)
        return cls("cuda", props.name, props.total_memory / 2**30, host_memory_bytes() / 2**30)


@dataclass(frozen=True)
class Job:
    cfg: JobConfig
    layout: Layout
    target: Target
    hardware: HardwareProfile
    attention_backend: AttentionBackendName
    precision: Precision
    compile: bool
    memory_saving: MemorySaving
    tokens_per_gpu: int  # adaptive SP: activation budget per rank; 0 for static layouts

    @property
    def recomputed_blocks(self) -> int:
        return self.memory_saving.recomputed

    @property
    def model(self) -> ModelConfig:
        return self.cfg.model

    @property
    def peak_tflops(self) -> float | None:
        """Per-device dense peak for MFU (None where unknown: CPUs)."""
        return self.cfg.cluster.peak_tflops or self.hardware.peak_tflops or None

    def cost_model(self) -> CostModel:
        """The job's cost model, with its memory saving applied."""
        return self.memory_saving.applied(cost_model(self.cfg, self.layout, self.hardware))


def cost_model(cfg: JobConfig, layout: Layout, hw: HardwareProfile) -> CostModel:
    """The job's cost model (its model, hardware, SP method's communication and loss chunking),
    before any memory saving. The loss is chunked only where the trainer chunks it: one rank holds
    the whole vocabulary and the last layer (tp = pp = 1)."""
    method = "ulysses" if layout.sp_method == "ulysses" else "ring"
    chunk = cfg.train.loss_chunk if layout.tp == 1 and layout.pp == 1 else 0
    return CostModel(cfg.model.shape, hw, method=method, loss_chunk=chunk)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_layout(cfg: JobConfig, world: int | None = None) -> Layout:
    """The parallel degrees of a config on `world` workers (default: cluster.workers), with every
    rule a layout must obey; what does not depend on the device."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    world = cfg.cluster.workers if world is None else world
    for name, degree in (("tp", p.tp), ("pp", p.pp), ("sp.degree", p.sp.degree)):
        _require(degree >= 1, f"parallel.{name} must be >= 1, got {degree}")
    inner = p.pp * p.tp * p.sp.degree
    _require(world % inner == 0, f"{world} workers cannot hold pp={p.pp} × tp={p.tp} × sp={p.sp.degree}")
    dp = world // inner if p.dp == -1 else p.dp
    _require(dp >= 1 and dp * inner == world,
             f"layout dp={dp} × pp={p.pp} × tp={p.tp} × sp={p.sp.degree} does not multiply to {world} workers")
    _require(p.sp.ulysses >= 0, f"parallel.sp.ulysses must be >= 0, got {p.sp.ulysses}")
    try:
        ring, ulysses = ring_and_ulysses(p.sp.method, p.sp.degree,
                                         p.sp.ulysses or largest_ulysses(p.sp.degree, m.n_heads, m.n_kv_heads, p.tp))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if ulysses > 1:
        _require(m.n_heads % ulysses == 0, f"n_heads={m.n_heads} is not divisible by the Ulysses degree {ulysses}")
        _require(m.n_kv_heads % ulysses == 0 or ulysses % m.n_kv_heads == 0,
                 f"n_kv_heads={m.n_kv_heads} and the Ulysses degree {ulysses}: one must divide the other")
    _require(m.n_heads % (p.tp * ulysses) == 0,
             f"model.n_heads={m.n_heads} is not divisible by tp × ulysses = {p.tp * ulysses}")
    _require(m.n_kv_heads % p.tp == 0, f"model.n_kv_heads={m.n_kv_heads} is not divisible by tp={p.tp}")
    adaptive = p.sp.mode == "adaptive"
    if adaptive:
        _require(p.pp * p.tp == 1, "adaptive SP with tp or pp > 1 is not supported in this version of Loom")
        if p.sp.group_sizes == "any":
            _require(p.sp.method == "ring", "adaptive SP with groups of any size (parallel.sp.group_sizes=any) "
                     "needs parallel.sp.method ring: a Ulysses group's size must divide the heads")
        else:
            _require(not p.sp.degree & (p.sp.degree - 1) and p.sp.method in ("ring", "ulysses"),
                     "adaptive SP needs a power-of-two parallel.sp.degree (the largest group) "
                     "and parallel.sp.method ring or ulysses")
    else:
        _require(t.global_microbatches % dp == 0,
                 f"train.global_microbatches={t.global_microbatches} is not divisible by dp={dp}")
    virtual = p.pp_virtual if p.pp > 1 else 1
    _require(p.pp_schedule == "1f1b" or p.pp_virtual >= 2,
             "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual >= 2 stages per rank")
    if p.pp > 1:
        stages = p.pp * virtual
        _require(m.n_layers % stages == 0,
                 f"model.n_layers={m.n_layers} is not divisible by pp × pp_virtual = {stages} stages")
        per_rank = t.global_microbatches // dp
        _require(per_rank >= p.pp and (p.pp_schedule == "1f1b" or per_rank % p.pp == 0),
                 f"pp={p.pp} needs at least pp micro-batches per data-parallel rank (a multiple of pp for "
                 f"interleaved 1F1B); train.global_microbatches / dp = {per_rank}")
    if p.dp_engine == "deepspeed":
        _require(cfg.optim.offload is not True, "optim.offload is Loom's own AdamW; with parallel.dp_engine="
                 "deepspeed set DeepSpeed's offload_optimizer in parallel.deepspeed instead")
        _require(p.tp == p.pp == p.sp.degree == 1,
                 "parallel.dp_engine=deepspeed runs data parallelism only (tp = pp = sp.degree = 1)")
        _require("://" not in cfg.checkpoint.folder,
                 "parallel.dp_engine=deepspeed saves its checkpoints to a local or shared path, not a URL")
    _require(t.keep_attention is not True or ring == 1,
             f"train.keep_attention keeps one attention output per block; with ring SP (degree {ring}) every hop's "
             f"partial output would be kept: use parallel.sp.method=ulysses or train.keep_attention=false")
    if p.sp.degree > 1:
        if m.has_linear:
            _require(p.sp.method in ("ring", "ring_bidir", "allgather"),
                     f"models with linear-attention layers use sp.method ring, ring_bidir or allgather, not {p.sp.method}")
            _require(not adaptive, "adaptive SP of models with linear-attention layers is not supported")
            _require(not m.window, "sliding windows in models with linear-attention layers are not supported")
        else:
            _require(p.sp.method != "allgather", "parallel.sp.method=allgather (LASP-2H) is for hybrid models "
                     "with linear-attention layers; softmax-only models use ring, ring_bidir, ulysses or hybrid")
    return Layout(dp=dp, pp=p.pp, tp=p.tp, ring=ring, ulysses=ulysses, sp_method=p.sp.method, adaptive=adaptive,
                  pp_virtual=virtual)


def check_dataset(cfg: JobConfig) -> dict:
    """The dataset's manifest, after checking that its files read and that the model can train on it."""
    from trainer.dataset import DatasetError, check_dataset_files

    try:
        manifest = check_dataset_files(cfg.data.path)
    except DatasetError as err:
        raise ConfigError(f"data.path: {err}") from None
    vocab = manifest["tokenizer"]["vocab_size"]
    _require(cfg.model.vocab_size >= vocab, f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
                                            f"vocabulary ({vocab}, {manifest['tokenizer']['name']})")
    return manifest


def check_pretrained(cfg: JobConfig) -> None:
    """`model.init_from`'s weights, by their safetensors headers: every tensor of the model, whole."""
    if not cfg.model.init_from:
        return
    import torch

    from trainer.hf import WeightsError, check_weights
    from trainer.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    try:
        check_weights(cfg.model.init_from, model, cfg.model.tie_embeddings)
    except WeightsError as err:
        raise ConfigError(f"model.init_from: {err}") from None


def hardware(cfg: JobConfig, target: Target) -> HardwareProfile:
    """The cost model's coefficients for the workers' device: `cluster.profile` (auto: the device's
    preset), the device's own memory and its host's share per worker, then the cluster's overrides."""
    c = cfg.cluster
    try:
        hw = named_profile(c.profile, target.name)
    except UnknownProfile as err:
        raise ConfigError(str(err)) from None
    if target.memory_gb:
        hw = replace(hw, gpu_memory_gb=target.memory_gb)
    if target.host_memory_gb:
        hw = replace(hw, host_memory_gb=target.host_memory_gb / (c.workers // c.nodes))
    overrides = {k: getattr(c, k) for k in ("gpu_memory_gb", "intra_node_gbps", "inter_node_gbps") if getattr(c, k)}
    return replace(hw, gpus_per_node=c.workers // c.nodes, **overrides)


def memory_saving(cfg: JobConfig, layout: Layout, hw: HardwareProfile, gpu: bool = True) -> MemorySaving:
    """Recomputed blocks, kept attention outputs, SwiGLU tiles, offloaded AdamW moments and
    offloaded inputs of recomputed blocks, as configured; what is `auto` is chosen by
    `parallel.planner.memory_saving`'s rule for one micro-batch's share of a rank (tokens / sp): the
    fewest blocks recomputed that fit the device, then the fastest step (inputs go to the host only
    from a GPU: on a CPU there is nothing to gain)."""
    t, n = cfg.train, cfg.model.n_layers
    setting = t.activation_checkpointing
    blocks = None if setting == "auto" else (n if setting is True else int(setting))
    cost = cost_model(cfg, layout, hw)
    offload = cfg.optim.offload if cfg.parallel.dp_engine == "fsdp2" else False
    inputs = t.offload_activations if t.offload_activations != "auto" else (None if gpu else False)
    combos = options(None if t.keep_attention == "auto" else t.keep_attention,
                     None if t.mlp_tile_tokens == "auto" else t.mlp_tile_tokens, layout.ring == 1,
                     cfg.data.tokens_per_microbatch // layout.sp, None if offload == "auto" else offload, inputs)
    microbatches = max(1, t.global_microbatches // layout.dp)

    def step_seconds(s: MemorySaving) -> float:
        c = s.applied(cost)
        return (microbatches * c.microbatch_time([cfg.data.tokens_per_microbatch], layout.sp)
                + c.step_fixed_time(layout.dp * layout.sp * layout.tp * layout.pp))  # (the whole model's shard)

    return choose(n, combos, blocks, lambda s: gpu_bytes(cfg, layout, s.applied(cost)),
                  hw.gpu_memory_gb * 2**30 * MEMORY_RESERVE, lambda s: host_bytes(cfg, layout, s.applied(cost)),
                  hw.host_memory_gb * 2**30 * HOST_RESERVE, step_seconds)


def gpu_bytes(cfg: JobConfig, layout: Layout, cost: CostModel) -> float:
    """Peak bytes on one GPU for the largest micro-batch: weights and optimizer states sharded over
    dp × sp and split by tp × pp (adaptive SP also holds the weights and gradients whole), and the
    activations of its share of the micro-batch (tokens / sp)."""
    states = cost.state_bytes(layout.dp * layout.sp, unsharded_copy=layout.adaptive,
                              microbatches=cfg.train.global_microbatches // layout.dp)
    return states / (layout.tp * layout.pp) + cost.activation_bytes(cfg.data.tokens_per_microbatch // layout.sp,
                                                                     layout.tp, layout.dp * layout.sp)


def host_bytes(cfg: JobConfig, layout: Layout, cost: CostModel) -> float:
    """Host bytes one rank fills with its offloads: its shard of AdamW's moments, and its recomputed
    blocks' inputs for its share of the largest micro-batch."""
    return cost.host_bytes(cfg.data.tokens_per_microbatch // layout.sp, layout.dp * layout.sp * layout.tp * layout.pp)


def adaptive_budget(cfg: JobConfig, layout: Layout, hw: HardwareProfile, saving: MemorySaving) -> int:
    """Adaptive SP: each rank's activation budget in tokens, with the job's memory saving — what the
    GPU holds, and no more than the host holds of the inputs it offloads; the largest group must
    hold the context."""
    if not layout.adaptive:
        return 0
    cost = saving.applied(cost_model(cfg, layout, hw))
    shard = layout.dp * layout.sp * layout.tp * layout.pp
    budget = cfg.parallel.sp.tokens_per_gpu or min(cost.tokens_per_gpu(cfg.cluster.workers, unsharded_copy=True),
                                                    cost.host_tokens(shard))
    host = cost.host_bytes(budget, shard) / 2**30
    _require(host <= hw.host_memory_gb * HOST_RESERVE,
             f"parallel.sp.tokens_per_gpu={budget:,} puts {host:.1f} GB per GPU in host memory with "
             f"{saving.describe(cfg.model.n_layers)}; {100 * HOST_RESERVE:.0f}% of the host's "
             f"{hw.host_memory_gb:.1f} GB per GPU is {hw.host_memory_gb * HOST_RESERVE:.1f} GB")
    _require(cfg.data.context_len <= layout.sp * budget,
             f"data.context_len={cfg.data.context_len:,} tokens fits no SP group: the largest ({layout.sp} ranks × "
             f"{budget:,} tokens per rank) holds {layout.sp * budget:,}")
    return budget


def resolve(cfg: JobConfig, target: Target, world: int | None = None) -> Job:
    """Every decision of a run on `world` workers (default: cluster.workers) of `target`'s device."""
    layout = check_layout(cfg, world)
    backend = cfg.model.attention_backend
    if backend == "auto":
        backend = fastest_backend(target.device)
    _require(target.device == "cuda" or backend not in CUDA_BACKENDS,
             f"model.attention_backend={backend} needs CUDA GPUs; the workers run on the CPU")
    hw = hardware(cfg, target)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if target.device == "cuda" else "fp32")
    compile_ = cfg.train.compile if cfg.train.compile != "auto" else target.device == "cuda"
    saving = memory_saving(cfg, layout, hw, gpu=target.device == "cuda")
    if target.device == "cuda" and not layout.adaptive:
        check_memory(cfg, layout, hw, saving)
    return Job(cfg, layout, target, hw, backend, precision, bool(compile_), saving,
               adaptive_budget(cfg, layout, hw, saving))


def check_memory(cfg: JobConfig, layout: Layout, hw: HardwareProfile, saving: MemorySaving) -> None:
    """The largest micro-batch must fit a GPU by the cost model's memory estimate (its share per
    rank, with the job's memory saving); else one line naming it and what it needs."""
    n, tokens = cfg.model.n_layers, cfg.data.tokens_per_microbatch
    cost = saving.applied(cost_model(cfg, layout, hw))
    need = gpu_bytes(cfg, layout, cost) / 2**30
    t = cfg.train
    all_auto = all(v == "auto" for v in (t.activation_checkpointing, t.keep_attention, t.mlp_tile_tokens,
                                         t.offload_activations, cfg.optim.offload))
    remedy = ("no memory saving Loom weighs fits: lower data.tokens_per_microbatch or raise parallel.sp.degree"
              if all_auto
              else "let Loom choose (train.activation_checkpointing, keep_attention, mlp_tile_tokens, "
                   "offload_activations and optim.offload: auto), lower data.tokens_per_microbatch or raise "
                   "parallel.sp.degree")
    _require(need <= hw.gpu_memory_gb, f"a micro-batch of {tokens:,} tokens ({tokens // layout.sp:,} per GPU) needs "
             f"{need:.1f} GB on each GPU with {saving.describe(n)}; the GPUs hold {hw.gpu_memory_gb:.1f} GB: {remedy}")
    host = host_bytes(cfg, layout, cost) / 2**30
    _require(host <= hw.host_memory_gb * HOST_RESERVE,
             f"a micro-batch of {tokens:,} tokens ({tokens // layout.sp:,} per GPU) puts {host:.1f} GB per GPU in host "
             f"memory with {saving.describe(n)}; {100 * HOST_RESERVE:.0f}% of the host's {hw.host_memory_gb:.1f} GB per "
             f"GPU is {hw.host_memory_gb * HOST_RESERVE:.1f} GB: {remedy}")


def check_resumable(cfg: JobConfig, data_fingerprint: str, location: str, marker: dict[str, Any]) -> None:
    """A checkpoint resumes only into the model it holds and onto the sample stream it left."""
    from trainer.checkpoint import CheckpointError

    saved = config_from_dict(marker["config"]).model
    if (saved.shape != cfg.model.shape or saved.layer_kinds() != cfg.model.layer_kinds()
            or (saved.attention_bias, saved.qk_norm) != (cfg.model.attention_bias, cfg.model.qk_norm)):
        changed = ", ".join(f"model.{k}={getattr(saved, k)} (now {getattr(cfg.model, k)})"
                            for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                      "tie_embeddings", "window", "layer_pattern", "attention_bias", "qk_norm") if getattr(saved, k) != getattr(cfg.model, k))
        raise CheckpointError(f"{location} holds another model: {changed}; resume it with its own model "
                              f"config, or train this one under another name")
    if marker.get("data", data_fingerprint) != data_fingerprint:
        raise CheckpointError(f"{location} was trained on other data or packing (data.path, context_len, "
                              f"tokens_per_microbatch, bucket_edges or seed differ); an exact resume is impossible: "
                              f"restore them, or train under another name")


def check_resume(cfg: JobConfig) -> None:
    """Before any worker starts: the run's newest checkpoint, if any, holds this config's model and
    continues this config's sample stream (the trainer checks again on the checkpoint it loads)."""
    from trainer.checkpoint import complete_checkpoints, read_marker
    from trainer.dataset import read_manifest
    from trainer.sampler import PackedSampler
    from trainer.stats import read_lengths

    found = complete_checkpoints(cfg.checkpoint_folder)
    if not found:
        return
    location = found[-1][1]
    try:
        marker = read_marker(location)
    except (OSError, ValueError):
        return  # a damaged marker: the trainer falls back to an older checkpoint and says so
    d = cfg.data
    stream = PackedSampler(read_lengths(d.path), d.context_len, d.tokens_per_microbatch, cfg.train.global_microbatches,
                           d.seed, d.bucket_edges, read_manifest(d.path)["source"]["fingerprint"])
    check_resumable(cfg, stream.fingerprint, location, marker)
