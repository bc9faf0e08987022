"""`loom export RUN_DIR OUT`: the newest checkpoint of a run as a Hugging Face Llama checkpoint.

Works from any layout (DCP reassembles the shards); writes `model.safetensors` and `config.json`
that `transformers.LlamaForCausalLM.from_pretrained(OUT)` loads. Loom's RoPE rotates adjacent
pairs (x₂ᵢ, x₂ᵢ₊₁) and Hugging Face's rotates halves (xᵢ, xᵢ₊d/2), so the rows of the query and key
projections are permuted per head (as in Meta's conversion), which makes the logits identical.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.checkpoint import complete_checkpoints, damage, is_url, storage
from trainer.config import ConfigError, ModelConfig, load_config

NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def halves_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorders each head's output rows from interleaved pairs to halves."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(model: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.items():
        name = name.replace("_checkpoint_wrapped_module.", "")
        if name == "tok_embeddings.weight":
            key = "model.embed_tokens.weight"
        elif name == "norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        else:
            _, index, module, *rest = name.split(".")
            sub = ".".join([module, *rest[:-1]]) if rest[:-1] else module
            key = f"model.layers.{index}.{NAMES[sub]}.{rest[-1]}"
            if sub == "attention.wq":
                tensor = halves_rope(tensor, cfg.n_heads)
            elif sub == "attention.wk":
                tensor = halves_rope(tensor, cfg.n_kv_heads)
        out[key] = tensor.detach().to(torch.float32).contiguous()
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(cfg: ModelConfig, context: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": context,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
    }


def load_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint (a URL's files are copied here first)."""
    with tempfile.TemporaryDirectory() as tmp:
        if is_url(checkpoint):
            fs, path = storage(checkpoint)
            fs.get(path.rstrip("/") + "/", str(Path(tmp) / "ckpt"), recursive=True)
            checkpoint = Path(tmp) / "ckpt"
        dcp_to_torch_save(checkpoint, Path(tmp) / "full.pt")
        return torch.load(Path(tmp) / "full.pt", weights_only=False)["train"]["model"]


def export(run_dir: str | Path, out: str | Path) -> Path:
    run = Path(run_dir)
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if cfg is None:
        raise ConfigError(f"{run} is not a Loom run folder (no config.yaml)")
    if cfg.model.has_linear or cfg.model.window:
        raise ConfigError("only softmax models without a sliding window have a Hugging Face Llama equivalent")
    store = cfg.checkpoint.folder or run / "checkpoints"
    good = [(step, path) for step, path in complete_checkpoints(store) if not damage(path)]
    if not good:
        raise ConfigError(f"{run} has no complete checkpoint")
    step, checkpoint = good[-1]
    state = hf_state_dict(load_model_state(checkpoint), cfg.model)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(cfg.model, cfg.data.context_len), indent=2))
    print(f"exported {checkpoint} (step {step}) → {folder} ({sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return folder
