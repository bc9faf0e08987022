#!/usr/bin/env bash
# The GPU measurements of the open issues, in as few device calls as possible (writes into $OUT).
# Usage on the GPU host:  bash benchmarks/gpu_suite.sh one|two [extra train_step args...]
#   one: CUDA tests, attention kernels, the single-GPU training step at 32K / 64K / 128K (H100 or H200)
#   two: (2+ GPUs) ring / ring_bidir / ulysses vs one GPU and torch context_parallel, LASP-2 vs LASP-1,
#        the sp=2 training step at 128K with and without overlap, adaptive vs static SP on the stdlib corpus
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
part=${1:-one}
shift || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'cudnn', torch.backends.cudnn.version())"
step="python3 benchmarks/train_step.py --model llama-1b-long --warmup 2 --steps 3 --out $OUT/train_step.jsonl"
if [ "$part" = one ]; then
  python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
  for seq in 32768 65536 131072; do $step --seq "$seq" --variants loom "$@" 2>&1 | grep '^{'; done
else
  python3 benchmarks/ring_attention.py --lengths 131072 524288 --native-cp --out "$OUT/ring_attention.jsonl" 2>&1 | grep '^{'
  python3 benchmarks/lasp.py --lengths 131072 524288 2097152 --chunk 256 --out "$OUT/lasp.jsonl" 2>&1 | grep '^{'
  $step --seq 131072 --sp 2 --variants loom no_overlap "$@" 2>&1 | grep '^{'
  python3 -m launch.cli prepare "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
    /tmp/stdlib --include '*.py' --exclude 'site-packages/*' > /dev/null
  $step --seq 131072 --sp 2 --data /tmp/stdlib --microbatches 8 --variants loom adaptive "$@" 2>&1 | grep '^{'
fi
