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
of L. Memory per GPU: FSDP-sharded weights and AdamW states, plus the highest of the moments a
peak can occur — the loss at the end of the forward (every block's activations held, the hidden
states it reads, the logits of a chunk) and each block's backward (the blocks before it holding
theirs, this block's whole activations back and its backward's working set, the gradients of the
blocks after it). The terms were measured block by block on an H200 (`benchmarks/activation_memory.py`).

Two techniques trade time for memory beyond recomputing whole blocks: recomputed blocks that keep
their attention's output (`keep_attention`: only the cheap matmuls and element-wise work run
again, the attention output stays), and a SwiGLU run in tiles of `mlp_tile` tokens, each
recomputed in backward (`mlp_tile`: its hidden activations exist for one tile at a time, at the
price of one more MLP forward). A third moves state instead of activations: AdamW's two moments
in host memory (`offload_optimizer`), 8 bytes per parameter off the GPU for a copy in and out at
each step over the host link (both directions at once); and the recomputed blocks' inputs in host
memory (`offload_inputs`), copied out while the forward goes on and back in backward, each while
the block after it runs its backward (only the first one back is exposed).

FLOPs and parameter counts come from `shape`, coefficients from a `HardwareProfile`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from parallel.planner.hardware import HardwareProfile
from parallel.planner.shape import BACKWARD_KERNEL, ModelShape, recomputed_block_ids

