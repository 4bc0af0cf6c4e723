"""``raddino shard``: convert a folder or list of PNG/JPEG/DICOM radiographs into PHI-free WebDataset shards."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def _byte_size(text: str) -> int:
    """'500M', '1G', '2GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?)?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G, 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from raddino.data.dicom import ALLOWED_FIELDS, RADIOGRAPHY_MODALITIES

    parser = subparsers.add_parser(
        "shard",
        help="convert PNG/JPEG/DICOM radiographs into PHI-free WebDataset tar shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert a directory tree, a file list (one path per line) or a CSV of PNG / JPEG / DICOM radiographs\n"
            "into OUT/shard-NNNNNN.tar + OUT/manifest.json. Each sample is <key>.png (8- or 16-bit grayscale, shorter\n"
            "side resized to --size) and <key>.json (preprocessing record, allow-listed DICOM fields, --carry\n"
            "columns). Keys are salted hashes of the source paths; the source -> key table and the salt go to a\n"
            "separate key-map CSV (default: OUT.keymap.csv beside OUT) that must stay private. Unusable files are\n"
            "skipped and counted by reason. See docs/DATA.md."
        ),
        epilog=(
            "examples:\n"
            "  raddino shard /data/cxr --out shards/cxr\n"
            "  raddino shard /data/cxr --out shards/cxr16 --bit-depth 16 --modalities CR,DX --workers 16\n"
            "  raddino shard labels.csv --path-column file --carry view,sex,label --out shards/eval --size 448"
        ),
    )
    parser.add_argument("input", type=Path, help="directory (walked recursively), .csv file, or text file of paths")
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards and manifest.json")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards/manifest in a non-empty --out and an existing key map (whose salt is reused)",
    )
    group = parser.add_argument_group("keys and PHI")
    group.add_argument(
        "--key-map", type=Path, default=None, help="source -> key CSV with the salt (default: OUT.keymap.csv)"
    )
    group.add_argument(
        "--salt",
        default=None,
        help="salt for the key hashes (>= 8 characters); default: the existing key map's, else a new random one",
    )
    group.add_argument(
        "--carry",
        type=_csv_list,
        default=(),
        metavar="COL,COL",
        help="CSV columns copied into each sample's JSON (e.g. view,sex,age,label)",
    )
    group.add_argument(
        "--allow-identifying-columns",
        action="store_true",
        help="allow --carry columns whose names look identifying (name, id, date, path ...)",
    )
    group = parser.add_argument_group("inputs")
    group.add_argument("--path-column", default="path", help="CSV column with the file paths (default: path)")
    group.add_argument(
        "--root", type=Path, default=None, help="base for relative paths in a list/CSV (default: the list's folder)"
    )
    group = parser.add_argument_group("image preprocessing")
    group.add_argument("--size", type=int, default=518, help="shorter side in pixels (0 = keep; default 518)")
    group.add_argument("--no-upscale", action="store_true", help="do not enlarge images smaller than --size")
    group.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="stored PNG bit depth (default 8)")
    group.add_argument(
        "--scaling",
        choices=("minmax", "percentile"),
        default="minmax",
        help="intensity mapping to the stored range: per-image min-max (default) or --percentiles",
    )
    group.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        default=(0.5, 99.5),
        metavar=("LOW", "HIGH"),
        help="percentiles mapped to black/white with --scaling percentile (default 0.5 99.5)",
    )
    group.add_argument(
        "--resample",
        choices=("bilinear", "bicubic", "lanczos", "box"),
        default="bicubic",
        help="resampling filter, antialiased when shrinking (default bicubic)",
    )
    group.add_argument(
        "--png-compress-level",
        type=int,
        default=3,
        help="zlib level 0-9 of stored PNGs (default 3; 6-9 write several times slower for ~3%% smaller files)",
    )
    group.add_argument(
        "--multi-frame",
        choices=("skip", "first"),
        default="skip",
        help="multi-frame DICOM / animated images: skip them (default) or keep the first frame",
    )
    group = parser.add_argument_group("DICOM")
    group.add_argument(
        "--modalities",
        default=",".join(RADIOGRAPHY_MODALITIES),
        metavar="LIST|any",
        help=f"allowed Modality values, or 'any' (default {','.join(RADIOGRAPHY_MODALITIES)})",
    )
    group.add_argument(
        "--voi",
        choices=("auto", "window", "none"),
        default="auto",
        help="VOI step: auto = VOI LUT, else window center/width; window = prefer the window; none = skip",
    )
    group.add_argument("--voi-index", type=int, default=0, help="which of several windows / VOI LUTs (default 0)")
    group.add_argument(
        "--keep-burned-in", action="store_true", help="keep images with BurnedInAnnotation = YES (skipped by default)"
    )
    group.add_argument(
        "--dicom-fields",
        type=_csv_list,
        default=ALLOWED_FIELDS,
        metavar="FIELD,FIELD",
        help=f"header fields copied to the JSON, a subset of: {','.join(ALLOWED_FIELDS)}",
    )
    group = parser.add_argument_group("shards and parallelism")
    group.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    group.add_argument("--max-size", type=_byte_size, default="500M", help="bytes per shard at most (default 500M)")
    group.add_argument("--workers", type=int, default=None, help="worker processes (default: the available CPU cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino.data.dicom import DicomReadOptions
    from raddino.data.preprocess import PreprocessOptions
    from raddino.data.shard import build_shards
    from raddino.data.shard_inputs import collect_inputs
    from raddino.errors import RaddinoError

    modalities = (
        None if args.modalities.strip().lower() == "any" else tuple(m.upper() for m in _csv_list(args.modalities))
    )
    dicom = DicomReadOptions(
        voi=args.voi,
        voi_index=args.voi_index,
        modalities=modalities,
        multi_frame=args.multi_frame,
        skip_burned_in=not args.keep_burned_in,
        fields=tuple(args.dicom_fields),
    )
    options = PreprocessOptions(
        size=args.size,
        upscale=not args.no_upscale,
        bit_depth=args.bit_depth,
        scaling=args.scaling,
        percentiles=tuple(args.percentiles),
        resample=args.resample,
        png_compress_level=args.png_compress_level,
        dicom=dicom,
    )
    inputs = collect_inputs(
        args.input,
        root=args.root,
        path_column=args.path_column,
        carry=args.carry,
        allow_identifying_columns=args.allow_identifying_columns,
        exclude=(args.out,),
    )
    if not inputs.items:
        raise RaddinoError(f"no input files found in {args.input}")
    workers = args.workers if args.workers is not None else _default_workers()
    summary = build_shards(
        inputs,
        out_dir=args.out,
        options=options,
        key_map=args.key_map,
        salt=args.salt,
        max_count=args.max_count,
        max_bytes=args.max_size,
        workers=min(workers, len(inputs.items)),
        overwrite=args.overwrite,
    )
    print(
        f"{summary.written} of {summary.inputs} images written to {len(summary.shards)} shards "
        f"({summary.total_bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)"
    )
    if summary.skipped:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in summary.skipped.items())
        print(f"skipped {sum(summary.skipped.values())}: {reasons} (per-file reasons in the key map)")
    if inputs.ignored_files:
        print(f"ignored {inputs.ignored_files} files that are not images by name (see docs/DATA.md)")
    print(f"manifest: {summary.manifest_path}")
    print(f"key map (private: source paths + salt): {summary.key_map_path}")
    if summary.written == 0:
        print("error: no image was written")
        return 1
    return 0
