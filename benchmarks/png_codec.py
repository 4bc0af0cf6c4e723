"""How the stored PNG's encoding sets the loader's speed: size, write time, decode and decode + crops + masks.

    python benchmarks/png_codec.py --images ../shared/data/cxr-covid-sample/images [--size 518] [--rounds 5]

Each file goes through the shard builder's conversion (``raddino.data.preprocess.process_file``: decode, resize so
the shorter side is ``--size``, min-max to ``--bit-depth`` bits); the stored pixels are then encoded once per variant:

- ``pillow-L`` -- Pillow at zlib level L, i.e. what ``raddino shard`` wrote before (Pillow picks each row's PNG
  filter adaptively: on radiographs mostly Paeth);
- ``up-L`` -- :func:`raddino.data.preprocess.encode_png` at level L (every row PNG's "up" filter; what the builder
  writes now, at its default level 3).

For each it prints the stored size (fraction of the raw pixel bytes), the encode time per image, the decode rate
of the training path (:func:`raddino.data.imageio.decode_image`) and of decode + 2 x 224 + 8 x 98 crops + iBOT masks
(the per-image work of a loader worker), all in this one thread. Rounds are interleaved across the variants and the
best round of each is kept, so a slow spell on a shared machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from raddino.data.augment import MultiCropAugmentation
from raddino.data.dataset import make_ssl_sample, sample_generator
from raddino.data.imageio import UnusableImage, decode_image
from raddino.data.preprocess import PreprocessOptions, encode_png, process_file

SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def pillow_png(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of radiographs (PNG / JPEG / DICOM)")
    parser.add_argument("--size", type=int, default=518, help="stored shorter side in pixels (builder default 518)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="stored bit depth (default 8)")
    parser.add_argument("--max-images", type=int, default=120, help="files to use (default 120)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 3, 6, 9], help="zlib levels (default 1 3 6 9)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in SUFFIXES)[: args.max_images]
    if not files:
        print(f"no PNG / JPEG / DICOM files under {args.images}", file=sys.stderr)
        return 2
    options = PreprocessOptions(size=args.size, bit_depth=args.bit_depth)
    stored = []
    for path in files:
        try:
            stored.append(decode_image(process_file(path, options).png))
        except UnusableImage:
            continue
    raw_bytes = sum(p.nbytes for p in stored)
    shapes = np.array([p.shape for p in stored])
    print(
        f"{len(stored)} radiographs from {args.images}, stored at shorter side {args.size} "
        f"(mean {shapes[:, 0].mean():.0f} x {shapes[:, 1].mean():.0f} px, {args.bit_depth}-bit), one thread"
    )

    variants = {}
    for level in args.levels:
        variants[f"pillow-{level}"] = lambda p, level=level: pillow_png(p, level)
    for level in args.levels:
        variants[f"up-{level}"] = lambda p, level=level: encode_png(p, compress_level=level)
    augmentation = MultiCropAugmentation(global_size=224, local_size=98, n_global=2, n_local=8)

    encoded, encode_ms = {}, {}
    for name, encode in variants.items():
        start = time.perf_counter()
        encoded[name] = [encode(p) for p in stored]
        encode_ms[name] = (time.perf_counter() - start) / len(stored) * 1e3
        for data, pixels in zip(encoded[name], stored, strict=True):
            assert np.array_equal(decode_image(data), pixels), f"{name} does not round-trip"

    def decode_only(blobs: list[bytes]) -> None:
        for data in blobs:
            decode_image(data)

    def decode_and_crop(blobs: list[bytes]) -> None:
        for position, data in enumerate(blobs):
            make_ssl_sample(
                decode_image(data),
                None,
                augmentation=augmentation,
                grid=(16, 16),
                mask_prob=0.5,
                mask_ratio=(0.1, 0.5),
                rng=sample_generator(0, position),
            )

    best = {(name, stage): float("inf") for name in variants for stage in ("decode", "full")}
    for _ in range(args.rounds):
        for name in variants:
            for stage, work in (("decode", decode_only), ("full", decode_and_crop)):
                start = time.perf_counter()
                work(encoded[name])
                best[name, stage] = min(best[name, stage], time.perf_counter() - start)

    reference = f"pillow-{args.levels[0]}"
    print(f"| encoding | size / raw | encode ms | decode images/s | decode + crops + masks images/s | vs {reference} |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        size = sum(len(d) for d in encoded[name]) / raw_bytes
        decode = len(stored) / best[name, "decode"]
        full = len(stored) / best[name, "full"]
        ratio = best[reference, "full"] / best[name, "full"]
        print(f"| {name} | {size:.3f} | {encode_ms[name]:.1f} | {decode:.0f} | {full:.0f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
