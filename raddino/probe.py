"""Quick frozen-feature linear probe on labelled synthetic radiographs (used by ``raddino demo``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raddino.data.sources import ImageSource, SyntheticSource
from raddino.eval.adapters.base import Preprocess
from raddino.eval.linear import linear_probe

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(backbone: nn.Module, views: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """Frozen features CLS ‖ mean(patch) of evaluation views ``(N, 3, H, W)`` -> ``(N, 2D)`` float32."""
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, len(views), batch_size):
        out = backbone.forward_features(views[start : start + batch_size].to(device))
        feats.append(torch.cat([out.cls, out.patch.mean(1)], dim=1).float().cpu())
    return torch.cat(feats).numpy()


def views_and_labels(source: ImageSource, transform: Preprocess) -> tuple[torch.Tensor, np.ndarray]:
    """Every image of ``source`` once: its evaluation view ``(N, 3, H, W)`` and its label ``(N,)``."""
    views, labels = [], []
    for i in range(len(source)):
        image, label = source.get(i)
        views.append(transform(image))
        labels.append(label)
    return torch.stack(views), np.array(labels)


@dataclass(frozen=True)
class ProbeRow:
    name: str
    auroc: float
    auroc_ci: tuple[float, float]  # 95 % bootstrap interval on the test split
    accuracy: float
    best_c: float


@dataclass(frozen=True)
class ProbeReport:
    rows: list[ProbeRow]

    def table(self) -> str:
        lines = ["| features | test AUROC [95 % CI] | test accuracy | C |", "|---|---|---|---|"]
        lines += [
            f"| {r.name} | {r.auroc:.3f} [{r.auroc_ci[0]:.3f}, {r.auroc_ci[1]:.3f}] | {r.accuracy:.3f} | {r.best_c:g} |"
            for r in self.rows
        ]
        return "\n".join(lines)

    def auroc(self, name: str) -> float:
        return next(r.auroc for r in self.rows if r.name == name)


def compare_backbones(
    *,
    backbones: dict[str, nn.Module],
    transform: Preprocess,
    image_size: int,
    splits: dict[str, tuple[int, int]],
    include_raw_pixels: bool = True,
    cs: Sequence[float] | None = None,
    finding: str = "focal",
) -> ProbeReport:
    """Linear probes (finding vs none) on synthetic images; ``splits`` maps train/val/test to (count, seed);
    ``cs``: the logistic-regression C grid (default: DINOv2's 45 values); ``finding``: see ``synthetic_cxr``."""
    # each synthetic image is generated and transformed once, then shared by every backbone and the pixel baseline
    data = {
        split: views_and_labels(SyntheticSource(n=n, seed=seed, size=image_size, finding=finding), transform)
        for split, (n, seed) in splits.items()
    }
    labels = {split: split_labels for split, (_, split_labels) in data.items()}
    features: dict[str, dict[str, np.ndarray]] = {}
    for name, backbone in backbones.items():
        features[name] = {split: embed(backbone, views) for split, (views, _) in data.items()}
    if include_raw_pixels:  # the pixels the backbones see: one channel of the evaluation view
        features["raw pixels"] = {
            split: views[:, 0].reshape(len(views), -1).numpy() for split, (views, _) in data.items()
        }
    rows = []
    for name, feats in features.items():
        result = linear_probe(
            train=(feats["train"], labels["train"]),
            val=(feats["val"], labels["val"]),
            test=(feats["test"], labels["test"]),
            Cs=cs,
        )
        rows.append(
            ProbeRow(
                name=name,
                auroc=result.test_metrics["auroc"],
                auroc_ci=tuple(result.test_ci["auroc"]),
                accuracy=result.test_metrics["accuracy"],
                best_c=result.best_C,
            )
        )
        log.info("probe %s: %s", name, rows[-1])
    return ProbeReport(rows=rows)