BYTES = 2  # bf16 activations and K/V on the wire
MEMORY_RESERVE = 0.9  # share of a GPU's memory the model plans to use (the allocator needs the rest)
HOST_RESERVE = 0.8  # share of a host's memory that offloaded moments and activations may fill
LOGIT_BYTES = 7.5  # per logit of the loss's working set (7.47 measured on an H200, 8,192-row chunks)
OUTPUT_BYTES = 7  # per output-layer parameter during forward and backward: its fp32 gradient and bf16 copy (fitted)
GRAD_BYTES = 4  # per parameter of a block whose backward is done: its fp32 gradient
LOSS_INPUTS = 1  # bf16 hidden states per token at the loss besides their gradient (the final norm's output)
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
        """Seconds of bringing the recomputed blocks' inputs back from the host in backward: the first
        one's copy, exposed; each later one travels while the block after it runs its backward, which
        takes longer at any length (a token's input, dim × 2 bytes over the host link, against the
        matmuls of a block's backward for that token)."""
        if not self.offload_inputs or not self.recomputed:
            return 0.0
        return np.asarray(tokens) / group * self.shape.dim * BYTES / (self.hw.host_gbps * 1e9)

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
        """Bytes one block holds per token from its forward to its backward (bf16). A recomputed
        block: its input (none on the GPU with `offload_inputs`), and with `keep_attention` the
        attention output and its fp32 log-sum-exp. Any other block: norm inputs, projection inputs,
        q and the attention output, k and v, and the SwiGLU's inputs and product as compiled
        element-wise regions save them, with 4% the allocator adds (75.8 KB/token measured for
        llama-1b-long, 74.5 by this formula); a tiled SwiGLU keeps only its input and output."""
        m = self.shape
        if recomputed:
            # (softmax layers only: linear-attention layers call no attention kernel)
            kept = m.n_heads * (m.head_dim * BYTES + 4) * m.softmax_layers / m.n_layers if self.keep_attention else 0.0
            return (0.0 if self.offload_inputs else m.dim * BYTES) + kept
        swiglu = m.dim if self.mlp_tile else 3 * m.hidden_dim
        return 1.04 * BYTES * (5 * m.dim + 2 * m.n_kv_heads * m.head_dim + swiglu)

    def backward_bytes_per_token(self) -> float:
        """A block's backward working set per token, above what it holds: the attention's fp32 dQ
        accumulator with dO and dQ in bf16 (16.4 KB for llama-1b-long, 16.5–16.6 measured; 32.8 for
        Llama-3.1-8B, 30.5 measured), and under SwiGLU tiles the gradients of the tiled region's
        input and output, about 12 bytes per model dimension (23 KB measured for llama-1b-long at
        128K and 256K tokens, 53 for Llama-3.1-8B at 64K). A recomputed block first brings back
        what it did not keep: its backward peaks at a whole block's activations plus this."""
        m = self.shape
        return (4 + 2 * BYTES) * m.n_heads * m.head_dim + (12 * m.dim if self.mlp_tile else 0)

    def logits_bytes(self, tokens: float) -> float:
        """The loss's working set: bf16 logits, their fp32 softmax and gradient, `loss_chunk` rows
        at a time (LOGIT_BYTES per logit, measured)."""
        rows = min(tokens, self.loss_chunk) if self.loss_chunk else tokens
        return rows * self.shape.vocab_size * LOGIT_BYTES

    def _phases(self, shard: int) -> list[tuple[float, float]]:
        """(bytes per token, fixed bytes) of activations and gradients at each moment a memory peak
        can occur, for tp = 1: the loss at the end of the forward, when every block holds its
        activations and the loss reads the final norm's output, and the backward of each block j
        (last first), when blocks 0..j−1 still hold theirs, block j has its whole activations and
        its backward working set, and the blocks after j have left their fp32 gradients (GRAD_BYTES
        per parameter, over the `shard` ranks that reduce them, and the newest block's whole
        reduction input once more); with offloaded inputs, from an offloaded block's backward to the
        backward of the offloaded block before it, that block's input is back on the GPU (the chain
        is counted over all layers: with pipeline stages, whose chains start anew, that is at most
        one input too many). Outside the blocks, in every phase: the residual stream's gradient
        (bf16) and the output layer's fp32 gradient, formed by the chunked loss in forward, with its
        bf16 copy (OUTPUT_BYTES per parameter). Which block is last matters, not whether it is
        recomputed: its backward runs first, with every other block's activations still held."""
        m = self.shape
        recomputed = recomputed_block_ids(round(self.recomputed * m.n_layers), m.n_layers)
        held = [self.block_bytes_per_token(j in recomputed) for j in range(m.n_layers)]
        base = m.dim * BYTES
        fixed = OUTPUT_BYTES * m.vocab_size * m.dim
        block_grads = GRAD_BYTES * m.matmul_params_per_layer()  # (whole, before its reduce-scatter)
        whole = self.block_bytes_per_token(False) + self.backward_bytes_per_token()
        # (an offloaded block's recompute starts the copy back of the offloaded block before it, which
        # stays on the GPU until that block's backward: from the second offloaded block down to the last)
        first, last = (min(recomputed), max(recomputed)) if self.offload_inputs and recomputed else (0, -1)
        phases = [(base + LOSS_INPUTS * m.dim * BYTES + sum(held), fixed)]
        before = 0.0
        for j in range(m.n_layers):
            after = m.n_layers - 1 - j
            phases.append((base + before + whole + (m.dim * BYTES if first < j <= last else 0.0),
                           fixed + block_grads * (after / shard + (1 if after else 0))))
            before += held[j]
        return phases

    def activation_bytes(self, tokens: float, tp: int = 1, shard: int = 1) -> float:
        """Peak bytes of activations, gradients and the loss's working set for `tokens` tokens on one
        GPU of a tp group (its heads and SwiGLU columns), gradients sharded over `shard` ranks: the
        highest of the phases."""
        loss = self.logits_bytes(tokens)
        peaks = [per_token * tokens + fixed + (loss if i == 0 else 0.0)
                 for i, (per_token, fixed) in enumerate(self._phases(shard))]
        return max(peaks) / tp

    def state_bytes(self, shard: int, unsharded_copy: bool = False, microbatches: int = 1) -> float:
        """Weights and AdamW states over `shard` ranks: fp32 master weights and two moments
        (12 B/param; 4 with the moments offloaded to the host) and the bf16 weights of the block that
        runs and of the next, gathered; `unsharded_copy` adds the bf16 weights and fp32 gradients
        held whole (adaptive mode). With several micro-batches a rank also holds, whole, the fp32
        gradients accumulated over those before (4 B/param; FSDP adds each block's bf16 gradients
        in as they come: 4.0 measured on an H200, llama-1b-long, 1 vs 2 and 4 micro-batches of the
        stdlib corpus), since gradients are reduced once per step."""
        p = self.shape.params()
        held = (4 if self.offload_optimizer else 12) * p / shard
        held += 6 * p if unsharded_copy else 2 * BYTES * self.shape.matmul_params_per_layer()
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

    def host_tokens(self, shard: int) -> float:
        """Most tokens per GPU whose offloaded inputs fit HOST_RESERVE of the host's share next to
        the offloaded moments (inf where nothing per token goes to the host)."""
        fixed = self.host_bytes(0, shard)
        per_token = self.host_bytes(1, shard) - fixed
        limit = self.hw.host_memory_gb * 2**30 * HOST_RESERVE
        return max(0, int((limit - fixed) / per_token)) if per_token else float("inf")

    def tokens_per_gpu(self, shard: int, unsharded_copy: bool = False) -> int:
        """Most tokens one GPU can hold activations for, with the rest of memory for states: the
        fewest any phase allows (at the loss, a micro-batch shorter than a chunk has fewer logits)."""
        free = self.free_bytes(shard, unsharded_copy)
        logit_row = self.shape.vocab_size * LOGIT_BYTES
        allowed = []
        for i, (per_token, fixed) in enumerate(self._phases(shard)):
            tokens = (free - fixed) / per_token
            if i == 0:
                tokens = (free - fixed) / (per_token + logit_row)  # every row's logits at once
                chunked = (free - fixed - self.loss_chunk * logit_row) / per_token
                if self.loss_chunk and chunked >= self.loss_chunk:
                    tokens = chunked
            allowed.append(tokens)
        return max(0, int(min(allowed)))
