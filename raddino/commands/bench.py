"""``raddino bench``: speed benchmarks. ``raddino bench loader`` times the shard stream of pretraining,
``raddino bench train`` the training step (split into phases, with MFU; :mod:`raddino.train_bench`).

``loader`` measures images/s through the whole per-worker pipeline of :mod:`raddino.data.stream` (tar reading,
shuffle buffer, PIL decode, multi-crop, iBOT masks, collation), in the main process (``--workers 0``, torch
threads = 1) and with N DataLoader worker processes, on temporary 8- and 16-bit PNG shards made from the synthetic
generator (or on ``--shards``). It also times decoding alone and crops + masks alone in one process, so the
bottleneck is visible, and, side by side in one process, decode + crops + masks per image of raddino's pipeline
and of DINOv2's (:mod:`raddino.data.dinov2_pipeline`, torchvision transforms on PIL) on the same encoded images.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPILOG = """examples:
  raddino bench loader                                  # synthetic 512 px 8- and 16-bit shards, 0 and 2 workers
  raddino bench loader --workers 0,4,8 --batches 50
  raddino bench loader --shards '/data/cxr/shard-{000000..000009}.tar' --workers 8

Numbers depend on what else runs on the machine: compare runs made side by side. Synthetic images are not
your radiographs: decoding speed depends on the image and on the PNG writer (real radiographs in PNGs written by
Pillow decode about 2x slower than in the PNGs `raddino shard` writes). To know how fast your data loads, time
your own shards with --shards.
"""

_SHARD_SAMPLES = 16  # samples per temporary shard


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"need integers >= 0, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed benchmarks (loader: the shard stream of pretraining; probe: feature extraction + linear probe)",
        description="Speed benchmarks of raddino components.",
    )
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    loader = sub.add_parser(
        "loader",
        help="images/s of the shard stream: decode + multi-crop + masks, per worker and for N workers",
        description=(
            "Times the pretraining shard stream (tar reading, shuffle, PIL decode, multi-crop, iBOT masks, collation)\n"
            "on temporary synthetic 8- and 16-bit PNG shards, or on --shards. Per configuration it prints images/s\n"
            "and images/s per worker process (--workers 0 runs in this process with one torch thread), plus decode\n"
            "alone and crops + masks alone in one process, and decode + crops + masks of raddino's pipeline and of\n"
            "DINOv2's (torchvision on PIL) side by side in one process, with their ratio."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    loader.add_argument(
        "--shards",
        action="append",
        default=None,
        metavar="PATTERN",
        help="shard URL pattern to read instead of synthetic shards (repeatable)",
    )
    loader.add_argument("--size", type=int, default=512, help="side of the synthetic images in pixels (default 512)")
    loader.add_argument(
        "--images",
        type=int,
        default=64,
        help="distinct synthetic images per bit depth (default 64; the stream resamples them)",
    )
    loader.add_argument(
        "--bit-depths", type=_int_list, default=[8, 16], help="synthetic PNG bit depths, comma-separated (default 8,16)"
    )
    loader.add_argument(
        "--workers",
        type=_int_list,
        default=[0, 2],
        help="DataLoader worker counts to time, comma-separated; 0 = main process (default 0,2)",
    )
    loader.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    loader.add_argument("--batches", type=int, default=20, help="timed batches per configuration (default 20)")
    loader.add_argument("--global-size", type=int, default=224, help="global crop side (default 224)")
    loader.add_argument("--local-size", type=int, default=98, help="local crop side (default 98)")
    loader.add_argument("--n-global", type=int, default=2, help="global crops per image (default 2)")
    loader.add_argument("--n-local", type=int, default=8, help="local crops per image (default 8)")
    loader.add_argument("--patch-size", type=int, default=14, help="ViT patch size for the masks (default 14)")
    loader.add_argument(
        "--interpolation",
        default="pyramid",
        help="crop resampling of raddino's pipeline: pyramid (default), bicubic (PIL's filter, as DINOv2) or bilinear",
    )
    loader.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of the side-by-side timing, best round counts (default 3)",
    )
    loader.add_argument("--shuffle-buffer", type=int, default=100, help="shuffle buffer per worker (default 100)")
    loader.add_argument("--seed", type=int, default=0, help="stream and synthetic-image seed (default 0)")
    loader.add_argument("--json", type=Path, default=None, help="also write every measured number as JSON here")
    loader.set_defaults(func=run_loader)
    probe = sub.add_parser(
        "probe",
        help="seconds for tiny-ViT feature extraction + linear-probe C sweep on PneumoniaMNIST",
        description=(
            "Times a linear-probe evaluation without the feature cache: features of all 5,856 PneumoniaMNIST images\n"
            "from a random-init ViT-Ti at 64 px (the tiny recipe's token count), then the 45-point C sweep."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="NPZ",
        help="PneumoniaMNIST .npz (default ../shared/data/pneumoniamnist.npz)",
    )
    probe.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    probe.set_defaults(func=run_probe)
    train = sub.add_parser(
        "train",
        help="training step time split by phase, images/s, peak memory and MFU (synthetic data)",
        description=(
            "Times the real training step (build_training: FSDP2 / activation checkpointing / compile as set) on\n"
            "synthetic radiographs: data wait, teacher forward, student forward + backward, optimizer, EMA; prints\n"
            "images/s, peak GPU memory and model-FLOP utilisation (FLOPs counted as in raddino/flops.py) against\n"
            "--peak-tflops or a measured matmul peak. Extra KEY=VALUE overrides go to the config."
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", default="vitb14_cxr", help="recipe (default vitb14_cxr)")
    train.add_argument("--arch", default=None, help="model.arch (tiny | small | base | large | giant)")
    train.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    train.add_argument("--global-size", type=int, default=None, help="global crop side (recipe default)")
    train.add_argument("--local-size", type=int, default=None, help="local crop side (recipe default)")
    train.add_argument("--n-local", type=int, default=None, help="local crops per image (recipe default)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    train.add_argument("--fsdp", action="store_true", help="FSDP2 even on one process (parallel.fsdp=true)")
    train.add_argument("--compile", action="store_true", help="torch.compile each block")
    train.add_argument(
        "--pack", action="store_true", help="one student pass for global and local crops (model.pack_crops=true)"
    )
    train.add_argument("--ac", type=int, default=0, help="activation checkpointing every k-th block (0: off)")
    train.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    train.add_argument("--workers", type=int, default=8, help="data loader workers (default 8)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: measured)")
    train.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(func=run_train)


TRAIN_EPILOG = """examples:
  raddino bench train --arch base --batch 64 --precision bf16 --fsdp          # ViT-B/14, 2x224 + 8x98 (H100/H200)
  raddino bench train --arch base --batch 64 --precision bf16 --fsdp --pack   # the same, crops packed in one pass
  raddino bench train --arch large --batch 64 --ac 1 --compile --peak-tflops 989
  raddino bench train --arch tiny --batch 8 --global-size 56 --local-size 28 --n-local 2 --device cpu head.out_dim=4096
