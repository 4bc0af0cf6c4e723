"""``raddino demo``: pretrain the tiny recipe on synthetic radiographs, then linear-probe it against random init."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Probe sets are drawn with seeds the pretraining stream never uses (it uses train.seed).
_PROBE_SPLITS = {"train": (1000, 10_001), "val": (400, 10_002), "test": (800, 10_003)}
# A coarser C grid than DINOv2's 45 points keeps the three probes within the demo's time budget.
_PROBE_CS = tuple(10.0**p for p in range(-4, 4))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="a few-minute CPU demo: pretrain on synthetic CXRs, then linear-probe vs random init",
        description="Pretrain the tiny recipe (configs/tiny_cpu.yaml) on built-in synthetic chest radiographs, "
        "then train linear probes (lesion vs no lesion) on frozen features of the pretrained teacher, the same "
        "architecture at random init, and raw pixels, and print a table. No download needed. "
        "data.synthetic_finding=reticular|miliary swaps the focal lesion for a diffuse lung pattern.",
    )
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/demo-YYYYmmdd-HHMMSS)")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the tiny recipe")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from raddino.build import backbone_from_config
    from raddino.config import load_config
    from raddino.eval.adapters.base import Preprocess
    from raddino.probe import compare_backbones
    from raddino.train import build_training, fit

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        from raddino.errors import RaddinoError

        raise RaddinoError(f"--out {out} exists and is not empty; choose another directory")
    overrides = [f"train.output_dir={out}", "train.resume=none", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config("tiny_cpu", overrides)
    started = time.perf_counter()
    training = build_training(cfg)
    summary = fit(training)
    print(f"pretrained {summary.steps} steps in {summary.seconds:.0f} s -> {summary.last_checkpoint}")
    torch.manual_seed(cfg.train.seed + 1)
    random_init = backbone_from_config(cfg.model)
    report = compare_backbones(
        backbones={"pretrained teacher": training.model.teacher["backbone"], "random init": random_init},
        transform=Preprocess(
            size=cfg.crops.global_size, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std), gray=True
        ),
        image_size=cfg.data.synthetic_size,
        splits=_PROBE_SPLITS,
        cs=_PROBE_CS,
        finding=cfg.data.synthetic_finding,
    )
    print(report.table())
    (out / "probe.md").write_text(report.table() + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")
    return 0
