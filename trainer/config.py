"""Job configuration: dataclasses loaded from YAML, `key=value` overrides, validation.

A train config is one YAML file. A section may be written inline or as the path of another
YAML file holding that section (resolved relative to the file that names it, then to the
repository's `configs/<section>/` folder), so `model: small` and `model: ../model/small.yaml`
both work. Every choice is a `Literal` type, so its options are listed in one place. This module
checks each value on its own; the rules that tie values together (layouts, devices, the
dataset) are the resolved job's (`trainer.job`). Every mistake is one `ConfigError` line before
any worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from parallel.choices import (AttentionBackendName, FeatureMap, GroupSizes, LinearSPMethod, PipelineSchedule, Regroup,
                              SPMethod, SPMode, options)
from parallel.planner.shape import ModelShape
from trainer.hf_config import ROPE_SCALING_KEYS, SHAPE_KEYS, UnsupportedModel, model_section, read_config

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
Family = Literal["llama", "mistral", "qwen2", "qwen3"]


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line."""


@dataclass
class ModelConfig:
    vocab_size: int = 320
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: dim / n_heads
    ffn_dim: int = 0  # 0: SwiGLU default, 8/3·dim rounded up to a multiple of 64
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # Hugging Face's keys: rope_type linear | llama3 | yarn, …
    norm_eps: float = 1e-5
    window: int = 0  # sliding-window attention span in tokens; 0 = full causal
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections with a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
    family: Family = "llama"  # the Hugging Face architecture `loom export` writes
    init_from: str = ""  # a Hugging Face model folder: its shape and weights (steps, optimizer, data start fresh)
    init_std: float = 0.02
    attention_backend: Literal["auto"] | AttentionBackendName = "auto"  # auto: the fastest on the workers' device
    layer_pattern: str = ""  # S = softmax, L = linear attention, repeated over the layers; "" = all S
    linear_feature_map: FeatureMap = "elu"  # φ of linear attention's q and k (elu: elu + 1)
    linear_decay: bool = True  # per-head decay (RetNet); false: plain linear attention
    linear_chunk: int = 256  # chunk length of the chunkwise linear-attention computation

    def __post_init__(self) -> None:
        if not self.head_dim and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads

    def layer_kinds(self) -> list[str]:
        pattern = self.layer_pattern or "S"
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    @property
    def softmax_layers(self) -> int:
        return self.layer_kinds().count("S")

    @property
    def has_linear(self) -> bool:
        return "L" in self.layer_kinds()

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or -(-8 * self.dim // 3 // 64) * 64

    @property
    def shape(self) -> ModelShape:
        """The model as the cost model sees it."""
        return ModelShape(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                          n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, hidden_dim=self.hidden_dim,
                          softmax_layers=self.softmax_layers, window=self.window, tie_embeddings=self.tie_embeddings)


@dataclass
class DataConfig:
    path: str = ""
    context_len: int = 1024  # longest sequence; longer documents are split at this length
    tokens_per_microbatch: int = 4096  # token budget of one packed micro-batch
    bucket_edges: list[int] = field(default_factory=list)  # empty: powers of two up to context_len
    seed: int = 0
    prefetch: int = 4  # micro-batches read ahead by a background thread


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # AdamW's two moments in pinned host memory, streamed through the GPU at each step (8 B/param off the
    # GPU); auto: where that is what makes the job fit, or makes it faster (parallel.planner.memory_saving)
    offload: bool | Literal["auto"] = "auto"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_microbatches: int = 2  # micro-batches per optimizer step, summed over data-parallel ranks
    run_steps: int = 0  # stop this invocation after so many steps (0: run to max_steps)
    seed: int = 0
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # recompute blocks' activations in backward: false | true (every block) | N (N blocks, evenly spaced)
    # | auto (the fewest blocks that let a micro-batch fit the GPU, by the cost model's memory estimate)
    activation_checkpointing: bool | int | str = False
    # recomputed blocks keep their attention kernels' output, so backward runs only their matmuls and
    # element-wise work again (not with ring SP: every hop's partial output would be kept); auto: where
    # the cost model finds it faster within memory
    keep_attention: bool | Literal["auto"] = "auto"
    # the SwiGLU runs in tiles of this many tokens, each recomputed in backward (0: untiled); auto: tiles of
    # 16,384 where a rank holds more tokens and the cost model finds it faster within memory
    mlp_tile_tokens: int | Literal["auto"] = "auto"
    # the inputs recomputed blocks keep, in pinned host memory between forward and backward (dim × 2 bytes per
    # token and block off the GPU); auto: on GPUs, where the cost model finds it needed or faster
    offload_activations: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # torch.compile RMSNorm, SwiGLU and the q/k/v projections with RoPE; auto: on CUDA
    nonfinite: Literal["skip", "stop"] = "skip"  # a non-finite loss or gradient norm: skip the update, or stop
    max_consecutive_skips: int = 5  # skip: stop after this many non-finite steps in a row
    loss_chunk: int = 0  # > 0: cross-entropy this many tokens at a time, gradients formed in forward (not with tp, pp)


@dataclass
class CheckpointConfig:
    folder: str = ""  # "" = RUN_DIR/NAME/checkpoints; a shared path or an fsspec URL (s3://bucket/run, gs://…, file:///…)
    every: int = 100
    keep_last: int = 3
    async_save: bool = False
    damaged: Literal["stop", "start_over"] = "stop"  # checkpoints exist but none is intact: stop, or set them aside


@dataclass
class SequenceParallelConfig:
    degree: int = 1
    method: SPMethod = "ring"  # softmax layers (allgather: LASP-2H, hybrid models)
    linear_method: LinearSPMethod = "lasp2"  # linear-attention layers
    ulysses: int = 0  # hybrid only: Ulysses ranks inside each ring rank; 0 = the largest that fits the heads
    mode: SPMode = "static"  # adaptive: degree = the largest group; every step regroups all ranks
    tokens_per_gpu: int = 0  # adaptive: activation budget per rank; 0 = from the cost model's memory estimate
    solver_time_s: float = 1.0  # adaptive: time cap of the MILP that polishes the greedy plan; 0 = greedy only
    regroup: Regroup = "auto"  # adaptive: one grouping per step, a new one per round of micro-batches, or the faster
    group_sizes: GroupSizes = "powers_of_two"  # adaptive: any = every size up to a node's GPUs, whole nodes beyond (ring)


@dataclass
class ParallelConfig:
    dp: int = -1  # -1: every worker not used by tp/pp/sp
    tp: int = 1
    pp: int = 1
    pp_schedule: PipelineSchedule = "1f1b"
    pp_virtual: int = 1  # stages per pipeline rank (interleaved_1f1b: ≥ 2)
    dp_engine: Literal["fsdp2", "deepspeed"] = "fsdp2"  # deepspeed: ZeRO, data parallelism only
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed's ZeRO stage
    deepspeed: dict[str, Any] = field(default_factory=dict)  # deepspeed: settings merged over Loom's (offload …)
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)