"""


def run_train(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from raddino.config import load_config
    from raddino.errors import RaddinoError
    from raddino.train_bench import run_train_bench

    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise RaddinoError("--steps and --batch must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="raddino-bench-train-") as out:
        overrides = [
            "data.source=synthetic",
            "data.synthetic_count=1024",
            f"data.batch_size={args.batch}",
            f"data.num_workers={args.workers}",
            f"train.precision={args.precision}",
            f"train.device={args.device}",
            f"train.output_dir={out}",
            "train.progress=false",
            f"parallel.compile={str(args.compile).lower()}",
            f"parallel.activation_checkpointing={args.ac}",
        ]
        if args.fsdp:
            overrides.append("parallel.fsdp=true")
        if args.pack:
            overrides.append("model.pack_crops=true")
        for key, value in (
            ("model.arch", args.arch),
            ("crops.global_size", args.global_size),
            ("crops.local_size", args.local_size),
            ("crops.n_local", args.n_local),
        ):
            if value is not None:
                overrides.append(f"{key}={value}")
        cfg = load_config(args.config, [*overrides, *args.overrides])
        if cfg.data.synthetic_size < cfg.crops.global_size:  # synthetic images at least as large as a global crop
            size = f"data.synthetic_size={cfg.crops.global_size}"
            cfg = load_config(args.config, [*overrides, size, *args.overrides])
        result = run_train_bench(cfg, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    print(result.describe())
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from raddino.errors import RaddinoError
    from raddino.eval.bench import DEFAULT_NPZ, run_bench

    npz = args.dataset or DEFAULT_NPZ
    if not npz.is_file():
        raise RaddinoError(f"bench probe needs PneumoniaMNIST: {npz} not found (pass --dataset PATH.npz)")
    print(run_bench(npz=npz, num_workers=args.num_workers).describe())
    return 0


@dataclass(frozen=True)
class LoaderTiming:
    label: str
    workers: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def per_process(self) -> float:
        """Images/s divided by the processes doing the work (the main process when workers = 0)."""
        return self.images_per_second / max(1, self.workers)


def _synthetic_image(index: int, *, seed: int, size: int, bit_depth: int) -> np.ndarray:
    """A synthetic radiograph; 16-bit ones get independent noise in the low bits, like a 12-16-bit detector."""
    from raddino.data.synthetic import synthetic_cxr

    image, _ = synthetic_cxr(index, seed=seed, size=size)
    if bit_depth == 8:
        return image
    noise = np.random.default_rng([seed, index]).normal(0.0, 64.0, size=image.shape)
    return np.clip(np.rint(image.astype(np.float64) * 257.0 + noise), 0, 65535).astype(np.uint16)


def _write_synthetic_shards(out_dir: Path, *, images: int, size: int, bit_depth: int, seed: int) -> str:
    """``out_dir/shard-NNNNNN.tar`` in the builder's format (:mod:`raddino.data.shard_format`) -> brace pattern."""
    from tqdm import tqdm

    from raddino.data.preprocess import PreprocessOptions, encode_png
    from raddino.data.shard_format import SampleRecord, ShardWriter, sample_members

    level = PreprocessOptions().png_compress_level  # the PNGs `raddino shard` writes
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_count=_SHARD_SAMPLES, max_bytes=2**62)  # shards split by count only
    try:
        with tqdm(total=images, desc=f"{bit_depth}-bit {size} px shards", disable=None, leave=False) as bar:
            for index in range(images):
                pixels = _synthetic_image(index, seed=seed, size=size, bit_depth=bit_depth)
                shape = (int(pixels.shape[0]), int(pixels.shape[1]))
                record = SampleRecord("png", shape, size=shape, bit_depth=bit_depth)
                writer.add(f"{index:032x}", sample_members(encode_png(pixels, compress_level=level), record))
                bar.update(1)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return str(out_dir / f"shard-{{000000..{len(writer.shards) - 1:06d}}}.tar")


