#!/usr/bin/env bash
# One prepared GPU session (see docs/benchmarks.md): install transfuse into the machine's torch environment
# (offline, no deps), run the CUDA parity tests, then the merge-speed benchmark on cuda and on that machine's CPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_engine.py 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
W=/tmp/transfuse-bench
timeout 420 python3 benchmarks/merge_speed.py --device cuda --tools transfuse copy --wait-quiet 0 --retry-busy 0 \
  --workdir $W --json "$OUT/merge_speed_cuda.json" 2>&1 | tail -20 | tee "$OUT/merge_speed_cuda.txt"
# The same machine's CPU (16 cores), for a same-machine ratio.
timeout 240 python3 benchmarks/merge_speed.py --device cpu --tools transfuse --methods linear ties --models 2 \
  --wait-quiet 0 --retry-busy 0 --workdir $W --json "$OUT/merge_speed_cpu16.json" 2>&1 | tail -8 | tee "$OUT/merge_speed_cpu16.txt"