@dataclass
class ClusterConfig:
    workers: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when there is one per worker
    cpus_per_worker: int = 1
    address: str = ""  # empty: an embedded local Ray cluster
    timeout_s: int = 300  # collective timeout; a hung collective fails after this
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: looked up from the device name
    max_failures: int = 0
    profile: str = "auto"  # hardware profile for the cost model: auto (by device), H200, H100, cpu, or a JSON file
    nodes: int = 1  # for planning and placement: workers = nodes × GPUs per node
    env: dict[str, str] = field(default_factory=dict)  # set in every worker (NCCL_*, GLOO_SOCKET_IFNAME, …)
    gpu_memory_gb: float = 0.0  # 0: the profile's
    intra_node_gbps: float = 0.0  # 0: the profile's
    inter_node_gbps: float = 0.0  # 0: the profile's


@dataclass
class JobConfig:
    name: str = "run"
    run_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def checkpoint_folder(self) -> str:
        """Where checkpoints live: a path or an fsspec URL."""
        return self.checkpoint.folder or str(self.run_path / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: JobConfig) -> None:
    """Checks each value on its own (types are checked while loading); raises ConfigError with one line."""
    m, d, o, t, c = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.cluster
    for name, value in [("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                        ("model.n_kv_heads", m.n_kv_heads), ("model.vocab_size", m.vocab_size),
                        ("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
                        ("model.linear_chunk", m.linear_chunk), ("data.context_len", d.context_len),
                        ("data.tokens_per_microbatch", d.tokens_per_microbatch), ("optim.lr", o.lr),
                        ("optim.eps", o.eps), ("train.max_steps", t.max_steps),
                        ("train.global_microbatches", t.global_microbatches), ("train.log_every", t.log_every),
                        ("checkpoint.every", cfg.checkpoint.every), ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                        ("cluster.workers", c.workers), ("cluster.cpus_per_worker", c.cpus_per_worker),
                        ("cluster.timeout_s", c.timeout_s), ("cluster.nodes", c.nodes),
                        ("parallel.pp_virtual", cfg.parallel.pp_virtual)]:
        _require(value > 0, f"{name} must be positive, got {value}")
    for name, value in [("model.ffn_dim", m.ffn_dim), ("model.window", m.window), ("model.init_std", m.init_std),
                        ("data.seed", d.seed), ("data.prefetch", d.prefetch), ("optim.weight_decay", o.weight_decay),
                        ("optim.grad_clip", o.grad_clip), ("optim.warmup_steps", o.warmup_steps),
                        ("train.run_steps", t.run_steps), ("train.seed", t.seed), ("train.loss_chunk", t.loss_chunk),
                        ("train.max_consecutive_skips", t.max_consecutive_skips),
                        ("parallel.sp.ulysses", cfg.parallel.sp.ulysses),
                        ("parallel.sp.tokens_per_gpu", cfg.parallel.sp.tokens_per_gpu),
                        ("parallel.sp.solver_time_s", cfg.parallel.sp.solver_time_s),
                        ("cluster.max_failures", c.max_failures), ("cluster.peak_tflops", c.peak_tflops),
                        ("cluster.gpu_memory_gb", c.gpu_memory_gb), ("cluster.intra_node_gbps", c.intra_node_gbps),
                        ("cluster.inter_node_gbps", c.inter_node_gbps)]:
        _require(value >= 0, f"{name} must be >= 0, got {value}")
    for name, value in _numbers(cfg):
        _require(math.isfinite(value), f"{name} must be a finite number, got {value}")
    explicit_head_dim = m.head_dim != m.dim // m.n_heads
    _require(explicit_head_dim or m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    _require(m.head_dim % 2 == 0, f"head dim {m.head_dim} must be even for rotary embeddings")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    _require(set(m.layer_pattern) <= {"S", "L"}, f"model.layer_pattern may hold only S and L, got '{m.layer_pattern}'")
    _check_rope_scaling(m.rope_scaling)
    _require(o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.min_lr_ratio >= 0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _require(0 < o.beta1 < 1 and 0 < o.beta2 < 1, "optim.beta1 and optim.beta2 must lie in (0, 1)")
    _require(d.tokens_per_microbatch >= d.context_len,
             f"data.tokens_per_microbatch={d.tokens_per_microbatch} is smaller than data.context_len={d.context_len}")
    _require(all(b > 0 for b in d.bucket_edges) and d.bucket_edges == sorted(set(d.bucket_edges)),
             "data.bucket_edges must be increasing positive integers")
    ac = t.activation_checkpointing
    _require(isinstance(ac, bool) or ac == "auto" or (isinstance(ac, int) and 0 <= ac <= m.n_layers),
             f"train.activation_checkpointing must be true, false, auto or a block count 0..{m.n_layers}, got {ac!r}")
    _require(t.mlp_tile_tokens == "auto" or (isinstance(t.mlp_tile_tokens, int) and t.mlp_tile_tokens >= 0),
             f"train.mlp_tile_tokens must be auto, 0 (untiled) or a positive token count, got {t.mlp_tile_tokens!r}")
    _require(t.keep_attention in (True, False, "auto"), f"train.keep_attention must be true, false or auto, "
             f"got {t.keep_attention!r}")
    _require(o.offload in (True, False, "auto"), f"optim.offload must be true, false or auto, got {o.offload!r}")
    _require(t.offload_activations in (True, False, "auto"),
             f"train.offload_activations must be true, false or auto, got {t.offload_activations!r}")
    if "://" in cfg.checkpoint.folder:
        _check_url(cfg.checkpoint.folder)
    _require(c.workers % c.nodes == 0, f"cluster.workers={c.workers} is not divisible by cluster.nodes={c.nodes}")
    _require(d.path != "", "data.path is not set (prepare a dataset with `loom prepare SRC OUT`)")
    _require(cfg.name not in ("", ".", "..") and "/" not in cfg.name,
             f"name must be a plain folder name, got '{cfg.name}'")


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    if not scaling:
        return
    kind = scaling.get("rope_type") or scaling.get("type")
    _require(kind in ROPE_SCALING_KEYS, f"model.rope_scaling: unknown type {kind!r} "
                                        f"(choose from {', '.join(ROPE_SCALING_KEYS)}, as rope_type)")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is None]
    _require(not missing, f"model.rope_scaling of type {kind} needs {', '.join(missing)}")
    _require(float(scaling["factor"]) > 0, f"model.rope_scaling.factor must be positive, got {scaling['factor']}")


def _numbers(section: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float of a config, by its dotted key."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out += _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            out.append((prefix + f.name, value))
    return out


def _check_url(url: str) -> None:
    """A checkpoint URL whose protocol fsspec knows and whose driver is installed."""
    import fsspec

    protocol = url.split("://", 1)[0]
    if protocol not in fsspec.available_protocols():
        raise ConfigError(f"checkpoint.folder: unknown storage protocol '{protocol}://' in {url}")
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        raise ConfigError(f"checkpoint.folder: {url} needs a package that is not installed ({err})") from None


# --------------------------------------------------------------------------- loading


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _literal_values(hint: Any) -> tuple:
    """The values of a Literal type or a union of Literal types; () for any other type."""
    if typing.get_origin(hint) is Literal:
        return options(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_literal_values(h) for h in typing.get_args(hint)]
        if all(parts):
            return tuple(v for part in parts for v in part)
    return ()


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Converts a YAML value to the field's annotated type, or raises ConfigError."""
    origin = typing.get_origin(hint)
    choices = _literal_values(hint)
    if choices:
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        listed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"unknown {key} '{value}' (choose from {listed})")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): v if item is Any else _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}' has an invalid value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = _section_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _resolve_section(name: str, ref: str, base: Path) -> dict[str, Any]:
    """A section given as a string names a YAML file: relative path, or a name under configs/<name>/."""
    candidates = [base / ref, CONFIG_ROOT / name / ref, CONFIG_ROOT / name / f"{ref}.yaml"]
    for path in candidates:
        if path.is_file():
            return _read_yaml(path)
    raise ConfigError(f"'{name}: {ref}' names no file (looked for {', '.join(str(c) for c in candidates)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], base: Path) -> dict[str, Any]:
    """Applies `a.b=value` overrides in order; `section=name` replaces a whole section from a file."""
    sections = _section_names()
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in sections and isinstance(value, str):
            raw[keys[0]] = _resolve_section(keys[0], value, base)
            continue
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _section_names() -> set[str]:
    return {name for name, hint in _section_types(JobConfig).items() if dataclasses.is_dataclass(hint)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Reads a train config, resolves section files, applies overrides and validates."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        base = path.resolve().parent
    for name in _section_names():
        if isinstance(raw.get(name), str):
            raw[name] = _resolve_section(name, raw[name], base)
    raw = apply_overrides(raw, overrides or [], Path.cwd())
    if isinstance(raw.get("model"), dict) and raw["model"].get("init_from"):
        raw["model"] = with_pretrained_shape(raw["model"])
    cfg = _build(JobConfig, raw)
    cfg.validate()
    return cfg


def with_pretrained_shape(model: dict[str, Any]) -> dict[str, Any]:
    """The model section of a config with `init_from`: the folder's shape, RoPE and family, under
    the keys the config sets (a shape key that disagrees is an error; RoPE settings override)."""
    folder = str(model["init_from"])
    try:
        pretrained = model_section(read_config(folder))
    except UnsupportedModel as err:
        raise ConfigError(str(err)) from None
    clash = next((k for k in SHAPE_KEYS if k in model and model[k] != pretrained[k]), None)
    _require(clash is None, f"model.{clash}={model.get(clash)!r} disagrees with {folder}/config.json, which gives "
                            f"{pretrained.get(clash)!r}; leave the model's shape to init_from")
    return {**pretrained, **model}


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Rebuilds a config saved with `JobConfig.to_dict` (checkpoints, worker hand-off)."""
    return _build(JobConfig, raw)


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