def _stream(args: argparse.Namespace, patterns: list[str], num_batches: int):
    from raddino.data.augment import MultiCropAugmentation
    from raddino.data.stream import ShardStream, shard_sets

    augmentation = MultiCropAugmentation(
        global_size=args.global_size,
        local_size=args.local_size,
        n_global=args.n_global,
        n_local=args.n_local,
        interpolation=args.interpolation,
    )
    return ShardStream(
        datasets=shard_sets(patterns),
        augmentation=augmentation,
        patch_size=args.patch_size,
        mask_prob=0.5,
        mask_ratio=(0.1, 0.5),
        seed=args.seed,
        batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer,
        resampled=True,
        num_batches=num_batches,
    )


def _time_loader(args: argparse.Namespace, patterns: list[str], workers: int, label: str) -> LoaderTiming:
    """Times ``args.batches`` batches after ``max(1, workers)`` warm-up batches (worker start, buffer fill)."""
    from tqdm import tqdm

    from raddino.data.stream import build_stream_loader

    warmup = max(1, workers)
    stream = _stream(args, patterns, warmup + args.batches)
    loader = build_stream_loader(stream, num_workers=workers, pin_memory=False)
    batches: Iterator = iter(loader)
    for _ in range(warmup):
        next(batches)
    images = 0
    start = time.perf_counter()
    for batch in tqdm(batches, total=args.batches, desc=f"{label}, {workers} workers", disable=None, leave=False):
        images += batch.batch_size
    seconds = time.perf_counter() - start
    del batches, loader  # stop the worker processes before the next configuration
    return LoaderTiming(label, workers, images, seconds)


def _time_stages(args: argparse.Namespace, patterns: list[str]) -> tuple[float, float]:
    """Images/s in this process of decoding alone, and of crops + masks alone (on already decoded images)."""
    from raddino.data.dataset import make_ssl_sample, sample_generator
    from raddino.data.imageio import decode_image

    stream = _stream(args, patterns, 1)
    worker = stream.worker_stream()
    raws = [raw for raw, _ in zip(worker.raw_samples(), range(args.batch_size * 2), strict=False)]
    start = time.perf_counter()
    images = [decode_image(raw.data) for raw in raws]
    decode = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for position, image in enumerate(images):
        make_ssl_sample(
            image,
            None,
            augmentation=stream.augmentation,
            grid=stream.grid,
            mask_prob=stream.mask_prob,
            mask_ratio=stream.mask_ratio,
            rng=sample_generator(args.seed, position),
        )
    augment = len(images) / (time.perf_counter() - start)
    return decode, augment


@dataclass(frozen=True)
class SideBySide:
    """Images/s of decode + crops + masks in one process, raddino's pipeline and DINOv2's, on the same images."""

    raddino: float
    dinov2: float

    @property
    def ratio(self) -> float:
        return self.raddino / self.dinov2


