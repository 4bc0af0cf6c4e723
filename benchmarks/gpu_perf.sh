#!/usr/bin/env bash
# One device call for the Performance issue (< 10 min on an H100/H200): raddino's training step against Meta's DINOv2
# code and lightly on the same GPU, ViT-L/14 memory with activation checkpointing, the loader with the machine's
# cores, then benchmarks/gpu_summary.py checks every goal. Each stage has its own timeout and a failed stage does not
# stop the others; everything lands in $OUT (summary.md / summary.json first).
#   here first:   bash benchmarks/fetch_gpu_wheels.sh
#   device call:  carry [".whl"], command "bash benchmarks/gpu_perf.sh", timeout_s 590
#   CPU_SMOKE=1 bash benchmarks/gpu_perf.sh   # every stage, tiny, on the CPU (~30 s): checks the script itself
#   if the call ran out of time before the summary: python benchmarks/gpu_summary.py FILES_AT (the fetched $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DEFAULT=/tmp/raddino-gpu-perf
if [[ "${CPU_SMOKE:-0}" == 1 ]]; then
    OUT=${OUT:-/tmp/raddino-gpu-perf-smoke}
    mkdir -p "$OUT"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the local venv has the dependencies and the peers' path
    # a micro ViT on 2 x 28 + 2 x 14 crops; no compile (inductor on a CPU takes minutes)
    TRAIN=(--config micro_cpu --device cpu --precision fp32 --batch 4 --steps 2 --warmup 1 --workers 0)
    BASE=(--arch tiny) LARGE=(--arch tiny) COMPILE=() PEERS=(--cpu-smoke --steps 1 --warmup 1) PEAK=1
    LOADER=(--workers 2 --size 64 --batches 2 --batch-size 4 --images 8 --global-size 28 --local-size 14 --n-local 2)
else
    OUT=${OUT:-$OUT_DEFAULT}
    mkdir -p "$OUT"
    source benchmarks/gpu_env.sh > >(tee "$OUT/env.txt") 2>&1 || exit 1
    CORES=$(nproc)
    TRAIN=(--batch 64 --precision bf16 --steps 20 --warmup 5 --workers $((CORES - 2)))
    BASE=(--arch base) LARGE=(--arch large) COMPILE=(--compile --warmup 8) PEERS=(--steps 20 --warmup 5)
    # H200 / H100 SXM dense bf16 peak: 989 TFLOP/s (bench train measures a matmul peak when this is omitted)
    PEAK=${PEAK_TFLOPS:-989}
    LOADER=(--workers "$CORES" --batches 20 --batch-size 64 --images 256)
fi
RD="python3 -m raddino.cli"  # (timeout runs programs, not shell functions)
# 1. raddino, ViT-B/14, 2x224 + 8x98, batch 64, bf16, one GPU without FSDP (as the peers): eager, eager with the
#    fused AdamW kernel, compiled blocks (stage timeouts sum to < 560 s with the install)
timeout 90 $RD bench train "${TRAIN[@]}" "${BASE[@]}" --peak-tflops "$PEAK" --json "$OUT/train_vitb.json" 2>&1 \
    | tee "$OUT/train_vitb.txt"
timeout 75 $RD bench train "${TRAIN[@]}" "${BASE[@]}" --peak-tflops "$PEAK" --json "$OUT/train_vitb_fused.json" \
    optim.implementation=fused 2>&1 | tee "$OUT/train_vitb_fused.txt"  # the fused AdamW kernel (a lever)
timeout 110 $RD bench train "${TRAIN[@]}" "${BASE[@]}" "${COMPILE[@]}" --peak-tflops "$PEAK" \
    --json "$OUT/train_vitb_compile.json" 2>&1 | tee "$OUT/train_vitb_compile.txt"
# 2. the peers on the same batch shape (benchmarks/peers.py: Meta's modules as shipped and with SDPA, lightly)
timeout 130 python3 benchmarks/peers.py --out "$OUT" "${PEERS[@]}" 2>&1 | tee "$OUT/peers.txt"
# 3. ViT-L/14, batch 64, activation checkpointing on every block: does it fit in 80 GB?
timeout 80 $RD bench train "${TRAIN[@]}" "${LARGE[@]}" --ac 1 --steps 3 --warmup 2 --peak-tflops "$PEAK" \
    --json "$OUT/train_vitl_ac.json" 2>&1 | tee "$OUT/train_vitl_ac.txt"
# 4. the loader with all cores: 8-bit 512-px PNG, decode + 2x224 + 8x98 crops + masks
timeout 60 $RD bench loader "${LOADER[@]}" --bit-depths 8 --rounds 2 --json "$OUT/loader.json" 2>&1 \
    | tee "$OUT/loader.txt"
# 5. last (the lowest priority if the stages above ran long): ViT-B/14 eager with the crops packed into one student
#    pass (model.pack_crops=true; one matmul per layer for all 10 crops), against stage 1's eager number
timeout 60 $RD bench train "${TRAIN[@]}" "${BASE[@]}" --pack --peak-tflops "$PEAK" \
    --json "$OUT/train_vitb_packed.json" 2>&1 | tee "$OUT/train_vitb_packed.txt"
python3 benchmarks/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
