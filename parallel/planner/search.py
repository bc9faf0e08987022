"""`loom plan`'s search: layouts of a cluster, timed and sized with the shared cost model.

Candidates: dp × tp × pp × sp degrees (powers of two; tp inside a node), SP method (ring,
ring_bidir, ulysses), static or adaptive SP and the micro-batch token budget; each with the
trainer's memory saving (the fewest activation-checkpointed blocks that fit memory, with kept
attention outputs and SwiGLU tiles where they make it faster). A static layout runs m = global tokens / (dp × budget) micro-batches per data-
parallel replica; one takes the cost model's time for `budget` tokens of the corpus's length mix
(token-weighted moments of the histogram), split over tp × sp and over pp stages with 1F1B's
bubble of pp − 1 micro-batches. TP adds four activation all-reduces per layer (fwd + bwd), PP a
send per stage boundary, FSDP the part of its gathers and reduce-scatters that compute cannot
hide. Adaptive candidates are timed by planning sampled steps with the trainer's own planner, on
a slice of at most 64 ranks with proportionally fewer tokens.

Memory per GPU (at its peak, the start of backward): FSDP-sharded weights and AdamW states over
dp × sp (split by tp × pp), the gathered weights, and activations of the micro-batches in flight (pp of them on the first
1F1B stage), fewer with activation checkpointing, and a SwiGLU tile's working set. The memory
saving (with AdamW moments and checkpointed inputs in host memory where that fits or pays) is chosen within MEMORY_RESERVE of the GPU, as the trainer's `auto` chooses it; above the
GPU's memory a candidate is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from parallel.planner.adaptive import AdaptivePlanner, SequenceTooLong
from parallel.planner.cost_model import BYTES, HOST_RESERVE, MEMORY_RESERVE, CostModel
from parallel.planner.hardware import HardwareProfile
from parallel.planner.memory_saving import choose, options
from parallel.planner.shape import BACKWARD_KERNEL, BACKWARD_MODEL, ModelShape

METHODS = ("ring", "ring_bidir", "ulysses")


@dataclass(frozen=True)
class Histogram:
    """Document lengths as (length, count) pairs, documents longer than the context already split."""

    lengths: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_stats(cls, stats: dict, context: int) -> "Histogram":
        """Each bucket as its mean length; the longest document (`max`, when the stats hold it)
        kept apart, since what must fit is the longest sequence, not a bucket's mean."""
        rows = [[b["tokens"], b["documents"]] for b in stats["buckets"] if b["documents"]]
        longest = stats.get("max")
        if longest and rows[-1][1] > 1:
            rows[-1] = [rows[-1][0] - longest, rows[-1][1] - 1]
            rows.append([longest, 1])
        lengths, counts = zip(*((tokens / docs, docs) for tokens, docs in rows))
        return cls(np.asarray(lengths), np.asarray(counts, dtype=np.float64)).split(context)

    @classmethod
    def from_lengths(cls, lengths, context: int) -> "Histogram":
        values, counts = np.unique(np.asarray(lengths), return_counts=True)
        return cls(values.astype(np.float64), counts.astype(np.float64)).split(context)

    def split(self, context: int) -> "Histogram":
        full = np.floor(self.lengths / context)
        rest = self.lengths - full * context
        lengths = np.concatenate([np.full(int((full > 0).sum()), float(context)), rest[rest > 0]])
        counts = np.concatenate([(self.counts * full)[full > 0], self.counts[rest > 0]])
        return Histogram(lengths, counts)

    @property
    def tokens(self) -> float:
        return float((self.lengths * self.counts).sum())

    def per_token(self, values: np.ndarray) -> float:
        """Σ over documents of a quantity, per token of the corpus (e.g. attention FLOPs per token)."""
        return float((values * self.counts).sum() / self.tokens)

    def sample(self, tokens: float, rng: np.random.Generator) -> list[int]:
        """Documents drawn by count until they hold about `tokens` tokens."""
        p = self.counts / self.counts.sum()
        n = max(1, int(tokens / float((self.lengths * p).sum())))
        return np.maximum(1, np.round(rng.choice(self.lengths, n, p=p))).astype(int).tolist()


