"""Speed benchmark: tiny-ViT feature extraction + logistic-regression C sweep on PneumoniaMNIST.

Times the two stages of a linear-probe evaluation without the feature cache: extracting ``cls_mean`` features of
all 5,856 PneumoniaMNIST images (train + val + test) with a randomly initialised ViT-Ti at 64 px (16 patches of
16 px: the token count of the tiny recipe's ViT-Ti/14 at 56 px), then the 45-point C sweep. Run with
``raddino bench probe [--dataset PATH.npz]`` or ``python -m raddino.eval.bench [PATH.npz]``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raddino.eval.adapters.registry import build_backbone_adapter
from raddino.eval.datasets.base import SPLITS
from raddino.eval.datasets.medmnist import MedmnistSpec
from raddino.eval.datasets.registry import load_dataset
from raddino.eval.features import compute_features
from raddino.eval.linear import linear_probe

DEFAULT_NPZ = Path("../shared/data/pneumoniamnist.npz")


@dataclass(frozen=True)
class BenchResult:
    n_images: int
    extract_seconds: float
    sweep_seconds: float
    test_auroc: float
    threads: int

    @property
    def total_seconds(self) -> float:
        return self.extract_seconds + self.sweep_seconds

    def describe(self) -> str:
        return (
            f"{self.n_images} images, {self.threads} threads: feature extraction {self.extract_seconds:.1f} s "
            f"({self.n_images / self.extract_seconds:.0f} img/s) + C sweep {self.sweep_seconds:.1f} s = "
            f"{self.total_seconds:.1f} s (test AUROC {self.test_auroc:.3f}, random-init features)"
        )


def run_bench(
    *,
    npz: Path = DEFAULT_NPZ,
    spec: str = "timm:vit_tiny_patch16_224",
    img_size: int = 64,
    protocol: str = "cls_mean",
    batch_size: int = 256,
    num_workers: int = 0,
) -> BenchResult:
    dataset = load_dataset(MedmnistSpec(name="pneumoniamnist", path=str(npz)))
    backbone = build_backbone_adapter(spec, random_init=True, img_size=img_size)
    started = time.perf_counter()
    feats = {
        split: compute_features(
            backbone,
            dataset.splits[split].images,
            protocols=[protocol],
            batch_size=batch_size,
            num_workers=num_workers,
            desc=f"bench {split}",
        )[protocol]
        for split in SPLITS
    }
    extract = time.perf_counter() - started
    started = time.perf_counter()
    labels = {s: dataset.splits[s].labels for s in SPLITS}
    result = linear_probe(
        train=(feats["train"], labels["train"]), val=(feats["val"], labels["val"]), test=(feats["test"], labels["test"])
    )
    sweep = time.perf_counter() - started
    return BenchResult(
        n_images=sum(len(f) for f in feats.values()),
        extract_seconds=extract,
        sweep_seconds=sweep,
        test_auroc=result.test_metrics["auroc"],
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(run_bench(npz=Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_NPZ).describe())
