"""The options of the parallel layer, each one `Literal` type: the config's keys are typed with
them, validation lists them, and the code that dispatches on them names nothing else. Torch-free."""

from __future__ import annotations

from typing import Literal, get_args

SPMethod = Literal["ring", "ring_bidir", "ulysses", "hybrid", "allgather"]  # softmax layers
LinearSPMethod = Literal["lasp2", "lasp1"]  # linear-attention layers
SPMode = Literal["static", "adaptive"]
Regroup = Literal["auto", "step", "rounds"]  # adaptive SP: one grouping per step, one per round, the faster
GroupSizes = Literal["powers_of_two", "any"]  # adaptive SP: any = every size up to a node, whole nodes beyond
PipelineSchedule = Literal["1f1b", "interleaved_1f1b"]
AttentionBackendName = Literal["math", "cpu_flash", "flash", "cudnn"]
FeatureMap = Literal["identity", "elu", "relu", "silu"]  # φ of linear attention (elu: elu + 1)
CUDA_BACKENDS: tuple[AttentionBackendName, ...] = ("flash", "cudnn")


def fastest_backend(device: str) -> AttentionBackendName:
    """What `attention_backend: auto` means on a device type ('cuda' or 'cpu')."""
    return "cudnn" if device == "cuda" else "cpu_flash"


def options(choice) -> tuple[str, ...]:
    """The values of a Literal type."""
    return get_args(choice)