@dataclass(frozen=True)
class Cluster:
    nodes: int
    hw: HardwareProfile  # its gpus_per_node is the cluster's

    @property
    def gpus_per_node(self) -> int:
        return self.hw.gpus_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Candidate:
    dp: int
    tp: int
    pp: int
    sp: int
    sp_method: str
    mode: str  # static | adaptive
    budget: int  # static: tokens per micro-batch; adaptive: tokens per GPU
    recomputed: float = 0.0  # fraction of blocks recomputed in backward: the least that fits memory
    keep_attention: bool = False  # recomputed blocks keep their attention output
    mlp_tile: int = 0  # tokens per SwiGLU tile (0: untiled)
    offload_moments: bool = False  # AdamW moments in host memory
    offload_inputs: bool = False  # recomputed blocks' inputs in host memory
    step_s: float = math.inf
    memory_gb: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    bubble: float = 0.0
    comm_frac: float = 0.0
    feasible: bool = False  # fits memory and holds the longest sequence
    verdict: str = ""

    @property
    def tokens_per_gpu(self) -> float:
        """Tokens of a micro-batch each GPU of its SP group holds."""
        return self.budget if self.mode == "adaptive" else self.budget / self.sp

    @property
    def layout(self) -> str:
        sp = f" sp{self.sp} {self.sp_method}" + (" adaptive" if self.mode == "adaptive" else "") if self.sp > 1 else ""
        return f"dp{self.dp} tp{self.tp} pp{self.pp}{sp}"


LOSS_CHUNK = 8192  # rows of logits at a time in the loss of a layout without tp or pp


def loss_chunk(c: Candidate) -> int:
    """The trainer chunks the loss only where the whole vocabulary is on one rank of the last stage."""
    return LOSS_CHUNK if c.tp == 1 and c.pp == 1 else 0


def powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


