"""``raddino viz``: the teacher's last-block CLS attention maps over radiographs, as PNG grids."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  raddino viz runs/cxr --images ../shared/data/cxr-covid-sample/images --max-images 16
  raddino viz exports/cxr --images a.png b.jpg --size 518 --out viz/cxr

RUN is a `raddino pretrain` output directory (the teacher of its newest complete checkpoint, or --checkpoint) or a
`raddino export --format safetensors` directory. Writes one PNG per image (input, mean over heads, each head) and
overview.png (the mean map of each image).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz",
        help="render the teacher's CLS attention maps (per head and mean) over images to PNG",
        description="Render the last block's CLS-to-patch attention of a run's teacher over radiographs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory or exported (safetensors) directory")
    parser.add_argument(
        "--images", "-i", nargs="+", required=True, metavar="DIR_OR_FILE", help="image files and/or directories"
    )
    parser.add_argument(
        "--out", "-o", type=Path, default=None, metavar="DIR", help="output directory (default RUN/viz)"
    )
    parser.add_argument("--size", type=int, default=224, help="input side in px (multiple of the patch size)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images")
    parser.add_argument("--checkpoint", default=None, metavar="STEP_OR_DIR", help="checkpoint (default: newest)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino.viz import visualize

    out = args.out or args.run_dir / "viz"
    result = visualize(
        args.run_dir,
        images=args.images,
        out=out,
        size=args.size,
        max_images=args.max_images,
        checkpoint=args.checkpoint,
    )
    print(f"attention of {result.source}: {len(result.files) - 1} images -> {out} (overview: {result.files[-1]})")
    return 0
