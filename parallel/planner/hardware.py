"""Hardware profiles: what a device and its links achieve, as the cost model's coefficients.

A profile is a preset from the figures measured on those devices, a file written by `loom
profile`, or — for `auto` — the preset of the device the workers run on. Which one a job uses is
decided once, when the job is resolved (`trainer.job`); everything here is plain data. The dense
bf16 peak (for MFU) and the link a group of ranks communicates over live here too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Dense bf16 peak per device (TFLOP/s) for MFU, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass(frozen=True)
class HardwareProfile:
    name: str = "H200"
    gpu_memory_gb: float = 139.0  # usable
    peak_tflops: float = 989.0  # dense bf16 peak (MFU's denominator); 0 = unknown
    matmul_tflops: float = 600.0  # achieved bf16 dense in a model step (the ceiling measured is ≈ 790)
    # attention fwd+bwd (flash-attention FLOP convention) = FLOPs at a rate + a cost per token (per layer and
    # per head × head_dim): cuDNN on documents of dense_min_tokens or more, the varlen kernel below; fitted
    # on 64K-token packings of one to 256 equal documents (benchmarks/packed_attention.py)
    attention_tflops: float = 566.0
    attention_token_s: float = 3.2e-11
    short_attention_tflops: float = 359.0
    short_attention_token_s: float = 1.65e-11
    # from this length on, a document's attention runs through a cuDNN call of its own: where that call overtakes
    # its share of one varlen call (an H200: 0.57x at 3,000 tokens, 1.02x at 4,096, 1.25x at 6,000)
    dense_min_tokens: int = 4096
    intra_node_gbps: float = 290.0  # per direction, NVLink
    inter_node_gbps: float = 25.0  # per GPU, e.g. 200 Gb/s InfiniBand
    gpus_per_node: int = 8
    microbatch_overhead_s: float = 0.015  # fixed time of one forward + backward of a micro-batch
    # fixed time of an optimizer step: its host work and the GPU waits (fitted on H200 steps of 64K packed
    # micro-batches of the stdlib corpus and the Wikipedia lengths, 1–4 per step, 2026-12-02)
    step_overhead_s: float = 0.025
    optimizer_s_per_param: float = 1.0e-11  # fused AdamW on a rank's shard of fp32 weights and moments
    host_gbps: float = 54.8  # per direction, pinned host memory ↔ GPU (PCIe 5 on an H200 host, measured)
    host_memory_gb: float = 125.0  # a host's memory per GPU (the lent one-H200 host; the workers' own where known)
    hop_latency_s: float = 2e-5

    def link_bytes_per_s(self, group: int) -> float:
        """Bandwidth per direction of a group of `group` ranks: NVLink inside a node, the network beyond."""
        gbps = self.intra_node_gbps if group <= self.gpus_per_node else self.inter_node_gbps
        return gbps * 1e9

    def save(self, path: str | Path, **extra) -> None:
        Path(path).write_text(json.dumps({**asdict(self), **extra}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS = {
    "H200": HardwareProfile(),
    "H100": HardwareProfile(name="H100", gpu_memory_gb=78.0, matmul_tflops=560.0, attention_tflops=524.0,
                            attention_token_s=3.46e-11, short_attention_tflops=332.0, short_attention_token_s=1.78e-11,
                            intra_node_gbps=200.0),
    # For CPU tests and the local demo: numbers of the right shape, not a measurement.
    "cpu": HardwareProfile(name="cpu", gpu_memory_gb=4.0, peak_tflops=0.0, matmul_tflops=0.05,
                           attention_tflops=0.02, attention_token_s=0.0, short_attention_tflops=0.02,
                           short_attention_token_s=0.0, step_overhead_s=0.0, optimizer_s_per_param=0.0,
                           intra_node_gbps=2.0, inter_node_gbps=1.0, gpus_per_node=64, host_memory_gb=16.0,
                           microbatch_overhead_s=0.02, hop_latency_s=1e-4,
                           dense_min_tokens=64),  # CPU flash per document ≈ 2× its masked packed call
}


class UnknownProfile(ValueError):
    """A profile name that is neither a preset nor a file."""


def named_profile(spec: str, device_name: str) -> HardwareProfile:
    """`spec` is a preset name, the path of a `loom profile` file, or `auto`: the preset whose name
    the device's name contains. A GPU without a preset gets the H100 preset's rates under its own
    name and peak (run `loom profile` for its real ones); a CPU gets the cpu preset."""
    if spec == "auto":
        match = next((p for name, p in PRESETS.items() if name != "cpu" and name in device_name), None)
        if match is not None:
            return match
        if device_name == "cpu":
            return PRESETS["cpu"]
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), 0.0)
        return replace(PRESETS["H100"], name=device_name, peak_tflops=peak)
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).is_file():
        return HardwareProfile.load(spec)
    raise UnknownProfile(f"unknown hardware profile '{spec}' (a preset: {', '.join(PRESETS)}; or a JSON file)")
