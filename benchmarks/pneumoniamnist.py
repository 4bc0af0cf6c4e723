"""PneumoniaMNIST: pretrain from scratch on the train-split images, linear-probe the frozen teacher, compare.

Runs only committed commands (``raddino pretrain``, ``raddino export``, ``raddino eval``) and writes one markdown
table of what they measured:

1. ``raddino pretrain -c RECIPE data.path=DATA train.seed=S`` for every ``--seeds`` S (no labels; the recipe reads
   ``data.split=train`` only), timing each run's wall clock. A seed whose run directory already holds its final
   checkpoint and timing is not retrained.
2. ``raddino eval`` (linear probe, official train/val/test splits, C chosen on val, 95 % bootstrap CI on test) over
   the pretrained teachers, the same architecture at random init and raw pixels, for every ``--features`` and
   ``--fractions`` (label efficiency: 1 %, 10 % of the train labels, seeded subsets).
3. With ``--curve``: every checkpoint of the first seed exported and probed -> test AUROC against pretraining
   minutes.

    python benchmarks/pneumoniamnist.py --data ../shared/data/pneumoniamnist.npz --seeds 0 1 2 --curve \\
        --results eval/pneumoniamnist_results.md

Ablations reuse the same script with ``--set KEY=VALUE`` overrides and their own ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

RAW = "raw pixels (28 px)"
RANDOM = "same architecture, random init"


def raddino(*args: str) -> None:
    """Run a raddino CLI command in a child process (as a user would), failing loudly."""
    cmd = [sys.executable, "-m", "raddino.cli", *args]
    print("+ raddino " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def complete_checkpoints(run: Path) -> list[Path]:
    from raddino.checkpoint import CheckpointManager

    return CheckpointManager(run / "checkpoints", keep_last=0).complete()


def pretrain(*, recipe: str, data: str, seed: int, run: Path, overrides: list[str]) -> float:
    """Pretrain one seed (or reuse a finished run); returns its wall-clock seconds."""
    timing = run / "pretrain_wall.json"
    if timing.is_file():
        return float(json.loads(timing.read_text())["seconds"])
    started = time.perf_counter()
    raddino(
        "pretrain",
        "-c",
        recipe,
        f"data.path={data}",
        f"train.seed={seed}",
        f"train.output_dir={run}",
        "train.resume=none",
        "train.progress=false",
        *overrides,
    )
    seconds = time.perf_counter() - started
    timing.write_text(json.dumps({"seconds": seconds, "seed": seed, "overrides": overrides}) + "\n")
    return seconds


def evaluate(
    *, out: Path, data: str, backbones: list[dict], features: list[str], fractions: list[float], seeds: list[int]
) -> list[dict]:
    """One ``raddino eval`` over ``backbones``; returns its result records."""
    suite = {
        "name": out.name,
        "datasets": [{"name": "pneumoniamnist", "kind": "medmnist", "path": str(Path(data).resolve())}],
        "backbones": backbones,
        "protocols": ["linear"],
        "features": features,
        "label_fractions": fractions,
        "seeds": seeds,
        "n_bootstrap": 1000,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    results = out / "results.jsonl"
    if results.exists():
        results.unlink()  # a rerun measures again rather than mixing old and new records
    raddino("eval", "--suite", str(out / "suite.yaml"), "--out", str(out), "--no-cache")
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _auroc(record: dict) -> tuple[float, float, float]:
    lo, hi = record["ci"]["auroc"]
    return record["metrics"]["auroc"], lo, hi


def pick(records: list[dict], *, backbone: str, features: str, fraction: float) -> list[dict]:
    return [
        r
        for r in records
        if r["backbone"] == backbone and r["features"] == features and abs(r["fraction"] - fraction) < 1e-9
    ]


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main_table(
    records: list[dict], *, seeds: list[int], walls: dict[int, float], features: list[str], fraction: float
) -> list[str]:
    """Rows: ours per pretraining seed (+ mean ± std), random init, raw pixels; columns: feature protocols."""
    header = "| backbone | pretraining | " + " | ".join(f"test AUROC `{f}`" for f in features) + " |"
    lines = [header, "|" + "---|" * (2 + len(features))]

    def cells(backbone: str) -> list[str]:
        out = []
        for f in features:
            rows = pick(records, backbone=backbone, features=f, fraction=fraction)
            if not rows:
                out.append("n/a")
                continue
            # over label-subset seeds when the fraction is < 1 (the probe on all labels is deterministic)
            values = [r["metrics"]["auroc"] for r in rows]
            if len(rows) == 1:
                v, lo, hi = _auroc(rows[0])
                out.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                out.append(mean_std(values))
        return out

    per_seed: dict[str, list[float]] = {f: [] for f in features}
    for seed in seeds:
        name = f"ours, seed {seed}"
        lines.append(f"| {name} | {walls[seed] / 60:.1f} min | " + " | ".join(cells(name)) + " |")
        for f in features:
            per_seed[f] += [r["metrics"]["auroc"] for r in pick(records, backbone=name, features=f, fraction=fraction)]
    if len(seeds) > 1:
        wall = mean_std([walls[s] / 60 for s in seeds], digits=1)
        lines.append(
            f"| **ours, mean ± std over {len(seeds)} seeds** | {wall} min | "
            + " | ".join(f"**{mean_std(per_seed[f])}**" if per_seed[f] else "n/a" for f in features)
            + " |"
        )
    for baseline in (RANDOM, RAW):
        if any(r["backbone"] == baseline for r in records):
            lines.append(f"| {baseline} | none | " + " | ".join(cells(baseline)) + " |")
    return lines


def val_table(records: list[dict], *, seeds: list[int], features: list[str]) -> list[str]:
    """Validation AUROC of ours (mean ± std over seeds) and of the baselines, per feature protocol."""
    lines = [
        "| backbone | " + " | ".join(f"val AUROC `{f}`" for f in features) + " |",
        "|" + "---|" * (1 + len(features)),
    ]
    names = [("ours" + (f", {len(seeds)} seeds" if len(seeds) > 1 else ""), [f"ours, seed {s}" for s in seeds])]
    names += [(b, [b]) for b in (RANDOM, RAW) if any(r["backbone"] == b for r in records)]
    for label, backbones in names:
        cells = []
        for f in features:
            values = [
                r["val_metrics"]["auroc"]
                for b in backbones
                for r in pick(records, backbone=b, features=f, fraction=1.0)
            ]
            cells.append(mean_std(values, digits=4) if values else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def curve(*, run: Path, out: Path, data: str, features: list[str]) -> list[str]:
    """Every checkpoint of ``run`` exported and probed: test AUROC against pretraining minutes."""
    started = (run / "config.yaml").stat().st_mtime  # written when the run starts
    backbones, minutes = [], {}
    for ckpt in complete_checkpoints(run):
        export = out / "exports" / ckpt.name
        if not (export / "backbone.safetensors").is_file():
            raddino(
                "export",
                str(run),
                "--checkpoint",
                str(ckpt),
                "--format",
                "safetensors",
                "--out",
                str(export),
                "--overwrite",
            )
        name = ckpt.name
        minutes[name] = ((ckpt / "state.json").stat().st_mtime - started) / 60
        backbones.append({"spec": f"ours:{export}", "name": name})
    records = evaluate(out=out / "eval", data=data, backbones=backbones, features=features, fractions=[1.0], seeds=[0])
    lines = [
        "| checkpoint | pretraining minutes | " + " | ".join(f"test AUROC `{f}`" for f in features) + " |",
        "|" + "---|" * (2 + len(features)),
    ]
    for b in backbones:
        cells = []
        for f in features:
            rows = pick(records, backbone=b["name"], features=f, fraction=1.0)
            cells.append(f"{rows[0]['metrics']['auroc']:.3f}" if rows else "n/a")
        lines.append(f"| {b['name']} | {minutes[b['name']]:.1f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="pneumoniamnist.npz (MedMNIST v2, official splits)")
    parser.add_argument("--recipe", default="pneumoniamnist_tiny", help="pretraining recipe (configs/ name or YAML)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    parser.add_argument("--features", nargs="+", default=["cls", "cls_mean", "dinov2_linear", "cls_grid"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0], help="label fractions (e.g. 0.01 0.1 1)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pretraining config override (repeatable), e.g. for ablations",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="probe input size for ours and random init (default: the recipe's 56 px; raw pixels stay at 28)",
    )
    parser.add_argument("--curve", action="store_true", help="probe every checkpoint of the first seed")
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the random-init and raw-pixel rows (ablations compare against their own baseline run)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pneumoniamnist"))
    parser.add_argument(
        "--results", type=Path, default=None, help="markdown file for the tables (default OUT/results.md)"
    )
    args = parser.parse_args(argv)

    walls = {}
    for seed in args.seeds:
        walls[seed] = pretrain(
            recipe=args.recipe, data=args.data, seed=seed, run=args.out / f"seed{seed}", overrides=args.overrides
        )
        print(f"seed {seed}: pretrained in {walls[seed]:.0f} s", flush=True)
    size = {} if args.img_size is None else {"img_size": args.img_size}
    backbones = [{"spec": f"ours:{args.out / f'seed{s}'}", "name": f"ours, seed {s}", **size} for s in args.seeds]
    if not args.no_baselines:
        backbones.append(
            {"spec": f"ours:{args.out / f'seed{args.seeds[0]}'}", "random_init": True, "name": RANDOM, **size}
        )
        backbones.append({"spec": "pixels:28", "name": RAW})
    # the label-efficiency sweep gets its own directory, so it never replaces the main table's records
    eval_dir = args.out / ("eval" if args.fractions == [1.0] else "eval_label_efficiency")
    records = evaluate(
        out=eval_dir,
        data=args.data,
        backbones=backbones,
        features=args.features,
        fractions=args.fractions,
        seeds=[0, 1, 2] if min(args.fractions) < 1 else [0],
    )

    import torch

    lines = [
        "# PneumoniaMNIST: pretraining from scratch vs random init vs raw pixels (linear probe)",
        "",
        "Written by `python benchmarks/pneumoniamnist.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "` (pretraining with `raddino pretrain`, probes with `raddino eval`; see the script's docstring).",
        "",
        "Published references (not measured here): ResNet-18 (28 px) supervised 0.944, ResNet-50 (224 px) "
        "supervised 0.962 (MedMNIST v2); DINO ViT-B/16 ImageNet, linear probe 0.973 (MedMNIST+).",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads; recipe "
        f"`{args.recipe}`" + (f" with `{' '.join(args.overrides)}`" if args.overrides else "") + ".",
        "",
    ]
    for fraction in sorted(args.fractions, reverse=True):
        lines += [
            f"**{fraction:.0%} of the train labels**"
            + (" (mean ± std over 3 label subsets)" if fraction < 1 else " (value [95 % bootstrap CI])"),
            "",
        ]
        lines += main_table(records, seeds=args.seeds, walls=walls, features=args.features, fraction=fraction)
        lines.append("")
    lines += [
        "**Validation AUROC, all labels** (the split a readout or recipe should be chosen on; test is for reporting)",
        "",
        *val_table(records, seeds=args.seeds, features=args.features),
        "",
    ]
    if args.curve:
        lines += [f"**Test AUROC against pretraining time (seed {args.seeds[0]}, every checkpoint)**", ""]
        lines += curve(
            run=args.out / f"seed{args.seeds[0]}", out=args.out / "curve", data=args.data, features=args.features
        )
        lines.append("")
    text = "\n".join(lines)
    target = args.results or args.out / "results.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(text)
    print(f"tables and plots of raddino eval: {eval_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
