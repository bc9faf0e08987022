"""Importing a Hugging Face checkpoint into a one-GPU layout: seconds and peak host memory.

Writes a random model of a Loom model config's shape (default `llama-8b`, Llama-3.1-8B's) as a
Hugging Face folder — bf16 safetensors in shards of `--shard-gb` with their index, and
`config.json` — unless `--folder` already holds one. Then, in a fresh process, it builds the
model as the trainer does on one GPU (fp32 weights on the device), loads the folder with
`trainer.hf.load_pretrained` (DCP's Hugging Face reader, memory-mapped), and prints one JSON line:
the load's seconds, the process's peak resident host memory against the folder's size (and what
the loading added to what the process held before), and a check that the weights equal the files.
`benchmarks/train_step.py --model llama-8b --set model.init_from=FOLDER` then trains from it.

    python benchmarks/load_pretrained.py --folder /tmp/llama-8b --out results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.hf import hf_name  # noqa: E402
from trainer.hf_config import config_json  # noqa: E402
from trainer.model import Transformer  # noqa: E402


def model_config(name: str):
    return load_config(ROOT / "configs" / "train" / "demo.yaml", [f"model={name}"]).model


def write_random(folder: Path, name: str, shard_gb: float) -> None:
    """A Hugging Face folder of random bf16 weights of the config's shape."""
    from safetensors.torch import save_file

    cfg = model_config(name)
    with torch.device("meta"):
        shapes = {hf_name(n): p.shape for n, p in Transformer(cfg).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size and size + t.nbytes > shard_gb * 2**30:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.nbytes for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config_json(cfg, 131072, "bfloat16"), indent=2))


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, not inherited from
    the parent that spawned it)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20


def load(folder: Path, name: str) -> dict:
    """In this (fresh) process: the model on the GPU, then the folder loaded into it."""
    from trainer.hf import load_pretrained
    from safetensors import safe_open

    cfg = model_config(name)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = Transformer(cfg)
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    before_gb = peak_rss_gb()  # the interpreter, torch, CUDA and the model on the GPU
    t0 = time.perf_counter()
    load_pretrained([model], folder, cfg.tie_embeddings)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.31.mlp.down_proj.weight" if cfg.n_layers == 32 else next(iter(index["weight_map"]))
    with safe_open(str(folder / index["weight_map"][key]), "pt") as f:
        want = f.get_tensor(key).float()
    got = dict((hf_name(n), p) for n, p in model.named_parameters())[key].detach().cpu()
    folder_gb = index["metadata"]["total_size"] / 2**30
    peak_host_gb = peak_rss_gb()
    return {"bench": "load_pretrained", "model": name, "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "folder_gb": round(folder_gb, 2), "shards": len(set(index["weight_map"].values())),
            "build_s": round(built, 2), "load_s": round(seconds, 2), "peak_host_gb": round(peak_host_gb, 2),
            "peak_host_vs_folder": round(peak_host_gb / folder_gb, 3),
            "host_gb_before_load": round(before_gb, 2), "load_host_vs_folder": round((peak_host_gb - before_gb) / folder_gb, 3), "weights_equal_files": bool(torch.equal(got, want)),
            "gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-8b", help="a config under configs/model/")
    p.add_argument("--folder", default="/tmp/hf-llama-8b")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--out", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.folder)
    if args.child:
        print(json.dumps(load(folder, args.model)), flush=True)
        return
    if not (folder / "config.json").exists():
        t0 = time.perf_counter()
        write_random(folder, args.model, args.shard_gb)
        print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    line = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--folder", str(folder)], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
