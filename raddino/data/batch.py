"""One augmented sample and the crop-major batch the SSL model consumes (see docs/ARCHITECTURE.md).

The loader ships **gray** crops: one channel in [0, 1], with the normalisation (per-channel mean / std) attached.
:meth:`SSLBatch.normalized` turns them into the model's 3-channel input on whatever device the batch is on, so the
replicated channels are never built, collated, sent through worker shared memory, pinned or copied to the GPU
(a third of the bytes; docs/BENCHMARKS.md, "gray crops on the wire").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from raddino.errors import RaddinoError

Stats = tuple[float, float, float]


@dataclass
class SSLSample:
    """Crops and masks of one image.

    Attributes:
        global_crops: (G, 1, Hg, Wg) float32 gray in [0, 1].
        local_crops: (L, 1, Hl, Wl) float32 gray in [0, 1] (L may be 0).
        masks: (G, Ng) bool, True = masked patch of global crop g (Ng = patches of one global crop).
        mean / std: the per-channel normalisation of the model input (see :meth:`SSLBatch.normalized`).
        label: the source's label, or None.
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    mean: Stats
    std: Stats
    label: int | None = None


@dataclass
class SSLBatch:
    """A batch of B images, crop-major: rows ``[c*B:(c+1)*B]`` hold crop ``c`` of every image (as in DINOv2).

    Attributes:
        global_crops: (G*B, C, Hg, Wg) float32.
        local_crops: (L*B, C, Hl, Wl) float32.
        masks: (G*B, Ng) bool, aligned with ``global_crops`` rows; True = masked.
        labels: (B,) long, or None when any sample has no label.
        n_global: G, the number of global crops per image (needed to recover B when there are no labels).
        mean / std: set on a loader's batch: the crops are then gray (C = 1) in [0, 1], and :meth:`normalized`
            gives the model input. None: the crops are the model input already (C = 3, normalised), which is what
            :class:`~raddino.ssl.SSLMetaArch` takes.
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    labels: Tensor | None = None
    n_global: int = 2
    mean: Stats | None = None
    std: Stats | None = None

    def __post_init__(self) -> None:
        rows = self.global_crops.shape[0]
        if rows % self.n_global or self.masks.shape[0] != rows:
            raise RaddinoError(
                f"SSLBatch: {rows} global crop rows and {self.masks.shape[0]} mask rows do not form "
                f"{self.n_global} crops per image"
            )
        channels = 1 if self.mean is not None else 3
        if self.global_crops.shape[1] != channels or self.local_crops.shape[1] != channels:
            raise RaddinoError(
                f"SSLBatch: {'gray' if channels == 1 else 'model-input'} crops need {channels} channel(s), got "
                f"{self.global_crops.shape[1]} and {self.local_crops.shape[1]}"
            )

    @property
    def is_gray(self) -> bool:
        """True for a loader's batch (1-channel crops in [0, 1]), False for model input."""
        return self.mean is not None

    def normalized(self) -> SSLBatch:
        """The model input: each gray crop replicated to 3 channels, channel c = (gray - mean[c]) / std[c].

        Runs where the batch is (after ``to(device)``, on the GPU); a model-input batch is returned as is.
        """
        if self.mean is None or self.std is None:
            return self
        scale = [1.0 / s for s in self.std]
        shift = [-m / s for m, s in zip(self.mean, self.std, strict=True)]

        def expand(gray: Tensor) -> Tensor:
            out = gray.new_empty((gray.shape[0], 3, *gray.shape[2:]))
            for c in range(3):  # Python scalars: no host-to-device copy, nothing to synchronise
                torch.mul(gray[:, 0], scale[c], out=out[:, c]).add_(shift[c])
            return out

        return SSLBatch(
            global_crops=expand(self.global_crops),
            local_crops=expand(self.local_crops),
            masks=self.masks,
            labels=self.labels,
            n_global=self.n_global,
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
            mean=self.mean,
            std=self.std,
        )

    def pin_memory(self) -> SSLBatch:
        """Page-locked copy; ``DataLoader(pin_memory=True)`` calls this on custom batch types."""
        return SSLBatch(
            global_crops=self.global_crops.pin_memory(),
            local_crops=self.local_crops.pin_memory(),
            masks=self.masks.pin_memory(),
            labels=None if self.labels is None else self.labels.pin_memory(),
            n_global=self.n_global,
            mean=self.mean,
            std=self.std,
        )


def _crop_major(per_sample: list[Tensor]) -> Tensor:
    """B tensors (C, ...) -> (C*B, ...) with row c*B + j = crop c of sample j."""
    stacked = torch.stack(per_sample, dim=1)  # (C, B, ...)
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def collate_ssl(samples: Sequence[SSLSample]) -> SSLBatch:
    """Stack samples into a crop-major gray :class:`SSLBatch`; labels become None if any sample lacks one."""
    if not samples:
        raise RaddinoError("cannot collate an empty list of samples")
    labels = [s.label for s in samples]
    return SSLBatch(
        global_crops=_crop_major([s.global_crops for s in samples]),
        local_crops=_crop_major([s.local_crops for s in samples]),
        masks=_crop_major([s.masks for s in samples]),
        labels=None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.long),
        n_global=samples[0].global_crops.shape[0],
        mean=samples[0].mean,
        std=samples[0].std,
    )