class PlanSearch:
    def __init__(self, model: ModelShape, cluster: Cluster, hist: Histogram, global_tokens: int, seed: int = 0):
        self.model, self.cluster, self.hist, self.global_tokens = model, cluster, hist, global_tokens
        self.seed = seed
        self._samples: dict[tuple[int, int], list[int]] = {}
        self.params = model.params()
        self.attention_per_token = hist.per_token(model.attention_kernel_flops(hist.lengths))  # all layers
        self.model_flops_per_token = (model.linear_flops_per_token()  # MFU counts no recompute
                                      + self.attention_per_token * BACKWARD_MODEL / BACKWARD_KERNEL)
        self.longest = int(hist.lengths.max())
        self.peak = cluster.hw.peak_tflops or cluster.hw.matmul_tflops / 0.6  # (a preset without a peak: cpu)

    # ------------------------------------------------------------------ cost of one candidate

    def cost(self, c: Candidate) -> CostModel:
        """The cost model of one tp × pp shard of the model (its heads and layers)."""
        return CostModel(self.model.shard(c.tp, c.pp), self.cluster.hw,
                         method="ulysses" if c.sp_method == "ulysses" else "ring", recomputed=c.recomputed,
                         keep_attention=c.keep_attention, mlp_tile=c.mlp_tile, offload_optimizer=c.offload_moments,
                         offload_inputs=c.offload_inputs)

    def microbatches(self, c: Candidate) -> int:
        """Micro-batches per data-parallel replica in a step of a static layout."""
        return max(1, math.ceil(self.global_tokens / (c.dp * c.budget)))

    def whole_cost(self, c: Candidate) -> CostModel:
        """The cost model of the whole model with the candidate's memory saving (for its memory)."""
        return CostModel(self.model, self.cluster.hw, recomputed=c.recomputed, loss_chunk=loss_chunk(c),
                         keep_attention=c.keep_attention, mlp_tile=c.mlp_tile, offload_optimizer=c.offload_moments,
                         offload_inputs=c.offload_inputs)

    def host_gb(self, c: Candidate) -> float:
        """Host memory per GPU that the candidate's offloads fill (pp micro-batches of its stage's
        blocks in flight hold as many inputs as one micro-batch of all blocks)."""
        return self.whole_cost(c).host_bytes(c.tokens_per_gpu, c.dp * c.sp * c.tp * c.pp) / 2**30

    def memory_gb(self, c: Candidate) -> float:
        full = self.whole_cost(c)
        states = full.state_bytes(c.dp * c.sp, unsharded_copy=c.mode == "adaptive",
                                  microbatches=self.microbatches(c)) / (c.tp * c.pp)
        # (a stage holds 1/pp of the blocks for pp micro-batches in flight: the whole model's activations once)
        return (states + full.activation_bytes(c.tokens_per_gpu, c.tp, c.dp * c.sp)) / 2**30

    def fsdp_time(self, c: Candidate, compute: float) -> float:
        """The exposed part of one step's weight gathers (fwd, bwd) and gradient reduce-scatter."""
        shard = c.dp * c.sp
        if shard == 1:
            return 0.0
        params = self.params / (c.tp * c.pp)
        link = self.cluster.hw.link_bytes_per_s(shard * c.tp)
        total = (2 * params * BYTES + params * 4) * (shard - 1) / shard / link
        return max(0.0, total - compute) + total / max(1, self.model.n_layers // c.pp)

    def static_time(self, c: Candidate) -> tuple[float, float, float]:
        """(step seconds, pipeline bubble fraction, communication fraction) of a static layout."""
        cost, hw, m = self.cost(c), self.cluster.hw, self.model
        microbatches = self.microbatches(c)
        attention_s = self.hist.per_token(cost.attention_time(self.hist.lengths, c.sp)) * c.budget
        compute = float(cost.compute_time(float(c.budget), attention_s, c.sp))
        sp_comm = float(cost.comm_time(float(c.budget), attention_s, c.sp))
        if c.sp_method == "ring_bidir" and c.sp > 2:
            sp_comm *= -(-(c.sp - 1) // 2) / (c.sp - 1)  # hops of the longer direction
        tp_comm = pp_comm = 0.0
        if c.tp > 1:
            activations = c.budget / c.sp * m.dim * BYTES
            tp_comm = (m.n_layers / c.pp) * 4 * activations * (c.tp - 1) / c.tp / hw.link_bytes_per_s(c.tp)
        if c.pp > 1:
            pp_comm = 2 * c.budget / (c.tp * c.sp) * m.dim * BYTES / hw.link_bytes_per_s(self.cluster.gpus)
        stage = hw.microbatch_overhead_s + compute + sp_comm + tp_comm + pp_comm
        fsdp = self.fsdp_time(c, microbatches * compute)
        step = (microbatches + c.pp - 1) * stage + fsdp + cost.step_fixed_time(c.dp * c.sp)
        comm = microbatches * (sp_comm + tp_comm + pp_comm) + fsdp
        return step, (c.pp - 1) / (microbatches + c.pp - 1), comm / step

    def adaptive_instance(self, c: Candidate) -> tuple[AdaptivePlanner, list[int], float]:
        """A planner on a slice of the pool and its share of a step's sequences (the same sample for
        every candidate of that slice), and the factor from the slice's time to the step's."""
        pool = c.dp * c.sp
        ranks = min(pool, max(c.sp, 64))
        tokens = self.global_tokens * ranks / pool
        scale = 1.0
        mean = float((self.hist.lengths * self.hist.counts).sum() / self.hist.counts.sum())
        if tokens / mean > 4096:  # plan at most ~4,096 sequences and scale the time
            scale = tokens / mean / 4096
            tokens /= scale
        key = (ranks, int(tokens))
        if key not in self._samples:
            self._samples[key] = self.hist.sample(tokens, np.random.default_rng([self.seed, *key]))
        planner = AdaptivePlanner(self.cost(c), ranks, min(c.sp, ranks), c.budget, use_milp=False)
        return planner, self._samples[key], scale

    def adaptive_bound(self, c: Candidate) -> float:
        planner, lengths, scale = self.adaptive_instance(c)
        return planner.lower_bound(lengths) * scale

    def adaptive_time(self, c: Candidate) -> tuple[float, float, float]:
        planner, lengths, scale = self.adaptive_instance(c)
        plan = planner.solve(lengths)
        return (plan.predicted_s * scale + self.fsdp_time(c, plan.lower_bound_s * scale)
                + planner.cost.step_fixed_time(c.dp * c.sp), 0.0, 0.0)

    def evaluate(self, c: Candidate) -> Candidate:
        c.memory_gb = self.memory_gb(c)
        holds = c.budget * (c.sp if c.mode == "adaptive" else 1)
        if self.longest > holds:
            c.verdict = f"a {self.longest:,}-token sequence does not fit {holds:,} tokens"
            return c
        if c.memory_gb > self.cluster.hw.gpu_memory_gb:
            c.verdict = f"out of memory ({c.memory_gb:.0f} GB > {self.cluster.hw.gpu_memory_gb:.0f} GB)"
            return c
        host, host_limit = self.host_gb(c), self.cluster.hw.host_memory_gb * HOST_RESERVE
        if host > host_limit:
            c.verdict = f"out of host memory ({host:.0f} GB per GPU > {host_limit:.0f} GB)"
            return c
        try:
            c.step_s, c.bubble, c.comm_frac = (self.adaptive_time if c.mode == "adaptive" else self.static_time)(c)
        except SequenceTooLong as err:
            c.verdict = str(err)
            return c
        c.feasible = True
        c.tokens_per_s = self.global_tokens / c.step_s
        c.mfu = self.model_flops_per_token * self.global_tokens / (c.step_s * self.cluster.gpus * self.peak * 1e12)
        return c

    # ------------------------------------------------------------------ the space

    def static_candidates(self, budgets: list[int]) -> list[Candidate]:
        gpus, m = self.cluster.gpus, self.model
        out = []
        for tp in powers_of_two(min(self.cluster.gpus_per_node, m.n_heads)):
            if m.n_heads % tp or m.n_kv_heads % tp:
                continue
            for pp in powers_of_two(m.n_layers):
                if m.n_layers % pp or gpus % (tp * pp):
                    continue
                for sp in powers_of_two(gpus // (tp * pp)):
                    dp = gpus // (tp * pp * sp)
                    for method in (METHODS if sp > 1 else ("ring",)):
                        if method == "ulysses" and (m.n_heads // tp) % sp:
                            continue
                        for budget in budgets:
                            out.append(self.fitted(Candidate(dp, tp, pp, sp, method, "static", budget)))
        return out

    def adaptive_candidates(self) -> list[Candidate]:
        """Adaptive SP over every pool (ranks not used by tp), largest group size, method and budget."""
        gpus, m = self.cluster.gpus, self.model
        out = []
        for tp in powers_of_two(min(self.cluster.gpus_per_node, m.n_heads)):
            if m.n_heads % tp or m.n_kv_heads % tp or gpus % tp:
                continue
            pool = gpus // tp
            for sp in powers_of_two(pool)[1:]:
                least = -(-self.longest // sp)  # per-GPU tokens that let the largest group hold it
                for method in ("ring", "ulysses"):
                    if method == "ulysses" and (m.n_heads // tp) % sp:
                        continue
                    for budget in (least, 2 * least, 4 * least):
                        out.append(self.fitted(Candidate(pool // sp, tp, 1, sp, method, "adaptive", budget)))
        return out

    def fitted(self, c: Candidate) -> Candidate:
        """The candidate with its memory saving as the trainer's `auto` chooses it
        (`parallel.planner.memory_saving`): the fewest recomputed blocks that fit memory, with or
        without kept attention outputs (not with a ring), SwiGLU tiles, AdamW moments and the
        recomputed blocks' inputs in host memory, the fastest of those."""
        n = self.model.n_layers
        combos = options(None, None, c.sp == 1 or c.sp_method == "ulysses", c.tokens_per_gpu, None, None)
        with_saving = lambda s: replace(c, recomputed=s.recomputed / n, keep_attention=s.keep_attention,  # noqa: E731
                                        mlp_tile=s.mlp_tile, offload_moments=s.offload_moments,
                                        offload_inputs=s.offload_inputs)
        hw = self.cluster.hw
        best = choose(n, combos, None, lambda s: self.memory_gb(with_saving(s)), hw.gpu_memory_gb * MEMORY_RESERVE,
                      lambda s: self.host_gb(with_saving(s)), hw.host_memory_gb * HOST_RESERVE,
                      lambda s: self.static_time(with_saving(s))[0])
        c.recomputed, c.keep_attention, c.mlp_tile = best.recomputed / n, best.keep_attention, best.mlp_tile
        c.offload_moments, c.offload_inputs = best.offload_moments, best.offload_inputs and best.recomputed > 0
        return c

    def run(self, budgets: list[int], adaptive: bool = True) -> list[Candidate]:
        """Every candidate, feasible ones first by step time; the first is the plan.
        Adaptive candidates are planned in order of their lower bound, and not at all once that
        bound reaches the best time found (they could not win)."""
        found = [self.evaluate(c) for c in self.static_candidates(budgets)]
        if adaptive:
            best = min((c.step_s for c in found if c.feasible), default=math.inf)
            pending = []
            for c in self.adaptive_candidates():
                c.memory_gb = self.memory_gb(c)
                if c.budget * c.sp >= self.longest and c.memory_gb <= self.cluster.hw.gpu_memory_gb:
                    pending.append((self.adaptive_bound(c), c))
                else:
                    found.append(self.evaluate(c))  # rejected, with its reason
            for bound, c in sorted(pending, key=lambda p: p[0]):
                if bound >= best:  # step_s, tokens/s and MFU are bounds here
                    c.step_s, c.feasible = bound, True
                    c.tokens_per_s = self.global_tokens / bound
                    c.mfu = self.model_flops_per_token * self.global_tokens / (bound * self.cluster.gpus * self.peak * 1e12)
                    c.verdict = "slower: its lower bound is above the best"
                else:
                    self.evaluate(c)
                    if c.feasible:
                        best = min(best, c.step_s)
                found.append(c)
        found.sort(key=lambda c: (not c.feasible, c.step_s if c.feasible else c.memory_gb))
        winner = next((c for c in found if c.feasible and not c.verdict), None)
        for c in found:
            if c.feasible and c is not winner and not c.verdict:
                c.verdict = self.why_slower(c, winner.step_s)
        return found

    @staticmethod
    def why_slower(c: Candidate, best: float) -> str:
        ratio = c.step_s / best
        if c.bubble > 0.2:
            return f"pipeline bubble {100 * c.bubble:.0f}% ({ratio:.2f}× the best)"
        if c.comm_frac > 0.3:
            return f"communication bound: {100 * c.comm_frac:.0f}% of the step ({ratio:.2f}× the best)"
        return f"slower ({ratio:.2f}× the best)"
