"""Quick frozen-feature linear probe on labelled synthetic radiographs (used by ``raddino demo``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raddino.data.sources import ImageSource, SyntheticSource
from raddino.eval.adapters.base import Backbone, Preprocess
from raddino.eval.adapters.ours import OursBackbone
from raddino.eval.linear import linear_probe

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(backbone: Backbone, views: torch.Tensor, *, protocol: str, batch_size: int = 256) -> np.ndarray:
    """Frozen ``protocol`` features (see ``raddino.eval.adapters.base``) of evaluation views ``(N, 3, H, W)`` ->
    ``(N, backbone.feature_dim(protocol))`` float32."""
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = [
        backbone.features(views[start : start + batch_size].to(device), [protocol])[protocol].cpu()
        for start in range(0, len(views), batch_size)
    ]
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

    def verdict(self, name: str) -> str:
        """One sentence: is row ``name`` above every other row with non-overlapping 95 % intervals?"""
        row = next(r for r in self.rows if r.name == name)
        others = [r for r in self.rows if r is not row]
        best = max(others, key=lambda r: r.auroc)
        if all(row.auroc_ci[0] > r.auroc_ci[1] for r in others):
            return (
                f"The {name} is above {' and '.join(r.name for r in others)} with non-overlapping 95 % intervals "
                f"(test AUROC {row.auroc:.3f} vs at most {best.auroc:.3f})."
            )
        if row.auroc > best.auroc:
            touching = [r.name for r in others if row.auroc_ci[0] <= r.auroc_ci[1]]
            return (
                f"The {name} has the highest test AUROC ({row.auroc:.3f}), but its 95 % interval overlaps that of "
                f"{' and '.join(touching)}: no clear gain shown."
            )
        return f"The {name} is not above {best.name} (test AUROC {row.auroc:.3f} vs {best.auroc:.3f}): no gain shown."


def compare_backbones(
    *,
    backbones: dict[str, nn.Module],
    transform: Preprocess,
    image_size: int,
    splits: dict[str, tuple[int, int]],
    include_raw_pixels: bool = True,
    cs: Sequence[float] | None = None,
    finding: str = "focal",
    protocol: str = "cls_mean",
) -> ProbeReport:
    """Linear probes (finding vs none) on synthetic images; ``splits`` maps train/val/test to (count, seed);
    ``backbones``: raddino ViTs by row name; ``transform``: the evaluation view (its size may differ from the
    training crops: position embeddings are interpolated); ``cs``: the logistic-regression C grid (default:
    DINOv2's 45 values); ``finding``: see ``synthetic_cxr``; ``protocol``: the feature readout, e.g. ``cls_mean``
    (CLS ‖ mean patch token) or ``cls_grid4`` (CLS ‖ patch tokens pooled to 4 x 4 cells)."""
    # each synthetic image is generated and transformed once, then shared by every backbone and the pixel baseline
    data = {
        split: views_and_labels(SyntheticSource(n=n, seed=seed, size=image_size, finding=finding), transform)
        for split, (n, seed) in splits.items()
    }
    labels = {split: split_labels for split, (_, split_labels) in data.items()}
    features: dict[str, dict[str, np.ndarray]] = {}
    for name, backbone in backbones.items():
        adapter = OursBackbone(spec=name, model=backbone, preprocess=transform)
        features[name] = {split: embed(adapter, views, protocol=protocol) for split, (views, _) in data.items()}
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
