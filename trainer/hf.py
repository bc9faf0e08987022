"""Hugging Face weights in and out: parameter names, loading a model folder into any layout, export.

Loom's parameters and Hugging Face's differ only in their names (the RoPE convention and every
shape are the same, `trainer.rope`), so a model folder loads with DCP's safetensors reader
straight into the model as parallelised — FSDP shards, tensor-parallel DTensors, pipeline stages
— each rank reading, memory-mapped, only the slices it holds. Export writes the same names back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")
FLOAT_DTYPES = ("F32", "BF16", "F16")


class WeightsError(ValueError):
    """A model folder whose weights cannot be loaded into the model; its message is one line."""


def hf_name(name: str) -> str:
    """The Hugging Face name of a Loom parameter (wrappers' prefixes dropped)."""
    name = WRAPPERS.sub("", name)
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, module, *rest = name.split(".")
    sub = ".".join([module, *rest[:-1]])
    return f"model.layers.{index}.{LAYER_NAMES[sub]}.{rest[-1]}"


def hf_state_dict(model: dict[str, torch.Tensor], tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A full Loom state dict under Hugging Face names, in `dtype` (a tied output layer left out)."""
    out = {hf_name(name): tensor.detach().to(dtype).contiguous() for name, tensor in model.items()}
    if tied:
        out.pop("lm_head.weight", None)
    return out


def load_pretrained(parts: list[nn.Module], folder: str | Path, tied: bool) -> None:
    """Loads a model folder's safetensors into the parameters of these model parts, in place."""
    wanted: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, param in part.named_parameters():
            key = hf_name(name)
            if not (tied and key == "lm_head.weight"):
                wanted[key] = param.data
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(str(folder)),
             no_dist=not torch.distributed.is_initialized())


def check_weights(folder: str | Path, model: nn.Module, tied: bool) -> None:
    """Every tensor `model` (e.g. on the meta device) needs is in the folder's safetensors — shards
    present and whole, shapes as the config gives, a float dtype — read from the headers alone."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise WeightsError(f"{index} is damaged ({err})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsError(f"{folder} lacks {missing[0]}" + (f" and {len(missing) - 1} more shards" if len(missing) > 1
                                                                 else "") + f", which {index.name} lists")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors weights")
    found: dict[str, tuple[str, list[int], str]] = {}
    for file in files:
        for name, (dtype, shape) in _header(file).items():
            found[name] = (dtype, shape, file.name)
    for name, param in model.named_parameters():
        key = hf_name(name)
        if tied and key == "lm_head.weight":
            continue
        if key not in found:
            raise WeightsError(f"{folder} has no tensor {key}")
        dtype, shape, file = found[key]
        if tuple(shape) != tuple(param.shape):
            raise WeightsError(f"{key} in {file} has shape {tuple(shape)}, the model's config.json gives {tuple(param.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{key} in {file} is {dtype}; Loom loads {', '.join(FLOAT_DTYPES)}")


def _header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of a safetensors file, after checking that its data is all there."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError("no header")
            header = json.loads(fh.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{file} is not a readable safetensors file ({err})") from None
    if 8 + length + end > size:
        raise WeightsError(f"{file} is truncated: {size:,} bytes, its header describes {8 + length + end:,}")
    return {k: (v["dtype"], v["shape"]) for k, v in tensors.items()}
