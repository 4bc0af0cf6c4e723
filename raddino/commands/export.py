"""``raddino export``: a run's teacher backbone as safetensors, timm, HF transformers or DINOv2 hub weights."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """formats:
  safetensors  raddino's own (backbone.safetensors + config.yaml): `ours:DIR` in raddino eval, model.init_from=DIR
  timm         timm.create_model("local-dir:DIR", pretrained=True)
  hf           transformers.AutoModel.from_pretrained(DIR) (Dinov2Model, RAD-DINO's format) + image processor
  dinov2       Meta's hub layout (backbone.pth / backbone.safetensors) for torch.hub dinov2_vit*14 models

examples:
  raddino export runs/cxr --format hf --out exports/cxr-hf
  raddino export runs/cxr --format timm --out exports/cxr-timm --heads --eval runs/eval/chest-20250101

Each directory gets a model card (README.md): architecture, usage, training config, data manifest summary, steps,
and the evaluation results given with --eval. Where the target library interpolates position embeddings with
another rule than the model (timm, transformers' Dinov2Model for Meta-rule models), the grid is stored at the
input size the export's preprocessing declares (crops.global_size), so the features are raddino's exactly there;
the card gives the measured difference at other sizes. --img-size N stores the grid for N px instead.
To convert pretrained weights without a run, see `raddino convert`.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run's teacher backbone (safetensors | timm | hf | dinov2)",
        description="Export the teacher backbone of a run's newest complete checkpoint for other tools.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="`raddino pretrain` output directory")
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
        "--checkpoint",
        default=None,
        metavar="STEP_OR_DIR",
        help="checkpoint directory or step number (default: newest complete checkpoint)",
    )
    parser.add_argument("--heads", action="store_true", help="also export the DINO / iBOT heads (heads/*.safetensors)")
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help=(
            "store the position grid for this input size (default: crops.global_size where the target library's "
            "interpolation rule differs from the model's, else the model's img_size)"
        ),
    )
    parser.add_argument(
        "--eval",
        dest="eval_dirs",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="`raddino eval` output directory whose results.md goes into the model card (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino.interop.export import export_run

    result = export_run(
        args.run_dir,
        fmt=args.fmt,
        out=args.out,
        checkpoint=args.checkpoint,
        with_heads=args.heads,
        img_size=args.img_size,
        overwrite=args.overwrite,
        eval_dirs=args.eval_dirs,
    )
    print(f"exported step {result.step} ({result.checkpoint.name}) as {result.format} to {result.out}:")
    for name in result.files:
        print(f"  {name}")
    return 0
