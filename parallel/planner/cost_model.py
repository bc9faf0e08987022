"""The cost model shared by adaptive sequence parallelism and `loom plan`.

Time of one micro-batch of documents with lengths L_i on an SP group of d ranks:

    t = e                                          fixed cost of a micro-batch (launches, hooks)
      + Σ_i attention_flops(L_i) / (d · A)         softmax layers, ∝ L²/d (A: attention TFLOP/s)
      + linear_flops · Σ_i L_i / (d · M)           projections, MLP, linear attention, ∝ L/d
      + comm(Σ L_i, d)                             per SP method, exposed part only

Communication per method, per layer, on the link the group spans (NVLink inside a node):
ring — (d−1) hops of K/V forward and K/V + fp32 dK/dV backward, each hidden behind that hop's
attention when the hop's compute is longer; ulysses — four all-to-alls of activations forward
and four backward, not hidden; lasp2 — one all-gather of the d_k × d_v state per head, independent
of L. Memory per GPU: FSDP-sharded weights, gradients and AdamW states plus activations per
token held (fewer with activation checkpointing of some or all blocks) and the loss's logits.

Coefficients live in a `HardwareProfile` — measured by `loom profile`, or a preset from the
figures measured so far (DESIGN.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config import ModelConfig


@dataclass
class HardwareProfile:
    name: str = "H200"
    gpu_memory_gb: float = 139.0  # usable
    matmul_tflops: float = 600.0  # achieved bf16 dense in a model step (the ceiling measured is ≈ 790)
    attention_tflops: float = 540.0  # cuDNN fwd+bwd, flash-attention FLOP convention
    intra_node_gbps: float = 290.0  # per direction, NVLink
    inter_node_gbps: float = 25.0  # per GPU, e.g. 200 Gb/s InfiniBand
    gpus_per_node: int = 8
    microbatch_overhead_s: float = 0.015  # fixed time of one forward + backward of a micro-batch
    hop_latency_s: float = 2e-5

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS = {
    "H200": HardwareProfile(),
    "H100": HardwareProfile(name="H100", gpu_memory_gb=78.0, matmul_tflops=560.0, attention_tflops=500.0,
                            intra_node_gbps=200.0),
    # For CPU tests and the local demo: numbers of the right shape, not a measurement.
    "cpu": HardwareProfile(name="cpu", gpu_memory_gb=4.0, matmul_tflops=0.05, attention_tflops=0.02,
                           intra_node_gbps=2.0, inter_node_gbps=1.0, gpus_per_node=64,
                           microbatch_overhead_s=0.02, hop_latency_s=1e-4),
}


def hardware_profile(spec: str, device_name: str = "") -> HardwareProfile:
    """A preset name (H200, H100, cpu), the path of a profile written by `loom profile`, or
    'auto': the preset whose name the device's name contains (cpu when none does)."""
    if spec == "auto":
        return next((p for name, p in PRESETS.items() if name in device_name), PRESETS["cpu"])
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).is_file():
        return HardwareProfile.load(spec)
    raise ValueError(f"unknown hardware profile '{spec}' (a preset: {', '.join(PRESETS)}; or a JSON file)")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_profile(spec: str, device: torch.device) -> HardwareProfile:
    """The profile of this process's device (`spec` as for `hardware_profile`), with the device's
    own memory on a GPU."""
    hw = hardware_profile(spec, device_name(device))
    if device.type == "cuda":
        hw = replace(hw, gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return hw


BYTES = 2  # bf16 activations and K/V on the wire


@dataclass
class CostModel:
    model: ModelConfig
    hw: HardwareProfile
    method: str = "ring"  # ring | ulysses | lasp2 (for the model's softmax / linear layers)
    activation_checkpointing: float = 0.0  # fraction of blocks recomputed in backward (True: all)
    loss_chunk: int = 0  # rows of logits alive at once in the loss (0: all)

    # ------------------------------------------------------------------ FLOPs

    def attention_flops(self, length):
        """Kernel FLOPs of causal attention over documents of these lengths (int or array), all
        layers, fwd + bwd (3.5 × fwd)."""
        m = self.model
        n = np.asarray(length, dtype=np.float64)
        pairs = n * (n + 1) / 2
        if m.window:
            w = float(m.window)
            pairs = np.where(n > w, w * (w + 1) / 2 + (n - w) * w, pairs)
        return 3.5 * 4 * m.n_heads * m.head_dim * m.softmax_layers * pairs

    def linear_flops_per_token(self) -> float:
        m = self.model
        per_layer = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.dim * m.hidden_dim
        recompute = 2.0 * float(self.activation_checkpointing) * m.n_layers * per_layer  # fwd again before bwd
        return 6.0 * (m.n_layers * per_layer + m.dim * m.vocab_size) + recompute

    # ------------------------------------------------------------------ time

    def bandwidth(self, group: int) -> float:
        gbps = self.hw.intra_node_gbps if group <= self.hw.gpus_per_node else self.hw.inter_node_gbps
        return gbps * 1e9

    def comm_time(self, tokens, attention_flops, group: int):
        """Exposed communication of micro-batches with these token counts and attention FLOPs
        (scalars or arrays) on `group` ranks, all layers, fwd + bwd."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if group == 1:
            return np.zeros_like(tokens)
        m = self.model
        bw = self.bandwidth(group)
        lat = self.hw.hop_latency_s
        if self.method == "lasp2":
            state = m.n_heads * m.head_dim * m.head_dim * 4 * group  # fp32 states of every rank
            return np.full_like(tokens, m.n_layers * 3 * (state / bw + lat))
        if self.method == "ulysses":
            per_rank = tokens / group * (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim * BYTES
            return m.n_layers * 2 * (per_rank * (group - 1) / group / bw + 4 * lat)
        kv_hop = 2 * tokens / group * m.n_kv_heads * m.head_dim * BYTES
        hop_compute = np.asarray(attention_flops) / m.n_layers / group / group / (self.hw.attention_tflops * 1e12)
        fwd = np.maximum(0.0, kv_hop / bw - hop_compute / 3.5) + lat
        bwd = np.maximum(0.0, 3 * kv_hop / bw - hop_compute * 2.5 / 3.5) + lat
        return m.n_layers * (group - 1) * (fwd + bwd)

    def _time(self, tokens, attention_flops, group: int):
        return (self.hw.microbatch_overhead_s + attention_flops / group / (self.hw.attention_tflops * 1e12)
                + self.linear_flops_per_token() * tokens / group / (self.hw.matmul_tflops * 1e12)
                + self.comm_time(tokens, attention_flops, group))

    def microbatch_time(self, lengths: list[int], group: int) -> float:
        """Time of one micro-batch holding documents of these lengths on `group` ranks."""
        return float(self._time(float(sum(lengths)), float(np.sum(self.attention_flops(lengths))), group))

    def sequence_times(self, lengths: np.ndarray, group: int) -> np.ndarray:
        """Each document alone in a micro-batch on `group` ranks (vectorised)."""
        n = np.asarray(lengths, dtype=np.float64)
        return self._time(n, self.attention_flops(n), group)

    # ------------------------------------------------------------------ memory

    def params(self) -> int:
        m = self.model
        per_layer = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.dim * m.hidden_dim + 2 * m.dim
        embed = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
        return m.n_layers * per_layer + embed + m.dim

    def block_bytes_per_token(self, checkpointed: bool) -> float:
        """Bytes one block holds per token for backward (bf16): its input alone when checkpointed."""
        m = self.model
        if checkpointed:
            return 2 * m.dim * BYTES
        # norm inputs, projection inputs, q and the attention output, k and v, SwiGLU's inputs and product,
        # as saved with compiled element-wise regions: 71.6 KB/token measured for llama-1b-long on an H200
        return BYTES * (5 * m.dim + 2 * m.n_kv_heads * m.head_dim + 3 * m.hidden_dim)

    def layer_bytes_per_token(self) -> float:
        """Bytes all blocks hold per token; a recomputed block's full activations live again during
        its own backward."""
        m, f = self.model, float(self.activation_checkpointing)
        held = m.n_layers * (f * self.block_bytes_per_token(True) + (1 - f) * self.block_bytes_per_token(False))
        return held + (self.block_bytes_per_token(False) if f > 0 else 0.0)

    def logits_bytes(self, tokens: float) -> float:
        """The loss's bf16 logits and their fp32 gradient, `loss_chunk` rows at a time."""
        rows = min(tokens, self.loss_chunk) if self.loss_chunk else tokens
        return rows * self.model.vocab_size * (BYTES + 4)

    def activation_bytes(self, tokens: float) -> float:
        """Bytes of activations held for backward by `tokens` tokens on one GPU."""
        return self.layer_bytes_per_token() * tokens + self.logits_bytes(tokens)

    def activation_bytes_per_token(self) -> float:
        """Bytes per token for long micro-batches (the logits of a chunked loss do not grow)."""
        return self.layer_bytes_per_token() + (0.0 if self.loss_chunk else self.logits_bytes(1.0))

    def state_bytes(self, shard: int, unsharded_copy: bool = False) -> float:
        """Weights and AdamW states at the memory peak — the start of backward, when activations are
        all alive and gradients not yet — over `shard` ranks: fp32 master weights and two moments
        (12 B/param), one block's gradients and gathered bf16 weights; `unsharded_copy` adds the bf16
        weights and fp32 gradients held whole (adaptive mode)."""
        p = self.params()
        return 12 * p / shard + (6 * p if unsharded_copy else 6 * p * 2 / max(1, self.model.n_layers))

    def free_bytes(self, shard: int, unsharded_copy: bool = False, reserve: float = 0.9) -> float:
        """Memory left for activations once the states are placed, `reserve` of the GPU usable."""
        return self.hw.gpu_memory_gb * 2**30 * reserve - self.state_bytes(shard, unsharded_copy)

    def tokens_per_gpu(self, shard: int, unsharded_copy: bool = False, reserve: float = 0.9) -> int:
        """Most tokens one GPU can hold activations for, with the rest of memory for states."""
        free = self.free_bytes(shard, unsharded_copy, reserve) - (self.logits_bytes(self.loss_chunk) if self.loss_chunk else 0.0)
        return max(0, int(free / self.activation_bytes_per_token()))

    def blocks_to_checkpoint(self, tokens: int, shard: int, reserve: float = 0.9) -> int:
        """The fewest blocks whose activations must be recomputed for `tokens` tokens per micro-batch
        to fit on one GPU (selective activation checkpointing); all blocks when even that does not fit."""
        n = self.model.n_layers
        for k in range(n + 1):
            if replace(self, activation_checkpointing=k / n).activation_bytes(tokens) <= self.free_bytes(shard, reserve=reserve):
                return k
        return n
