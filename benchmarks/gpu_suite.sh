#!/usr/bin/env bash
# One device call: environment, the CUDA tests, then the ring-attention benchmark.
# Usage on the GPU host: bash benchmarks/gpu_suite.sh [bench args...]   (writes into $OUT)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'cudnn', torch.backends.cudnn.version())"
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 benchmarks/ring_attention.py --out "$OUT/ring_attention.jsonl" "$@" 2>&1 | grep -v -i warn | tee "$OUT/ring_bench.log"
