"""GPU smoke benchmark: bf16 FSDP2 pretraining of ViT-B/14 with 2x224 + 8x98 crops on one GPU (world size 1).

    python benchmarks/gpu_smoke.py --out "$OUT"                  # on a GPU machine (see gpu_smoke.sh)
    python benchmarks/gpu_smoke.py --out /tmp/smoke --cpu-smoke  # the same harness, tiny model on the CPU

Runs the real trainer (raddino.train) on synthetic radiographs for ``--steps`` steps, then writes to ``--out``:
``smoke.json`` (device, torch version, step time median / p90 after warm-up, images/s, peak GPU memory, first and
last losses, refused steps, collapse flags), ``metrics.jsonl`` (the run's loss curve) and ``smoke.md`` (a table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import raddino  # noqa: F401  (torchvision shim before timm)
from raddino.config import load_config
from raddino.train import build_training, fit

VITB = [
    "model.arch=base",
    "model.img_size=224",
    "model.layerscale=1e-5",
    "model.drop_path_rate=0.1",
    "crops.global_size=224",
    "crops.local_size=98",
    "crops.n_local=8",
    "head.out_dim=65536",
    "data.synthetic_size=512",
    "train.precision=bf16",
    "parallel.fsdp=true",
]
TINY = ["train.device=cpu", "parallel.fsdp=true"]  # on top of configs/micro_cpu.yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--workers", type=int, default=12, help="data loader workers")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--ac", type=int, default=0, help="activation checkpointing every k-th block (0: off)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the harness)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.out / "run"
    shutil.rmtree(run, ignore_errors=True)
    overrides = [
        *(TINY if args.cpu_smoke else VITB),
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"train.epochs={args.steps}",
        "train.steps_per_epoch=1",
        "optim.warmup_epochs=10",
        "optim.freeze_last_layer_epochs=10",
        "teacher.temp_warmup_epochs=30",
        f"train.checkpoint_every={args.steps}",
        "train.progress=false",
        f"train.output_dir={run}",
        f"parallel.activation_checkpointing={args.ac}",
        f"parallel.compile={str(args.compile).lower()}",
        *args.overrides,
    ]
    cfg = load_config("micro_cpu" if args.cpu_smoke else "tiny_cpu", overrides)
    wall = time.perf_counter()
    training = build_training(cfg)
    if training.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = fit(training)
    wall = time.perf_counter() - wall
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "refused" not in r]
    timed = [args.batch / r["img_per_s"] for r in rows[args.warmup :]] or [float("nan")]
    result = {
        "device": torch.cuda.get_device_name() if training.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "config": overrides,
        "steps": summary.steps,
        "refused_steps": summary.refused_steps,
        "wall_s": round(wall, 1),
        "step_s_median": statistics.median(timed),
        "step_s_p90": sorted(timed)[int(0.9 * (len(timed) - 1))],
        "img_per_s": args.batch / statistics.median(timed),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if training.device.type == "cuda" else None,
        "first": {k: rows[0][k] for k in ("loss", "dino", "ibot", "koleo")},
        "last": {k: rows[-1][k] for k in ("loss", "dino", "ibot", "koleo", "teacher_entropy", "student_entropy")},
        "collapse_flags": sorted({f for r in rows for f in r.get("collapse", [])}),
    }
    (args.out / "smoke.json").write_text(json.dumps(result, indent=2))
    shutil.copy(run / "metrics.jsonl", args.out / "metrics.jsonl")
    table = "\n".join(f"| {k} | {v} |" for k, v in result.items() if k != "config")
    (args.out / "smoke.md").write_text(f"| measure | value |\n|---|---|\n{table}\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
