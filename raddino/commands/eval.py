"""``raddino eval``: linear probe, kNN and fine-tuning of many backbones on many datasets -> one results table."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

EPILOG = """examples:
  raddino eval --suite eval/medmnist_chest.yaml
  raddino eval --suite eval/medmnist_chest.yaml --backbone ours:runs/cxr --backbone timm:vit_base_patch14_dinov2
  raddino eval --suite eval/huix2024.yaml --add-backbone ours:runs/cxr   # the paper's backbones + yours
  raddino eval --dataset ../shared/data/pneumoniamnist.npz --backbone timm:vit_tiny_patch16_224 --random-init \\
      --img-size 64 --protocol linear knn_cosine --features cls_mean

Backbones: timm:NAME, hf:PATH_OR_ID, open_clip:ARCH/TAG, ours:RUN_OR_EXPORT_DIR, pixels[:SIZE] (raw pixels).
Protocols: linear, knn_cosine, knn_euclidean, finetune_frozen, finetune_unfrozen.
Features: cls, mean, cls_mean, dinov2_linear, cls_grid, cls_grid4.
Outputs in --out: results.jsonl, results.csv, summary.csv, results.md, published.csv (suites with published
rows), plots/*.png. See docs/EVAL.md.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate backbones (ours and off-the-shelf) with linear probes, kNN and fine-tuning",
        description="Run an evaluation suite (YAML in eval/) or an ad-hoc one from flags, and write one comparison "
        "table (markdown + CSV + JSONL) with bootstrap confidence intervals and plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", "-s", type=Path, default=None, help="suite YAML (e.g. eval/medmnist_chest.yaml)")
    parser.add_argument(
        "--backbone",
        "-b",
        action="append",
        default=None,
        help="backbone spec; repeat for several (replaces the suite's backbones)",
    )
    parser.add_argument(
        "--add-backbone",
        "-a",
        action="append",
        default=None,
        help="backbone spec added to the suite's backbones (keeps them and their published rows); repeat for several",
    )
    parser.add_argument(
        "--dataset",
        "-d",
        action="append",
        default=None,
        help="a suite dataset name (selects it) or a path: .npz (MedMNIST), .csv (manifest with path,label[,split]),"
        " a folder with train/ and test/ class subfolders, or a shard directory; repeat for several",
    )
    parser.add_argument("--protocol", "-p", nargs="+", default=None, help="evaluation protocols (replace the suite's)")
    parser.add_argument("--features", "-f", nargs="+", default=None, help="feature protocols (replace the suite's)")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="label fractions, e.g. 0.01 0.1 1")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds for label subsets / fine-tuning")
    parser.add_argument("--weights", type=Path, default=None, help="local weights file for the --backbone(s)")
    parser.add_argument("--random-init", action="store_true", help="random weights for the --backbone(s) (baseline)")
    parser.add_argument("--img-size", type=int, default=None, help="input size override for the --backbone(s)")
    parser.add_argument("--resize", choices=("resize", "pad"), default=None, help="small images: resize or zero-pad")
    parser.add_argument("--out", "-o", type=Path, default=None, help="output directory (default runs/eval/NAME-TIME)")
    parser.add_argument("--data-root", type=Path, default=None, help="base of relative dataset paths (default: cwd)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/raddino)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch size")
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for CIs (default 1000)")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split (quick runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(func=run)


def _suite_from_args(args: argparse.Namespace):
    from raddino.errors import RaddinoError
    from raddino.eval.datasets.base import dataset_name, infer_kind
    from raddino.eval.datasets.registry import spec_class
    from raddino.eval.suite import BackboneEntry, Suite, load_suite

    suite = load_suite(args.suite) if args.suite else Suite(name="adhoc", datasets=(), backbones=())
    changes: dict[str, object] = {}
    if args.dataset:
        by_name = {d.name: d for d in suite.datasets}
        chosen = []
        for value in args.dataset:
            if value in by_name:
                chosen.append(by_name[value])
                continue
            path = Path(value)
            if not path.exists():
                known = f" (suite datasets: {', '.join(by_name)})" if by_name else ""
                raise RaddinoError(f"--dataset {value}: neither a suite dataset nor an existing path{known}")
            name = dataset_name(path)
            chosen.append(spec_class(infer_kind(path), dataset=name)(name=name, path=str(path.resolve())))
        changes["datasets"] = tuple(chosen)
    if args.backbone:
        changes["backbones"] = tuple(
            BackboneEntry(
                spec=spec,
                weights=str(args.weights) if args.weights else None,
                random_init=args.random_init,
                img_size=args.img_size,
            )
            for spec in args.backbone
        )
    elif args.weights or args.random_init or args.img_size:
        raise RaddinoError("--weights / --random-init / --img-size apply to --backbone; name the backbone(s)")
    if args.add_backbone:
        kept = changes.get("backbones", suite.backbones)
        changes["backbones"] = tuple(kept) + tuple(BackboneEntry(spec=spec) for spec in args.add_backbone)
    for flag, key, convert in (
        ("protocol", "protocols", tuple),
        ("features", "features", tuple),
        ("fractions", "label_fractions", tuple),
        ("seeds", "seeds", tuple),
        ("resize", "resize", str),
        ("batch_size", "batch_size", int),
        ("bootstrap", "n_bootstrap", int),
        ("limit", "limit", int),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = convert(value)
    return dataclasses.replace(suite, **changes) if changes else suite


def run(args: argparse.Namespace) -> int:
    from raddino.errors import RaddinoError
    from raddino.eval.features import default_cache_dir
    from raddino.eval.report import write_report
    from raddino.eval.runner import RunOptions, SuiteRunner, default_device

    suite = _suite_from_args(args)
    out = args.out or Path("runs") / "eval" / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "results.jsonl").exists():
        raise RaddinoError(f"--out {out} already holds results.jsonl; choose another directory")
    options = RunOptions(
        out_dir=out,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        device=args.device or default_device(),
        num_workers=args.num_workers,
        data_root=args.data_root,
    )
    records = SuiteRunner(suite, options).run()
    written = write_report(
        records,
        out,
        title=f"raddino eval: {suite.name}",
        plots=not args.no_plots,
        published=suite.published,
        report_metrics=suite.report_metrics,
    )
    if (out / "results.md").is_file():
        print((out / "results.md").read_text())
    print(f"{len(records)} results; files: {', '.join(str(p) for p in written)}")
    return 0
