"""Image sources: one small interface in front of every place images come from.

A source is indexable: ``len(source)`` images, ``source.get(i) -> (image (H, W) uint8 | uint16, label | None)``.
Images are single-channel; 16-bit data keeps its depth (the augmentation converts to float). Labels are optional
integers (used by probes, never by pretraining).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from raddino.data.synthetic import FINDINGS, synthetic_cxr
from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses.
_LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@runtime_checkable
class ImageSource(Protocol):
    """Random-access collection of single-channel images with optional integer labels."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[np.ndarray, int | None]:
        """Image ``index`` as ``(H, W)`` uint8 or uint16, and its label (or None)."""
        ...


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8/uint16 RGB -> (H, W) same dtype, ITU-R BT.601 luma, rounded to nearest."""
    gray = image.astype(np.float64) @ _LUMA_601
    return np.clip(np.rint(gray), 0, np.iinfo(image.dtype).max).astype(image.dtype)


def _check_index(index: int, length: int, name: str) -> int:
    if not -length <= index < length:
        raise IndexError(f"{name}: index {index} out of range for {length} images")
    return index % length


class SyntheticSource:
    """``n`` synthetic chest radiographs (see :mod:`raddino.data.synthetic`), image ``i`` = ``synthetic_cxr(i)``.

    Labels: 1 = finding present, 0 = none (``finding``: see :func:`synthetic_cxr`). Images are generated on demand
    (nothing is stored), so any ``n`` is cheap.
    """

    def __init__(self, n: int, seed: int, size: int, finding: str = "focal") -> None:
        if n <= 0:
            raise RaddinoError(f"synthetic source needs n > 0 images, got {n}")
        if size < 16:
            raise RaddinoError(f"synthetic image size must be >= 16 pixels, got {size}")
        if finding not in FINDINGS:
            raise RaddinoError(f"unknown synthetic finding {finding!r}; choose one of {', '.join(FINDINGS)}")
        self.n, self.seed, self.size, self.finding = n, seed, size, finding

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> tuple[np.ndarray, int | None]:
        index = _check_index(index, self.n, "synthetic source")
        return synthetic_cxr(index, seed=self.seed, size=self.size, finding=self.finding)


class NpzSource:
    """Images from a MedMNIST-style ``.npz``: arrays ``{split}_images`` and ``{split}_labels``.

    ``{split}_images`` is ``(N, H, W)`` (gray) or ``(N, H, W, 3)`` (RGB, converted to gray with BT.601 luma), dtype
    uint8 or uint16. ``{split}_labels`` is optional: ``(N,)`` or ``(N, 1)`` gives an integer label per image; a
    multi-column array (multi-label datasets such as ChestMNIST) gives ``None`` labels, because one integer cannot
    carry several findings and silently keeping one column would mislabel the data.

    The arrays are loaded into memory once (MedMNIST files are small); ``mmap`` is not possible inside a zip.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path)
        self.split = split
        if not self.path.is_file():
            raise RaddinoError(f"npz file not found: {self.path}")
        try:
            archive = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise RaddinoError(f"cannot read npz file {self.path}: {err}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise RaddinoError(f"{self.path} is a single .npy array, not an .npz archive with {split}_images")
        with archive:
            keys = sorted(archive.files)
            image_key, label_key = f"{split}_images", f"{split}_labels"
            if image_key not in keys:
                raise RaddinoError(
                    f"{self.path}: no array '{image_key}' for split '{split}' (available keys: {', '.join(keys)})"
                )
            images = archive[image_key]
            labels = archive[label_key] if label_key in keys else None
        self.images = self._as_gray(images)
        self.labels = self._as_int_labels(labels, len(self.images))
        log.info("npz source %s[%s]: %d images of %s", self.path, split, len(self.images), self.images.shape[1:])

    def _as_gray(self, images: np.ndarray) -> np.ndarray:
        if images.dtype not in (np.uint8, np.uint16):
            raise RaddinoError(f"{self.path}: {self.split}_images has dtype {images.dtype}; expected uint8 or uint16")
        if images.ndim == 4 and images.shape[-1] == 3:
            return rgb_to_gray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            return images[..., 0]
        if images.ndim != 3:
            raise RaddinoError(
                f"{self.path}: {self.split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)"
            )
        return images

    def _as_int_labels(self, labels: np.ndarray | None, n: int) -> np.ndarray | None:
        if labels is None:
            return None
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            log.warning(
                "%s: %s_labels has shape %s (multi-label); labels are reported as None",
                self.path,
                self.split,
                labels.shape,
            )
            return None
        if len(labels) != n:
            raise RaddinoError(f"{self.path}: {len(labels)} {self.split}_labels for {n} {self.split}_images")
        return labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> tuple[np.ndarray, int | None]:
        index = _check_index(index, len(self.images), f"npz source {self.path.name}[{self.split}]")
        label = None if self.labels is None else int(self.labels[index])
        return self.images[index], label
