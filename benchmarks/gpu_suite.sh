#!/usr/bin/env bash
# The GPU measurements of the open issues, in as few device calls as possible (writes into $OUT).
# Usage on the GPU host:  bash benchmarks/gpu_suite.sh one|corpus|long|memory|8b|two [extra train_step args...]
#   one:    CUDA tests, the single-GPU training step at 32K / 64K / 128K (H100 or H200)
#   corpus: packed attention (flash varlen vs Loom's cudnn) and training steps on real corpora at 64K:
#           the stdlib corpus with 1, 2 and 4 micro-batches, the FlexSP Wikipedia lengths
#   long:   one 256K and one 512K document per step (memory saving auto), one 1M document over 4 of 16 layers
#   memory: where activation memory goes, block by block, for the layouts the memory model was fitted on
#           (llama-1b-long at 128K–1M and Llama-3.1-8B at 64K, 2 or 4 layers; benchmarks/activation_memory.py)
#   8b:     a random Llama-3.1-8B-shaped Hugging Face folder: import time and host memory, then a 32K step from it;
#           then a 128K step and a 240K one (the longest `auto` allows with a 125 GB host) of random weights
#   two:    (2+ GPUs) ring / ring_bidir / ulysses vs one GPU and torch context_parallel, LASP-2 vs LASP-1,
#           the sp=2 training step at 128K with and without overlap, adaptive vs static SP on the stdlib corpus
# WIKIPEDIA names the FlexSP lengths file (default: .gpu_data/, a carried copy of ../shared/data/).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
WIKIPEDIA=${WIKIPEDIA:-.gpu_data/flexsp_wikipedia_lengths.txt.gz}
part=${1:-one}
shift || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'cudnn', torch.backends.cudnn.version())"
step="python3 benchmarks/train_step.py --model llama-1b-long --warmup 2 --steps 3 --out $OUT/train_step.jsonl"
stdlib() {
  python3 -m launch.cli prepare "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
    /tmp/stdlib --include '*.py' --exclude 'site-packages/*' --quiet > /dev/null
}
case "$part" in
one)
  python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
  for seq in 32768 65536 131072; do $step --seq "$seq" --variants loom "$@" 2>&1 | grep '^{'; done ;;
corpus)
  python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
  stdlib
  python3 benchmarks/packed_attention.py --stdlib /tmp/stdlib --wikipedia "$WIKIPEDIA" \
    --out "$OUT/packed_attention.jsonl" 2>&1 | grep '^{'
  for mb in 1 2 4; do $step --seq 65536 --data /tmp/stdlib --microbatches "$mb" --variants loom "$@" 2>&1 | grep '^{'; done
  $step --seq 65536 --lengths "$WIKIPEDIA" --variants loom "$@" 2>&1 | grep '^{' ;;
long)
  for seq in 262144 524288; do
    python3 benchmarks/train_step.py --model llama-1b-long --warmup 1 --steps 1 --seq "$seq" --variants loom \
      --out "$OUT/train_step.jsonl" "$@" 2>&1 | grep '^{'
  done
  # 1M tokens: all 16 layers take ≈ 635 s, over a device call; 4 of them, one step (compilation included),
  # with the per-block setting `auto` chooses for 16 (recomputed, SwiGLU tiles, inputs on the host; the last
  # block kept)
  python3 benchmarks/train_step.py --model llama-1b-long --warmup 0 --steps 1 --seq 1048576 --variants loom \
    --set model.n_layers=4 train.activation_checkpointing=3 train.keep_attention=false train.mlp_tile_tokens=16384 \
    train.offload_activations=true optim.offload=false --out "$OUT/train_step.jsonl" "$@" 2>&1 | grep '^{' ;;
memory)
  probe="python3 benchmarks/activation_memory.py --out $OUT/activation_memory.jsonl"
  $probe --seq 131072 --layers 4 --layouts 0 2:keep 4 4:keep 4:keep:offload 3:keep:offload 4:tile 4:keep:tile \
    0:tile 2:keep:tile 2>&1 | grep '^{'
  $probe --seq 262144 --layers 2 --layouts 0:tile 2:tile 0 2>&1 | grep '^{'
  $probe --seq 524288 --layers 2 --layouts 2:keep 1:keep:offload 2>&1 | grep '^{'
  $probe --seq 1048576 --layers 2 --layouts 1:tile:offload 2>&1 | grep '^{'
  $probe --model llama-8b --seq 65536 --layers 2 --layouts 0 2 2:keep 0:tile 2:tile 1:keep:offload 2>&1 | grep '^{' ;;
8b)
  python3 benchmarks/load_pretrained.py --folder /tmp/hf-llama-8b --out "$OUT/load_pretrained.jsonl" 2>&1 | grep '^{'
  python3 benchmarks/train_step.py --model llama-8b --seq 32768 --warmup 1 --steps 2 --variants loom \
    --set model.init_from=/tmp/hf-llama-8b --out "$OUT/train_step.jsonl" "$@" 2>&1 | grep '^{'
  for seq_warmup in 131072:1 245760:0; do  # (240K: one step, compilation included, to stay inside a device call)
    python3 benchmarks/train_step.py --model llama-8b --seq "${seq_warmup%:*}" --warmup "${seq_warmup#*:}" --steps 1 \
      --variants loom --out "$OUT/train_step.jsonl" "$@" 2>&1 | grep '^{'
  done ;;
two)
  python3 benchmarks/ring_attention.py --lengths 131072 524288 --native-cp --out "$OUT/ring_attention.jsonl" 2>&1 | grep '^{'
  python3 benchmarks/lasp.py --lengths 131072 524288 2097152 --chunk 256 --out "$OUT/lasp.jsonl" 2>&1 | grep '^{'
  $step --seq 131072 --sp 2 --variants loom no_overlap "$@" 2>&1 | grep '^{'
  stdlib
  $step --seq 131072 --sp 2 --data /tmp/stdlib --microbatches 8 --variants loom adaptive "$@" 2>&1 | grep '^{' ;;
esac
