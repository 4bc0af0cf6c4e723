#!/usr/bin/env bash
# One device call (scale-out issue, GPU part): on the GPU machine with its preinstalled torch/torchvision/timm,
# install raddino without touching them, check the imports (the CUDA-install abort), then a 300-step bf16 FSDP2
# ViT-B/14 (2x224 + 8x98, batch 64) pretraining. Results land in $OUT (smoke.json, smoke.md, metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raddino-gpu-smoke}
mkdir -p "$OUT"
pip install --quiet --no-deps -e . 2>&1 | tail -2 || true
pip install --quiet webdataset omegaconf submitit pydicom safetensors 2>&1 | tail -2 || true
python -c "import raddino, torchvision, timm, torch; print('imports ok', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/imports.txt"
# step split + MFU (H200 dense bf16 peak: 989 TFLOP/s; also the measured matmul peak in a second call)
timeout 150 raddino bench train --arch base --batch 64 --precision bf16 --fsdp --steps 20 --warmup 5 \
    --workers 12 --peak-tflops 989 --json "$OUT/bench_train.json" 2>&1 | tail -20 | tee "$OUT/bench_train.txt"
timeout 330 python benchmarks/gpu_smoke.py --out "$OUT" --steps "${STEPS:-300}" "$@" 2>&1 | tail -40 | tee "$OUT/log.txt"
