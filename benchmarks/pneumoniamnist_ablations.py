"""PneumoniaMNIST ablations of the ``pneumoniamnist_tiny`` recipe: one pretraining run per row, same probe.

Every row is ``benchmarks/pneumoniamnist.py`` with the row's overrides on a shorter schedule (``--steps``, default
200 = 4 epochs of 50; the recipe's warmup and prototype freeze stay at 50 steps), seed 0, linear probe on
``cls_mean`` (official splits, C on val, 95 % bootstrap CI on test). A row whose output already holds its probe
results is read, not rerun.

    python benchmarks/pneumoniamnist_ablations.py --data ../shared/data/pneumoniamnist.npz \\
        --out runs/pneumoniamnist_ablations --results eval/pneumoniamnist_ablations.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (name, what the row changes, overrides); "full" is the recipe itself
ROWS: list[tuple[str, str, list[str]]] = [
    ("full", "recipe: DINO + iBOT + KoLeo, Sinkhorn-Knopp, no brightness/contrast jitter, 56 px / patch 14", []),
    ("dino_only", "DINO only (iBOT and KoLeo weights 0)", ["loss.ibot_weight=0", "loss.koleo_weight=0"]),
    ("dino_ibot", "DINO + iBOT (KoLeo weight 0)", ["loss.koleo_weight=0"]),
    ("centering", "EMA centering instead of Sinkhorn-Knopp", ["loss.centering=centering"]),
    (
        "dinov2_augs",
        "DINOv2's natural-image jitter (brightness 0.4, contrast 0.4)",
        ["crops.brightness=0.4", "crops.contrast=0.4"],
    ),
    (
        "native28_p7",
        "native 28 px, patch 7 (same 4x4 grid, no upsampling)",
        ["model.img_size=28", "crops.global_size=28", "crops.local_size=14", "model.patch_size=7"],
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="pneumoniamnist.npz")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps per row (multiple of 50)")
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], help="subset of the rows")
    parser.add_argument("--out", type=Path, default=Path("runs/pneumoniamnist_ablations"))
    parser.add_argument("--results", type=Path, default=None, help="markdown file (default OUT/results.md)")
    args = parser.parse_args(argv)
    if args.steps % 50:
        parser.error("--steps must be a multiple of the recipe's 50 steps per epoch")
    script = Path(__file__).with_name("pneumoniamnist.py")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}; `pneumoniamnist_tiny`, {args.steps} steps (batch 64), seed 0, "
        "linear probe on `cls_mean`, test AUROC [95 % bootstrap CI]; one pretraining run per row.",
        "",
        "| row | change | pretraining | test AUROC | DINO CE / log K (last 20 steps) |",
        "|---|---|---|---|---|",
    ]
    for name, description, overrides in ROWS:
        if name not in args.rows:
            continue
        out = args.out / name
        results = out / "eval" / "results.jsonl"
        if not results.is_file():
            sets = [x for kv in overrides for x in ("--set", kv)]
            cmd = [
                sys.executable,
                str(script),
                "--data",
                args.data,
                "--seeds",
                "0",
                "--features",
                "cls_mean",
                "--no-baselines",
                "--set",
                f"train.epochs={args.steps // 50}",
                "--set",
                f"train.checkpoint_every={args.steps}",
                *sets,
                "--out",
                str(out),
            ]
            print("+ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        record = json.loads(results.read_text().splitlines()[0])
        auroc, (lo, hi) = record["metrics"]["auroc"], record["ci"]["auroc"]
        wall = json.loads((out / "seed0" / "pretrain_wall.json").read_text())["seconds"]
        metrics = [json.loads(x) for x in (out / "seed0" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        dino_rel = sum(m["dino_rel"] for m in metrics[-20:]) / len(metrics[-20:])
        change = description + (f" (`{' '.join(overrides)}`)" if overrides else "")
        lines.append(f"| {name} | {change} | {wall / 60:.1f} min | {auroc:.3f} [{lo:.3f}, {hi:.3f}] | {dino_rel:.3f} |")
    text = "\n".join(lines) + "\n"
    target = args.results or args.out / "results.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
