"""The SSL data stream: an endless sequence of augmented samples addressed by a global sample position.

Position ``p`` (0, 1, 2, ...) is a pure function of ``(seed, p)``:

- epoch ``p // len(source)`` has its own permutation of the source, drawn from ``(seed, epoch)``;
  the image is ``permutation[p % len(source)]``;
- the crops and masks are drawn from a generator seeded with ``(seed, p)``.

So a sample does not depend on which DataLoader worker makes it, on how many workers there are, or on what was
drawn before it. Resuming is exact: a run that stopped after ``step`` steps continues at position
``step * global_batch`` (see :func:`build_ssl_loader`), and worker seeding is irrelevant by design — nothing here
reads torch's or Python's global random state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from raddino.data.augment import MultiCropAugmentation
from raddino.data.batch import SSLBatch, SSLSample, collate_ssl
from raddino.data.masking import sample_ibot_mask
from raddino.data.sources import ImageSource
from raddino.errors import RaddinoError

# Separate seed streams, so that epoch e's permutation and position p's augmentation never share a generator state.
_PERMUTATION_STREAM = 0
_SAMPLE_STREAM = 1
_CACHED_EPOCHS = 2  # a batch can straddle an epoch boundary


def sample_generator(seed: int, position: int) -> np.random.Generator:
    """The generator of the crops and masks of global sample ``position`` (shared with the shard stream)."""
    return np.random.default_rng([seed, _SAMPLE_STREAM, position])


def make_ssl_sample(
    image: np.ndarray,
    label: int | None,
    *,
    augmentation: MultiCropAugmentation,
    grid: tuple[int, int],
    mask_prob: float,
    mask_ratio: tuple[float, float],
    rng: np.random.Generator,
) -> SSLSample:
    """Crops, then one iBOT mask per global crop, of one (H, W) uint8 / uint16 image, drawn from ``rng`` in that order.

    Returns an :class:`SSLSample` with gray global crops (G, 1, Hg, Wg), local crops (L, 1, Hl, Wl) and masks
    (G, grid[0] * grid[1]) bool.
    """
    global_crops, local_crops = augmentation(image, rng)
    masks = np.stack(
        [
            sample_ibot_mask(grid, rng=rng, mask_prob=mask_prob, ratio_min=mask_ratio[0], ratio_max=mask_ratio[1])
            for _ in range(global_crops.shape[0])
        ]
    )
    return SSLSample(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=torch.from_numpy(masks),
        mean=augmentation.mean,
        std=augmentation.std,
        label=label,
    )


class SSLDataset(Dataset[SSLSample]):
    """Map-style dataset over global sample positions ``0, 1, 2, ...`` (no end; see the module docstring).

    Args:
        source: the images.
        augmentation: multi-crop augmentation (its ``global_size`` must be a multiple of ``patch_size``).
        patch_size: ViT patch size; the mask grid is ``global_size // patch_size`` squared.
        mask_prob: probability that a global crop is masked at all.
        mask_ratio: (min, max) fraction of masked patches of a masked crop.
        seed: stream seed.

    ``dataset[p]`` -> :class:`SSLSample` with gray global crops (G, 1, Hg, Wg), local crops (L, 1, Hl, Wl),
    masks (G, (Hg/patch)^2) bool and the source label.
    """

    def __init__(
        self,
        *,
        source: ImageSource,
        augmentation: MultiCropAugmentation,
        patch_size: int,
        mask_prob: float,
        mask_ratio: tuple[float, float],
        seed: int,
    ) -> None:
        if len(source) == 0:
            raise RaddinoError("the image source is empty")
        if patch_size <= 0 or augmentation.global_size % patch_size:
            raise RaddinoError(
                f"global crop size {augmentation.global_size} is not a multiple of the patch size {patch_size}"
            )
        self.source = source
        self.augmentation = augmentation
        self.patch_size = patch_size
        self.mask_prob = mask_prob
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.seed = seed
        side = augmentation.global_size // patch_size
        self.grid = (side, side)
        self._permutations: dict[int, np.ndarray] = {}
        # Fail now, not inside a worker, if the grid cannot hold the mask ratio range.
        sample_ibot_mask(
            self.grid,
            rng=np.random.default_rng(0),
            mask_prob=1.0,
            ratio_min=self.mask_ratio[0],
            ratio_max=self.mask_ratio[1],
        )

    def permutation(self, epoch: int) -> np.ndarray:
        """The image order of ``epoch`` (int64, a permutation of ``range(len(source))``); the last two are cached."""
        perm = self._permutations.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            perm = rng.permutation(len(self.source))
            if len(self._permutations) >= _CACHED_EPOCHS:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def image_index(self, position: int) -> int:
        """Source index shown at global ``position``."""
        epoch, offset = divmod(position, len(self.source))
        return int(self.permutation(epoch)[offset])

    def __getitem__(self, position: int) -> SSLSample:
        position = int(position)
        if position < 0:
            raise IndexError(f"sample positions start at 0, got {position}")
        image, label = self.source.get(self.image_index(position))
        return make_ssl_sample(
            image,
            label,
            augmentation=self.augmentation,
            grid=self.grid,
            mask_prob=self.mask_prob,
            mask_ratio=self.mask_ratio,
            rng=sample_generator(self.seed, position),
        )


class PositionSampler(Sampler[int]):
    """Endless sampler of global sample positions ``start + offset + k * stride`` for k = 0, 1, 2, ...

    One process: ``PositionSampler(start)`` yields ``start, start + 1, ...``. Data-parallel rank ``r`` of ``w``:
    ``PositionSampler(start, stride=w, offset=r)``, so the ranks interleave and one step of per-rank batch B
    consumes positions ``start .. start + w*B - 1`` exactly once. ``start`` is the global position (a multiple of
    ``w``), i.e. ``step * global_batch`` when resuming.
    """

    def __init__(self, start: int, stride: int = 1, offset: int = 0) -> None:
        if start < 0 or stride < 1 or not 0 <= offset < stride:
            raise RaddinoError(
                f"invalid sampler: start={start} (>= 0), stride={stride} (>= 1), offset={offset} (in [0, stride))"
            )
        self.start, self.stride, self.offset = start, stride, offset

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.offset
        while True:
            yield position
            position += self.stride


def build_ssl_loader(
    dataset: SSLDataset,
    *,
    batch_size: int,
    num_workers: int,
    start_position: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader[SSLBatch]:
    """Endless DataLoader of :class:`SSLBatch` starting at global ``start_position``.

    ``rank`` / ``world_size`` default to the initialised process group (else 0 / 1); each rank reads the positions
    ``start_position + rank + k * world_size``. ``pin_memory`` defaults to ``torch.cuda.is_available()``. Workers
    are persistent (an endless loader is iterated once; restarting workers per epoch would only cost time). No
    ``worker_init_fn`` or generator is needed: samples are functions of their position, not of worker RNG state.
    """
    if batch_size <= 0:
        raise RaddinoError(f"batch size must be positive, got {batch_size}")
    if num_workers < 0:
        raise RaddinoError(f"num_workers must be >= 0, got {num_workers}")
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    sampler = PositionSampler(start_position, stride=world_size, offset=rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_ssl,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
