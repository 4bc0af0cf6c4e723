"""DINOv2's per-image data pipeline (torchvision transforms on PIL images), for the side-by-side loader benchmark.

A reimplementation from the description of ``dinov2/data/augmentations.py`` (``DataAugmentationDINO``) and of the
masking in its collate function, so that ``raddino bench loader`` can time both pipelines on the same encoded
images in one process. Not used for training: its crops draw from torch's global random state (torchvision's
transforms do, as in DINOv2), so its samples are not reproducible per position; the masks draw from ``seed``.

Per image: PIL decode and ``convert("RGB")`` (DINOv2's image decoder; 16-bit PNGs are clipped to 8 bits there);
two global crops and ``n_local`` local crops, each ``RandomResizedCrop`` (bicubic) + ``RandomHorizontalFlip``, then
``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p = 0.8 and ``RandomGrayscale(0.2)``, ``GaussianBlur(9, (0.1, 2.0))``
applied with probability 1 - p for DINOv2's configured p = 1.0 / 0.1 / 0.5 (its ``RandomApply`` quirk, see
docs/AUGMENTATION.md), ``RandomSolarize(128, 0.2)`` on the second global crop, ``ToTensor`` + ``Normalize``; then
``int(2 * mask_prob)`` block masks with ratios stratified over the range, drawn with raddino's BEiT block generator
(:func:`raddino.data.masking.block_mask`, the algorithm of DINOv2's ``MaskingGenerator``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

from raddino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from raddino.data.masking import block_mask


def _blur(p: float) -> transforms.RandomApply:
    # DINOv2 passes 1 - p to RandomApply, which applies the blur with that probability
    return transforms.RandomApply([transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1.0 - p)


class DINOv2Pipeline:
    """Decode + DINOv2 multi-crop + iBOT masks of one encoded image.

    Args:
        global_size / local_size: crop sides (DINOv2: 224 / 96).
        n_local: local crops per image (DINOv2: 8); there are always two global crops.
        global_scale / local_scale: area fraction ranges (DINOv2: (0.32, 1.0) / (0.05, 0.32)).
        grid: patch grid of a global crop for the masks.
        mask_prob / mask_ratio: fraction of masked global crops and the (min, max) masked fraction.
        seed: seed of the mask generator.

    ``__call__(data: bytes) -> (global (2, 3, Hg, Wg), local (n_local, 3, Hl, Wl), masks (2, grid cells) bool)``.
    """

    def __init__(
        self,
        *,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        grid: tuple[int, int],
        mask_prob: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        seed: int = 0,
    ) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip = transforms.RandomHorizontalFlip(p=0.5)
        self.geometric_global = transforms.Compose(
            [transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic), flip]
        )
        self.geometric_local = transforms.Compose(
            [transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic), flip]
        )
        colour = transforms.Compose(
            [
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global1 = transforms.Compose([colour, _blur(1.0), normalize])
        self.global2 = transforms.Compose(
            [colour, _blur(0.1), transforms.RandomSolarize(threshold=128, p=0.2), normalize]
        )
        self.local = transforms.Compose([colour, _blur(0.5), normalize])
        self.n_local = n_local
        self.grid = grid
        self.mask_prob, self.mask_ratio = mask_prob, mask_ratio
        self._mask_rng = np.random.default_rng(seed)

    def __call__(self, data: bytes) -> tuple[Tensor, Tensor, Tensor]:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        global_crops = torch.stack([self.global1(self.geometric_global(rgb)), self.global2(self.geometric_global(rgb))])
        local_crops = torch.stack([self.local(self.geometric_local(rgb)) for _ in range(self.n_local)])
        return global_crops, local_crops, self._masks()

    def _masks(self) -> Tensor:
        """(2, H * W) bool: ``int(2 * mask_prob)`` masked crops, ratios stratified over ``mask_ratio``, shuffled."""
        n_masked = int(2 * self.mask_prob)
        bounds = np.linspace(self.mask_ratio[0], self.mask_ratio[1], n_masked + 1)
        masks = [
            block_mask(self.grid, self._mask_rng.uniform(bounds[i], bounds[i + 1]), self._mask_rng).reshape(-1)
            for i in range(n_masked)
        ]
        masks += [np.zeros(self.grid[0] * self.grid[1], dtype=bool)] * (2 - n_masked)
        return torch.from_numpy(np.stack(masks)[self._mask_rng.permutation(2)])
