"""A Hugging Face model's `config.json` as Loom's `model` section, and back.

Supported: Llama 2 / 3 / 3.1 / 3.2 (tied embeddings too), Mistral (sliding window), Qwen2 / Qwen2.5
(q/k/v bias) and Qwen3 (q/k RMSNorm, a head size of its own) — decoder stacks of RMSNorm, RoPE
attention with GQA and a SwiGLU MLP, which Loom's model is. RoPE settings are read in both the
`rope_theta` + `rope_scaling` form and transformers 5's `rope_parameters`. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = {  # Loom's name → (architecture class, model_type)
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
ROPE_SCALING_KEYS = {  # the scaling types Loom computes (`trainer.rope`) and the keys each needs
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps",
              "window", "tie_embeddings", "attention_bias", "qk_norm", "family")


class UnsupportedModel(ValueError):
    """A model folder Loom cannot take; its message is one line."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"model.init_from: {folder} has no config.json (a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UnsupportedModel(f"model.init_from: {path} is not valid JSON ({err})") from None


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, {}
    if kind not in ROPE_SCALING_KEYS:
        raise UnsupportedModel(f"model.init_from: RoPE scaling '{kind}' is not supported "
                               f"({', '.join(ROPE_SCALING_KEYS)})")
    if kind in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    params.pop("type", None)
    return theta, {"rope_type": kind, **params}


def model_section(hf: dict[str, Any]) -> dict[str, Any]:
    """Loom `model` keys from a Hugging Face config.json (shape, norms, RoPE, family)."""
    architecture = (hf.get("architectures") or ["?"])[0]
    family = next((f for f, (cls, _) in FAMILIES.items() if cls == architecture), None)
    if family is None:
        supported = ", ".join(cls for cls, _ in FAMILIES.values())
        raise UnsupportedModel(f"model.init_from: {architecture} is not supported (supported: {supported})")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise UnsupportedModel(f"model.init_from: {architecture} with hidden_act={hf.get('hidden_act')} / "
                               f"mlp_bias={hf.get('mlp_bias')} is not supported (silu, no MLP bias)")
    if hf.get("attention_bias") and family != "qwen2":
        raise UnsupportedModel(f"model.init_from: {architecture} with attention_bias=true (biases on q/k/v and the "
                               f"output projection) is not supported; q/k/v biases are, as Qwen2 has them")
    theta, scaling = _rope(hf)
    heads = int(hf["num_attention_heads"])
    window = int(hf.get("sliding_window") or 0)
    if family == "qwen2" and not hf.get("use_sliding_window"):
        window = 0
    return {
        "family": family, "vocab_size": int(hf["vocab_size"]), "dim": int(hf["hidden_size"]),
        "n_layers": int(hf["num_hidden_layers"]), "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        "ffn_dim": int(hf["intermediate_size"]), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "window": window, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": family == "qwen2",
        "qk_norm": family == "qwen3", "rope_theta": theta, "rope_scaling": scaling,
    }


def config_json(model: Any, context: int, dtype: str) -> dict[str, Any]:
    """The config.json of Loom's model (a ModelConfig) in its family's Hugging Face form; a model
    its family cannot express is an UnsupportedModel."""
    f = model.family
    if model.attention_bias != (f == "qwen2"):
        raise UnsupportedModel(f"model.attention_bias={model.attention_bias} has no {f} equivalent"
                               + ("" if model.attention_bias is False else ": q/k/v biases are qwen2's (model.family)"))
    if model.qk_norm != (f == "qwen3"):
        raise UnsupportedModel(f"model.qk_norm={model.qk_norm} has no {f} equivalent"
                               + ("" if model.qk_norm is False else ": q/k norms are qwen3's (model.family)"))
    if model.window and f not in ("mistral", "qwen2"):
        raise UnsupportedModel(f"a sliding window has no {f} equivalent: set model.family to mistral or qwen2")
    architecture, model_type = FAMILIES[model.family]
    out = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": model.vocab_size,
        "hidden_size": model.dim, "intermediate_size": model.hidden_dim, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_kv_heads, "head_dim": model.head_dim,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta, "max_position_embeddings": context,
        "tie_word_embeddings": model.tie_embeddings, "hidden_act": "silu", "torch_dtype": dtype,
    }
    if model.rope_scaling:
        out["rope_scaling"] = dict(model.rope_scaling)
    if model.family in ("llama", "qwen3"):
        out.update(attention_bias=False, mlp_bias=False)
    if model.family == "mistral":
        out["sliding_window"] = model.window or None
    if model.family == "qwen2":
        out.update(use_sliding_window=bool(model.window), sliding_window=model.window or None)
    return out


def weights_dtype(folder: str | Path) -> str:
    """The dtype a model folder's config names for its weights (float32 when it names none)."""
    hf = read_config(folder)
    return str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
