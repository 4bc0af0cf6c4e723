"""One augmented sample and the crop-major batch the SSL model consumes (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from raddino.errors import RaddinoError


@dataclass
class SSLSample:
    """Crops and masks of one image.

    Attributes:
        global_crops: (G, 3, Hg, Wg) float32, normalised.
        local_crops: (L, 3, Hl, Wl) float32, normalised (L may be 0).
        masks: (G, Ng) bool, True = masked patch of global crop g (Ng = patches of one global crop).
        label: the source's label, or None.
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    label: int | None = None


@dataclass
class SSLBatch:
    """A batch of B images, crop-major: rows ``[c*B:(c+1)*B]`` hold crop ``c`` of every image (as in DINOv2).

    Attributes:
        global_crops: (G*B, 3, Hg, Wg) float32.
        local_crops: (L*B, 3, Hl, Wl) float32.
        masks: (G*B, Ng) bool, aligned with ``global_crops`` rows; True = masked.
        labels: (B,) long, or None when any sample has no label.
        n_global: G, the number of global crops per image (needed to recover B when there are no labels).
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    labels: Tensor | None = None
    n_global: int = 2

    def __post_init__(self) -> None:
        rows = self.global_crops.shape[0]
        if rows % self.n_global or self.masks.shape[0] != rows:
            raise RaddinoError(
                f"SSLBatch: {rows} global crop rows and {self.masks.shape[0]} mask rows do not form "
                f"{self.n_global} crops per image"
            )

    @property
    def batch_size(self) -> int:
        """B, the number of images."""
        return self.global_crops.shape[0] // self.n_global

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SSLBatch:
        """Copy to ``device`` (``non_blocking`` overlaps the copy with compute when the batch is pinned)."""
        return SSLBatch(
            global_crops=self.global_crops.to(device, non_blocking=non_blocking),
            local_crops=self.local_crops.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            labels=None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
            n_global=self.n_global,
        )

    def pin_memory(self) -> SSLBatch:
        """Page-locked copy; ``DataLoader(pin_memory=True)`` calls this on custom batch types."""
        return SSLBatch(
            global_crops=self.global_crops.pin_memory(),
            local_crops=self.local_crops.pin_memory(),
            masks=self.masks.pin_memory(),
            labels=None if self.labels is None else self.labels.pin_memory(),
            n_global=self.n_global,
        )


def _crop_major(per_sample: list[Tensor]) -> Tensor:
    """B tensors (C, ...) -> (C*B, ...) with row c*B + j = crop c of sample j."""
    stacked = torch.stack(per_sample, dim=1)  # (C, B, ...)
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def collate_ssl(samples: Sequence[SSLSample]) -> SSLBatch:
    """Stack samples into a crop-major :class:`SSLBatch`; labels become None if any sample lacks one."""
    if not samples:
        raise RaddinoError("cannot collate an empty list of samples")
    labels = [s.label for s in samples]
    return SSLBatch(
        global_crops=_crop_major([s.global_crops for s in samples]),
        local_crops=_crop_major([s.local_crops for s in samples]),
        masks=_crop_major([s.masks for s in samples]),
        labels=None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.long),
        n_global=samples[0].global_crops.shape[0],
    )
