#!/usr/bin/env bash
# One device call (scale-out check): on the GPU machine with its preinstalled torch/torchvision/timm, raddino from
# this checkout beside them (benchmarks/gpu_env.sh: carry .whl), the imports (the CUDA-install abort), then a
# 300-step bf16 FSDP2 ViT-B/14 (2x224 + 8x98, batch 64) pretraining. Results land in $OUT (smoke.json, smoke.md,
# metrics.jsonl). The performance comparison is benchmarks/gpu_perf.sh.
#   device call: carry [".whl"], command "bash benchmarks/gpu_smoke.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raddino-gpu-smoke}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh > >(tee "$OUT/imports.txt") 2>&1  # sourced, not piped: its exports stay here
timeout 420 python3 benchmarks/gpu_smoke.py --out "$OUT" --steps "${STEPS:-300}" "$@" 2>&1 | tail -40 | tee "$OUT/log.txt"
