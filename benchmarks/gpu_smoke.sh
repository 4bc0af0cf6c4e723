#!/usr/bin/env bash
# One device call (scale-out issue, GPU part): on the GPU machine with its preinstalled torch/torchvision/timm,
# install raddino without touching them, check the imports (the CUDA-install abort), then a 200-step bf16 FSDP2
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
# peers (Performance issue): Meta's DINOv2 modules and lightly's losses timed on the same GPU and batch shape
# (benchmarks/peers.py; peers.json / peers.md). Their wheels come from .peers/ (benchmarks/fetch_peer_wheels.sh),
# which is git-ignored: name it in the device call's carry. Skipped peers / failures do not stop the smoke.
{ pip install --quiet --no-index --no-deps --find-links .peers dinov2 lightly 2>&1 | tail -2 || true
  timeout 150 python benchmarks/peers.py --out "$OUT" --steps 20 --warmup 5 2>&1 || true; } | tee "$OUT/peers.txt"
# 200 steps (was 300) and 210 s: with the peers' 150 s the whole device call stays under 10 minutes.
timeout 210 python benchmarks/gpu_smoke.py --out "$OUT" --steps "${STEPS:-200}" "$@" 2>&1 | tail -40 \
    | tee "$OUT/log.txt"
