"""The cost model shared by adaptive sequence parallelism, `loom plan` and the trainer's choices.

Time of one micro-batch of documents with lengths L_i on an SP group of d ranks:

    t = e                                          fixed cost of a micro-batch (launches, hooks)
      (+ the recomputed blocks' attention forward)
      + Σ_i attention_flops(L_i) / (d · A(L_i/d))  softmax layers, ∝ L²/d
        + Σ_i L_i/d · c(L_i/d)
      + linear_flops · Σ_i L_i / (d · M)           projections, MLP, linear attention, ∝ L/d
      + comm(Σ L_i, d)                             per SP method, exposed part only

A(n) is the attention kernel's rate on a rank's share of a document — cuDNN's where the share
reaches `dense_min_tokens` (the backend routes such documents to it), the varlen kernel's below —
and each kernel also costs a fixed time per token (it dominates for documents of a few hundred
tokens). The profile (`cluster.profile`, `loom profile`) holds the coefficients.

Communication per method, per layer, on the link the group spans (NVLink inside a node):
ring — (d−1) hops of K/V forward and K/V + fp32 dK/dV backward, each hidden behind that hop's
attention when the hop's compute is longer; ulysses — four all-to-alls of activations forward
and four backward, not hidden; lasp2 — one all-gather of the d_k × d_v state per head, independent
of L. Memory per GPU: FSDP-sharded weights, gradients and AdamW states plus activations per
token held (fewer when some blocks are recomputed in backward) and the loss's logits.

Two techniques trade time for memory beyond recomputing whole blocks: recomputed blocks that keep
their attention's output (`keep_attention`: only the cheap matmuls and element-wise work run
again, the attention output stays), and a SwiGLU run in tiles of `mlp_tile` tokens, each
recomputed in backward (`mlp_tile`: its hidden activations exist for one tile at a time, at the
price of one more MLP forward). A third moves state instead of activations: AdamW's two moments
in host memory (`offload_optimizer`), 8 bytes per parameter off the GPU for a copy in and out at
each step over the host link (both directions at once); and the recomputed blocks' inputs in host
memory (`offload_inputs`), copied out while the forward goes on and back, exposed, in backward.

FLOPs and parameter counts come from `shape`, coefficients from a `HardwareProfile`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from parallel.planner.hardware import HardwareProfile
from parallel.planner.shape import BACKWARD_KERNEL, ModelShape

BYTES = 2  # bf16 activations and K/V on the wire
MEMORY_RESERVE = 0.9  # share of a GPU's memory the model plans to use (the allocator needs the rest)
HOST_RESERVE = 0.8  # share of a host's memory that offloaded moments and activations may fill
RECOMPUTE_PEAK = 0.41  # of a block's activations, alive again while a recomputed block runs its backward
CommMethod = Literal["ring", "ulysses", "lasp2"]


@dataclass(frozen=True)
class CostModel:
    shape: ModelShape
    hw: HardwareProfile
    method: CommMethod = "ring"
    recomputed: float = 0.0  # fraction of blocks whose activations are recomputed in backward
    loss_chunk: int = 0  # rows of logits alive at once in the loss (0: all)
    keep_attention: bool = False  # recomputed blocks keep their attention output (no attention forward again)
    mlp_tile: int = 0  # tokens per SwiGLU tile (0: untiled)
    offload_optimizer: bool = False  # AdamW moments in host memory, streamed through the GPU at each step
    offload_inputs: bool = False  # recomputed blocks' inputs in host memory between forward and backward

    # ------------------------------------------------------------------ time

    def attention_flops(self, lengths) -> np.ndarray:
        return self.shape.attention_kernel_flops(lengths)

    def attention_time(self, lengths, group: int) -> np.ndarray:
        """Each document's attention seconds on `group` ranks (vectorised)."""
        n = np.asarray(lengths, dtype=np.float64)
        hw, width = self.hw, self.shape.n_heads * self.shape.head_dim * self.shape.softmax_layers
        flops, tokens = self.attention_flops(n) / group, n / group
        dense = flops / (hw.attention_tflops * 1e12) + tokens * hw.attention_token_s * width
        short = flops / (hw.short_attention_tflops * 1e12) + tokens * hw.short_attention_token_s * width
        return np.where(tokens >= hw.dense_min_tokens, dense, short)

    def linear_flops_per_token(self) -> float:
        return self.shape.linear_flops_per_token(self.recomputed)

    def comm_time(self, tokens, attention_s, group: int):
        """Exposed communication of micro-batches with these token counts and attention seconds per
        rank (scalars or arrays) on `group` ranks, all layers, fwd + bwd."""
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
        hop_compute = np.asarray(attention_s) / m.n_layers / group
        fwd = np.maximum(0.0, kv_hop / bw - hop_compute / 3.5) + lat
        bwd = np.maximum(0.0, 3 * kv_hop / bw - hop_compute * 2.5 / 3.5) + lat
        return m.n_layers * (group - 1) * (fwd + bwd)

    def matmul_time(self, tokens, group: int):
        """Seconds of the matmuls for these tokens split over `group` ranks."""
        tokens = np.asarray(tokens, dtype=np.float64)
        flops = self.linear_flops_per_token() * tokens
        if self.mlp_tile:  # a rank's share longer than a tile runs its SwiGLU forward once more
            m = self.shape
            flops = flops + np.where(tokens / group > self.mlp_tile, 6.0 * m.dim * m.hidden_dim * m.n_layers * tokens, 0.0)
        return flops / group / (self.hw.matmul_tflops * 1e12)

    def inputs_offload_time(self, tokens, group: int):
        """Seconds of bringing the recomputed blocks' inputs back from the host in backward."""
        if not self.offload_inputs:
            return 0.0
        m = self.shape
        return self.recomputed * m.n_layers * np.asarray(tokens) / group * m.dim * BYTES / (self.hw.host_gbps * 1e9)

    def compute_time(self, tokens, attention_s, group: int):
        """Seconds of a micro-batch's kernels and host copies on each of `group` ranks, given its
        attention seconds (`attention_time`, summed): recomputed blocks run their attention forward
        again unless they keep its output."""
        recompute = 1 + (0.0 if self.keep_attention else self.recomputed / BACKWARD_KERNEL)
        return attention_s * recompute + self.matmul_time(tokens, group) + self.inputs_offload_time(tokens, group)

    def _time(self, tokens, attention_s, group: int):
        return (self.hw.microbatch_overhead_s + self.compute_time(tokens, attention_s, group)
                + self.comm_time(tokens, attention_s, group))

    def step_fixed_time(self, shard: int) -> float:
        """What an optimizer step costs besides its micro-batches: the update of this rank's shard of
        the weights (its moments' trip from the host and back, when offloaded) and the step's fixed
        overhead."""
        params = self.shape.params() / shard
        offload = 8 * params / (self.hw.host_gbps * 1e9) if self.offload_optimizer else 0.0
        return self.hw.step_overhead_s + params * self.hw.optimizer_s_per_param + offload

    def microbatch_time(self, lengths: list[int], group: int) -> float:
        """Time of one micro-batch holding documents of these lengths on `group` ranks."""
        return float(self._time(float(sum(lengths)), float(np.sum(self.attention_time(lengths, group))), group))

    def microbatch_times(self, tokens, attention_s, group: int) -> np.ndarray:
        """Times of micro-batches with these token counts and attention seconds (summed over their
        documents, `attention_time`) on `group` ranks (vectorised)."""
        return np.asarray(self._time(np.asarray(tokens, dtype=np.float64), np.asarray(attention_s), group))

    def sequence_times(self, lengths: np.ndarray, group: int) -> np.ndarray:
        """Each document alone in a micro-batch on `group` ranks (vectorised)."""
        n = np.asarray(lengths, dtype=np.float64)
        return self._time(n, self.attention_time(n, group), group)

    # ------------------------------------------------------------------ memory

    def block_bytes_per_token(self, recomputed: bool) -> float:
        """Bytes one block holds per token for backward (bf16): its input alone when recomputed (on
        the host with `offload_inputs`), and the attention output with its fp32 log-sum-exp when it
        keeps them."""
        m = self.shape
        if recomputed:
            # (softmax layers only: linear-attention layers call no attention kernel)
            kept = m.n_heads * (m.head_dim * BYTES + 4) * m.softmax_layers / m.n_layers if self.keep_attention else 0.0
            return (0.0 if self.offload_inputs else m.dim * BYTES) + kept
        # norm inputs, projection inputs, q and the attention output, k and v, SwiGLU's inputs and product,
        # as saved with compiled element-wise regions, and 4% the allocator adds: 74.6 KB/token measured for
        # llama-1b-long on an H200 (64K tokens, no block recomputed); a tiled SwiGLU keeps only its input
        swiglu = 0 if self.mlp_tile else 3 * m.hidden_dim
        return 1.04 * BYTES * (5 * m.dim + 2 * m.n_kv_heads * m.head_dim + swiglu)

    def mlp_tile_bytes(self) -> float:
        """The SwiGLU's working set of one tile: its three hidden activations and their gradients
        (under tp a rank gathers tp tiles and holds 1/tp of their hidden columns: the same bytes)."""
        return 6.0 * self.mlp_tile * self.shape.hidden_dim * BYTES if self.mlp_tile else 0.0

    def layer_bytes_per_token(self) -> float:
        """Bytes all blocks hold per token; while a recomputed block runs its backward, part of its
        activations (RECOMPUTE_PEAK, fitted at 128K and 256K tokens with 7 and 13 blocks recomputed)
        lives again on top. Where every block is recomputed, no block's activations are freed before
        the first recomputed one runs its backward, and an untiled SwiGLU's three hidden activations
        come on top as well (measured: 512K tokens of llama-1b-long needed 24 GB more than the rest
        of this model says; Llama-3.1-8B at 128K ran out of memory)."""
        f = self.recomputed
        held = self.shape.n_layers * (f * self.block_bytes_per_token(True) + (1 - f) * self.block_bytes_per_token(False))
        swiglu = 1.04 * BYTES * 3 * self.shape.hidden_dim if f >= 1 and not self.mlp_tile else 0.0
        return held + (RECOMPUTE_PEAK * self.block_bytes_per_token(False) + swiglu if f > 0 else 0.0)

    def backward_bytes_per_token(self) -> float:
        """The working set of a block's backward, per token, on top of what the blocks hold: the
        gradients of the attention's output, q, k and v (bf16), the kernel's fp32 dQ accumulator, and
        the residual stream's gradient with the one it is added to (26.3 KB/token fitted for
        llama-1b-long on an H200 at 64K–1M tokens; this formula gives 26.6)."""
        m = self.shape
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        return BYTES * (2 * q + 2 * kv) + 4 * q + 2 * BYTES * m.dim

    def logits_bytes(self, tokens: float) -> float:
        """The loss's bf16 logits and their fp32 gradient, `loss_chunk` rows at a time."""
        rows = min(tokens, self.loss_chunk) if self.loss_chunk else tokens
        return rows * self.shape.vocab_size * (BYTES + 4)

    def activation_bytes(self, tokens: float, tp: int = 1) -> float:
        """Bytes of activations held for backward by `tokens` tokens on one GPU of a tp group (its
        heads and SwiGLU columns; a SwiGLU tile is gathered whole over tp)."""
        per_token = self.layer_bytes_per_token() + self.backward_bytes_per_token()
        return (per_token * tokens + self.logits_bytes(tokens)) / tp + self.mlp_tile_bytes()

    def activation_bytes_per_token(self) -> float:
        """Bytes per token for long micro-batches (the logits of a chunked loss do not grow)."""
        return (self.layer_bytes_per_token() + self.backward_bytes_per_token()
                + (0.0 if self.loss_chunk else self.logits_bytes(1.0)))

    def state_bytes(self, shard: int, unsharded_copy: bool = False, microbatches: int = 1) -> float:
        """Weights and AdamW states at the memory peak — the start of a backward, when activations are
        all alive — over `shard` ranks: fp32 master weights and two moments (12 B/param; 4 with the
        moments offloaded to the host), one block's
        gradients and gathered bf16 weights; `unsharded_copy` adds the bf16 weights and fp32 gradients
        held whole (adaptive mode). With several micro-batches a rank also holds, whole, the fp32
        gradients accumulated over those before (4 B/param; FSDP adds each block's bf16 gradients
        in as they come: 4.0 measured on an H200, llama-1b-long, 1 vs 2 and 4 micro-batches of the
        stdlib corpus), since gradients are reduced once per step."""
        p = self.shape.params()
        held = (4 if self.offload_optimizer else 12) * p / shard + (6 * p if unsharded_copy else 6 * p * 2 / max(1, self.shape.n_layers))
        if microbatches > 1 and not unsharded_copy:
            held += 4 * p
        return held

    def host_bytes(self, tokens: float, shard: int) -> float:
        """Host memory one rank fills: the AdamW moments of its shard of the weights (8 B/param,
        `offload_optimizer`) and its recomputed blocks' inputs for `tokens` tokens (`offload_inputs`)."""
        m = self.shape
        moments = 8 * m.params() / shard if self.offload_optimizer else 0.0
        inputs = self.recomputed * m.n_layers * tokens * m.dim * BYTES if self.offload_inputs else 0.0
        return moments + inputs

    def free_bytes(self, shard: int, unsharded_copy: bool = False, microbatches: int = 1) -> float:
        """Memory left for activations once the states are placed, MEMORY_RESERVE of the GPU usable."""
        return self.hw.gpu_memory_gb * 2**30 * MEMORY_RESERVE - self.state_bytes(shard, unsharded_copy, microbatches)

    def tokens_per_gpu(self, shard: int, unsharded_copy: bool = False) -> int:
        """Most tokens one GPU can hold activations for, with the rest of memory for states."""
        free = (self.free_bytes(shard, unsharded_copy) - (self.logits_bytes(self.loss_chunk) if self.loss_chunk else 0.0)
                - self.mlp_tile_bytes())
        return max(0, int(free / self.activation_bytes_per_token()))
