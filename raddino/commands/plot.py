"""``raddino plot``: a run's training curves (loss terms and collapse monitors) from metrics.jsonl as one PNG."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot a run's loss terms and monitors (metrics.jsonl) to a PNG; works while the run is going",
        description="Render loss, dino, ibot, koleo, teacher / student entropy against log K, dino_rel, student "
        "feature std, lr and the collapse flags of RUN/metrics.jsonl into one PNG.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="`raddino pretrain` output directory")
    parser.add_argument("--out", "-o", type=Path, default=None, metavar="FILE.png", help="default RUN/curves.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino.errors import RaddinoError
    from raddino.plots import plot_run

    if not args.run_dir.is_dir():
        raise RaddinoError(f"run directory not found: {args.run_dir}")
    log_k = None
    if (args.run_dir / "config.yaml").is_file():
        from raddino.config import load_config

        log_k = math.log(int(load_config(args.run_dir / "config.yaml").head.out_dim))
    print(plot_run(args.run_dir, out=args.out, log_k=log_k))
    return 0
