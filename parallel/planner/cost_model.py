"""The cost model shared by adaptive sequence parallelism, `loom plan` and the trainer's choices.

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
token held (fewer when some blocks are recomputed in backward) and the loss's logits.

FLOPs and parameter counts come from `shape`, coefficients from a `HardwareProfile`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from parallel.planner.hardware import HardwareProfile
from parallel.planner.shape import ModelShape, fewest_blocks

BYTES = 2  # bf16 activations and K/V on the wire
MEMORY_RESERVE = 0.9  # share of a GPU's memory the model plans to use (the allocator needs the rest)
CommMethod = Literal["ring", "ulysses", "lasp2"]


@dataclass(frozen=True)
class CostModel:
    shape: ModelShape
    hw: HardwareProfile
    method: CommMethod = "ring"
    recomputed: float = 0.0  # fraction of blocks whose activations are recomputed in backward
    loss_chunk: int = 0  # rows of logits alive at once in the loss (0: all)

    # ------------------------------------------------------------------ time

    def attention_flops(self, lengths) -> np.ndarray:
        return self.shape.attention_kernel_flops(lengths)

    def linear_flops_per_token(self) -> float:
        return self.shape.linear_flops_per_token(self.recomputed)

    def comm_time(self, tokens, attention_flops, group: int):
        """Exposed communication of micro-batches with these token counts and attention FLOPs
        (scalars or arrays) on `group` ranks, all layers, fwd + bwd."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if group == 1:
            return np.zeros_like(tokens)
        m = self.shape
        bw = self.hw.link_bytes_per_s(group)
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

    def compute_time(self, tokens, attention_flops, group: int):
        """Seconds of attention and matmuls for these tokens and attention FLOPs split over `group` ranks."""
        return (np.asarray(attention_flops) / group / (self.hw.attention_tflops * 1e12)
                + self.linear_flops_per_token() * np.asarray(tokens) / group / (self.hw.matmul_tflops * 1e12))

    def _time(self, tokens, attention_flops, group: int):
        return (self.hw.microbatch_overhead_s + self.compute_time(tokens, attention_flops, group)
                + self.comm_time(tokens, attention_flops, group))

    def microbatch_time(self, lengths: list[int], group: int) -> float:
        """Time of one micro-batch holding documents of these lengths on `group` ranks."""
        return float(self._time(float(sum(lengths)), float(np.sum(self.attention_flops(lengths))), group))

    def sequence_times(self, lengths: np.ndarray, group: int) -> np.ndarray:
        """Each document alone in a micro-batch on `group` ranks (vectorised)."""
        n = np.asarray(lengths, dtype=np.float64)
        return self._time(n, self.attention_flops(n), group)

    # ------------------------------------------------------------------ memory

    def block_bytes_per_token(self, recomputed: bool) -> float:
        """Bytes one block holds per token for backward (bf16): its input alone when recomputed."""
        m = self.shape
        if recomputed:
            return 2 * m.dim * BYTES
        # norm inputs, projection inputs, q and the attention output, k and v, SwiGLU's inputs and product,
        # as saved with compiled element-wise regions: 71.6 KB/token measured for llama-1b-long on an H200
        return BYTES * (5 * m.dim + 2 * m.n_kv_heads * m.head_dim + 3 * m.hidden_dim)

    def layer_bytes_per_token(self) -> float:
        """Bytes all blocks hold per token; a recomputed block's full activations live again during
        its own backward."""
        f = self.recomputed
        held = self.shape.n_layers * (f * self.block_bytes_per_token(True) + (1 - f) * self.block_bytes_per_token(False))
        return held + (self.block_bytes_per_token(False) if f > 0 else 0.0)

    def logits_bytes(self, tokens: float) -> float:
        """The loss's bf16 logits and their fp32 gradient, `loss_chunk` rows at a time."""
        rows = min(tokens, self.loss_chunk) if self.loss_chunk else tokens
        return rows * self.shape.vocab_size * (BYTES + 4)

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
        p = self.shape.params()
        return 12 * p / shard + (6 * p if unsharded_copy else 6 * p * 2 / max(1, self.shape.n_layers))

    def free_bytes(self, shard: int, unsharded_copy: bool = False) -> float:
        """Memory left for activations once the states are placed, MEMORY_RESERVE of the GPU usable."""
        return self.hw.gpu_memory_gb * 2**30 * MEMORY_RESERVE - self.state_bytes(shard, unsharded_copy)

    def tokens_per_gpu(self, shard: int, unsharded_copy: bool = False) -> int:
        """Most tokens one GPU can hold activations for, with the rest of memory for states."""
        free = self.free_bytes(shard, unsharded_copy) - (self.logits_bytes(self.loss_chunk) if self.loss_chunk else 0.0)
        return max(0, int(free / self.activation_bytes_per_token()))

    def blocks_to_recompute(self, tokens: int, shard: int) -> int:
        """The fewest blocks whose activations must be recomputed for `tokens` tokens per micro-batch
        to fit on one GPU (selective activation checkpointing); all blocks when even that does not fit."""
        n = self.shape.n_layers
        free = self.free_bytes(shard)
        return fewest_blocks(n, lambda k: replace(self, recomputed=k / n).activation_bytes(tokens) <= free)
