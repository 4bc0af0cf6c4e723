"""``raddino convert``: a pretrained backbone (DINOv2 hub, timm, HF transformers, raddino) as an export directory."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """sources (what model.init_from reads):
  a DINOv2 hub checkpoint (dinov2_vitb14_pretrain.pth), a timm weights file or directory, an HF transformers
  directory (e.g. RAD-DINO after `huggingface-cli download microsoft/rad-dino --local-dir rad-dino`), a raddino
  export or run directory (the newest complete checkpoint's teacher)

examples:
  raddino convert dinov2_vitb14_pretrain.pth --format hf --out exports/dinov2-b-hf --input-size 224
  raddino convert rad-dino --format timm --out exports/rad-dino-timm
  raddino convert runs/cxr --format dinov2 --out exports/cxr-hub

The directory is what `raddino export` writes, with a model card (README.md). Its preprocessing (timm
pretrained_cfg, HF preprocessor_config.json) declares --input-size px (default: the source's stored grid size) and
ImageNet mean / std. Where the target library interpolates position embeddings with another rule than the source,
the grid is stored at --input-size so the features are the source's exactly there; the card gives the measured
difference at other sizes. --img-size N stores the grid for N px instead. Heads are not converted.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert pretrained weights to safetensors | timm | hf | dinov2 without training",
        description="Convert a pretrained ViT backbone into an export directory for other tools.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="weights file or directory (see below)")
    parser.add_argument(
        "--format",
        "-f",
        dest="fmt",
        required=True,
        choices=("safetensors", "timm", "hf", "dinov2"),
        help="output format",
    )
    parser.add_argument(
        "--out", "-o", type=Path, required=True, metavar="DIR", help="output directory (must be new or empty)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="PX",
        help="input size the export's preprocessing declares (default: the source's stored grid size)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help="store the position grid for this input size (default: --input-size where the library's rule differs)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino.interop.export import convert_source

    result = convert_source(
        args.source,
        fmt=args.fmt,
        out=args.out,
        img_size=args.img_size,
        input_size=args.input_size,
        overwrite=args.overwrite,
    )
    print(f"converted {args.source} as {result.format} to {result.out}:")
    for name in result.files:
        print(f"  {name}")
    return 0
