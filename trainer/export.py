"""`loom export RUN_DIR OUT`: the newest checkpoint of a run as a Hugging Face model folder.

Works from any layout (DCP reassembles the shards); writes `model.safetensors` and `config.json`
in the family the model came from (Llama, Mistral, Qwen2, Qwen3; `model.family`), which
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads with the same logits. Weights are
written in `--dtype` — by default the dtype of the folder the model was imported from
(`model.init_from`), else fp32 — so a model imported and exported unchanged comes back bit for bit;
the imported folder's tokenizer files come along. OUT is written complete into a temporary folder
and renamed; an OUT that exists and is not empty is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.checkpoint import complete_checkpoints, damage, is_url, storage
from trainer.config import ConfigError, load_config
from trainer.hf import hf_state_dict
from trainer.hf_config import UnsupportedModel, config_json, weights_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def load_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint (a URL's files are copied here first)."""
    with tempfile.TemporaryDirectory() as tmp:
        if is_url(checkpoint):
            fs, path = storage(checkpoint)
            fs.get(path.rstrip("/") + "/", str(Path(tmp) / "ckpt"), recursive=True)
            checkpoint = Path(tmp) / "ckpt"
        dcp_to_torch_save(checkpoint, Path(tmp) / "full.pt")
        return torch.load(Path(tmp) / "full.pt", weights_only=False)["train"]["model"]


def export(run_dir: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a Loom run folder (no config.yaml)")
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ConfigError(f"{out} exists and is not empty; export into a new folder")
    cfg = load_config(run / "config.yaml")
    if cfg.model.has_linear:
        raise ConfigError("models with linear-attention layers have no Hugging Face equivalent to export to")
    if dtype == "auto":
        dtype = weights_dtype(cfg.model.init_from) if cfg.model.init_from else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose from auto, {', '.join(DTYPES)}")
    try:
        config = config_json(cfg.model, cfg.data.context_len, dtype)
    except UnsupportedModel as err:
        raise ConfigError(str(err)) from None
    store = cfg.checkpoint.folder or run / "checkpoints"
    good = []
    for step, path in complete_checkpoints(store):
        problem = damage(path)
        if problem:
            print(f"warning: checkpoint step {step} is damaged ({problem}); not exported")
        else:
            good.append((step, path))
    if not good:
        raise ConfigError(f"{run} has no complete checkpoint")
    step, checkpoint = good[-1]
    state = hf_state_dict(load_model_state(checkpoint), cfg.model.tie_embeddings, DTYPES[dtype])
    folder = Path(out)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        (tmp / "model.safetensors").chmod(0o666 & ~umask)  # as any other file written here
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES if cfg.model.init_from else ():
            if (Path(cfg.model.init_from) / name).is_file():
                shutil.copy2(Path(cfg.model.init_from) / name, tmp / name)
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {checkpoint} (step {step}) → {folder} ({cfg.model.family}, {dtype}, "
          f"{sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters)")
    return folder
