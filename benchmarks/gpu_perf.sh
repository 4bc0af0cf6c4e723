#!/usr/bin/env bash
# One device call for the Performance issue (< 10 min on an H100/H200): raddino's training step against Meta's DINOv2
# code and lightly on the same GPU, ViT-L/14 memory with activation checkpointing, the loader with the machine's
# cores, then benchmarks/gpu_summary.py checks every goal. Each stage has its own timeout and a failed stage does not
# stop the others; everything lands in $OUT (summary.md / summary.json first).
#   here first:   bash benchmarks/fetch_gpu_wheels.sh
#   device call:  carry [".whl"], command "bash benchmarks/gpu_perf.sh", timeout_s 590
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raddino-gpu-perf}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh > >(tee "$OUT/env.txt") 2>&1 || exit 1
rd() { python3 -m raddino.cli "$@"; }
CORES=$(nproc)
# H200 / H100 SXM dense bf16 peak: 989 TFLOP/s (bench train also accepts a measured peak when this is omitted)
PEAK=${PEAK_TFLOPS:-989}
# 1. raddino, ViT-B/14, 2x224 + 8x98, batch 64, bf16, one GPU without FSDP (as the peers), then with compile
timeout 100 rd bench train --arch base --batch 64 --precision bf16 --steps 20 --warmup 5 --workers $((CORES - 2)) \
    --peak-tflops "$PEAK" --json "$OUT/train_vitb.json" 2>&1 | tee "$OUT/train_vitb.txt"
timeout 120 rd bench train --arch base --batch 64 --precision bf16 --compile --steps 20 --warmup 8 \
    --workers $((CORES - 2)) --peak-tflops "$PEAK" --json "$OUT/train_vitb_compile.json" 2>&1 \
    | tee "$OUT/train_vitb_compile.txt"
# 2. the peers on the same batch shape (benchmarks/peers.py: Meta's modules as shipped and with SDPA, lightly)
timeout 150 python3 benchmarks/peers.py --out "$OUT" --steps 20 --warmup 5 2>&1 | tee "$OUT/peers.txt"
# 3. ViT-L/14, batch 64, activation checkpointing on every block: does it fit in 80 GB?
timeout 90 rd bench train --arch large --batch 64 --precision bf16 --ac 1 --steps 3 --warmup 2 \
    --workers $((CORES - 2)) --peak-tflops "$PEAK" --json "$OUT/train_vitl_ac.json" 2>&1 | tee "$OUT/train_vitl_ac.txt"
# 4. the loader with all cores: 8-bit 512-px PNG, decode + 2x224 + 8x98 crops + masks
timeout 60 rd bench loader --workers "$CORES" --bit-depths 8 --batches 20 --batch-size 64 --images 256 --rounds 2 \
    --json "$OUT/loader.json" 2>&1 | tee "$OUT/loader.txt"
python3 benchmarks/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