def _time_side_by_side(args: argparse.Namespace, patterns: list[str]) -> SideBySide:
    """Both pipelines on the same ``2 * batch_size`` encoded images in ``args.rounds`` interleaved rounds.

    Interleaving and taking each pipeline's best round keeps the ratio meaningful on a machine shared with other
    jobs (a slow spell hits one round of each, not one pipeline).
    """
    import torch

    from raddino.data.dataset import make_ssl_sample, sample_generator
    from raddino.data.dinov2_pipeline import DINOv2Pipeline
    from raddino.data.imageio import decode_image

    stream = _stream(args, patterns, 1)
    encoded = [
        raw.data for raw, _ in zip(stream.worker_stream().raw_samples(), range(args.batch_size * 2), strict=False)
    ]
    augmentation = stream.augmentation
    dinov2 = DINOv2Pipeline(
        global_size=args.global_size,
        local_size=args.local_size,
        n_local=args.n_local,
        global_scale=augmentation.global_scale,
        local_scale=augmentation.local_scale,
        grid=stream.grid,
        mask_prob=stream.mask_prob,
        mask_ratio=stream.mask_ratio,
        seed=args.seed,
    )

    def raddino_pipeline() -> None:
        for position, data in enumerate(encoded):
            make_ssl_sample(
                decode_image(data),
                None,
                augmentation=augmentation,
                grid=stream.grid,
                mask_prob=stream.mask_prob,
                mask_ratio=stream.mask_ratio,
                rng=sample_generator(args.seed, position),
            )

    def dinov2_pipeline() -> None:
        for data in encoded:
            dinov2(data)

    torch.manual_seed(args.seed)  # torchvision's random transforms draw from torch's global generator
    best = {raddino_pipeline: float("inf"), dinov2_pipeline: float("inf")}
    for _ in range(args.rounds):
        for pipeline in best:
            start = time.perf_counter()
            pipeline()
            best[pipeline] = min(best[pipeline], time.perf_counter() - start)
    return SideBySide(raddino=len(encoded) / best[raddino_pipeline], dinov2=len(encoded) / best[dinov2_pipeline])


def run_loader(args: argparse.Namespace) -> int:
    import torch

    from raddino.errors import RaddinoError

    if args.batch_size < 1 or args.batches < 1 or args.images < 1 or args.rounds < 1 or args.size < 16:
        raise RaddinoError("--batch-size, --batches, --images and --rounds must be >= 1 and --size >= 16")
    if any(b not in (8, 16) for b in args.bit_depths):
        raise RaddinoError(f"--bit-depths must be 8 and/or 16, got {args.bit_depths}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    import cv2

    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # the main process works like one DataLoader worker
    cv2.setNumThreads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="raddino-bench-") as tmp:
            if args.shards:
                configs = [("shards", list(args.shards))]
            else:
                configs = [
                    (
                        f"{depth}-bit {args.size} px",
                        [
                            _write_synthetic_shards(
                                Path(tmp) / f"{depth}bit",
                                images=args.images,
                                size=args.size,
                                bit_depth=depth,
                                seed=args.seed,
                            )
                        ],
                    )
                    for depth in args.bit_depths
                ]
            crops = (
                f"{args.n_global}x{args.global_size} + {args.n_local}x{args.local_size} crops + masks, "
                f"batch {args.batch_size}"
            )
            print(f"loader benchmark: decode + {crops}; {cores} CPU cores available")
            print(f"{'data':<18} {'workers':>7} {'images/s':>9} {'per process':>11}")
            measured: dict[str, dict] = {}
            for label, patterns in configs:
                decode, augment = _time_stages(args, patterns)
                record = measured[label] = {"stream": {}, "decode_alone": decode, "crops_masks_alone": augment}
                for workers in args.workers:
                    timing = _time_loader(args, patterns, workers, label)
                    record["stream"][str(workers)] = {
                        "images_per_s": timing.images_per_second,
                        "per_process": timing.per_process,
                    }
                    print(
                        f"{label:<18} {workers:>7} {timing.images_per_second:>9.1f} {timing.per_process:>11.1f}",
                        flush=True,
                    )
                print(
                    f"{label:<18} one process: decode alone {decode:.0f} images/s, crops + masks alone "
                    f"{augment:.0f} images/s"
                )
                both = _time_side_by_side(args, patterns)
                record["side_by_side"] = {"raddino": both.raddino, "dinov2": both.dinov2, "ratio": both.ratio}
                print(
                    f"{label:<18} side by side, decode + crops + masks: raddino ({args.interpolation}) "
                    f"{both.raddino:.1f} images/s, DINOv2 {both.dinov2:.1f} images/s, ratio {both.ratio:.1f}x",
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    if args.json is not None:
        import json

        keys = ("n_global", "global_size", "n_local", "local_size", "batch_size", "interpolation")
        crops = {key: getattr(args, key) for key in keys}
        args.json.write_text(json.dumps({"cores": cores, "crops": crops, "data": measured}, indent=2))
    if args.n_global != 2:
        print(f"note: DINOv2's pipeline always makes 2 global crops (raddino's here: {args.n_global})")
    if max(args.workers) > cores:
        print(f"note: more workers than the {cores} available cores; per-process numbers are then not per core")
    return 0
