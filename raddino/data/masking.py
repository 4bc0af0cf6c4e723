"""Block-wise iBOT masks (BEiT's masking generator, as used by DINOv2), drawn from an explicit numpy generator.

A mask is a boolean patch grid, True = masked (the student sees the mask token there; the iBOT loss is computed
there). Blocks are rectangles of random area and aspect ratio added until the target count is reached.
"""

from __future__ import annotations

import math

import numpy as np

from raddino.errors import RaddinoError

_BLOCK_ATTEMPTS = 10  # tries per block before giving up on adding one (BEiT / DINOv2)


def _add_block(
    mask: np.ndarray, max_new: int, min_patches: int, log_aspect: tuple[float, float], rng: np.random.Generator
) -> int:
    """Mask one random rectangle adding 1..``max_new`` new patches; returns how many were added (0 = gave up)."""
    height, width = mask.shape
    low = min(min_patches, max_new)  # small targets still get (small) blocks
    for _ in range(_BLOCK_ATTEMPTS):
        area = rng.uniform(low, max_new)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h < height and 0 < w < width):  # strict, as in BEiT: a block never spans the whole grid
            continue
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        window = mask[top : top + h, left : left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_new:
            window[...] = True
            return new
    return 0


def block_mask(
    grid: tuple[int, int],
    ratio: float,
    rng: np.random.Generator,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """Block-wise mask of ``round(ratio * H * W)`` patches on a ``grid = (H, W)`` patch grid -> (H, W) bool.

    Rectangles (area >= ``min_patches`` when the remaining budget allows, aspect ratio log-uniform in ``aspect``)
    are added until the target is reached; a block never overshoots it. When ten tries in a row fail to place a
    block (crowded small grids) the remainder is filled with random single patches, so the count is always exact.
    """
    height, width = grid
    if height <= 0 or width <= 0:
        raise RaddinoError(f"mask grid must be positive, got {grid}")
    if not 0.0 <= ratio <= 1.0:
        raise RaddinoError(f"mask ratio must be in [0, 1], got {ratio}")
    if not 0 < aspect[0] <= aspect[1]:
        raise RaddinoError(f"mask aspect range must satisfy 0 < min <= max, got {aspect}")
    target = int(round(ratio * height * width))
    return _mask_with_count(grid, target, rng, min_patches=min_patches, aspect=aspect)


def _mask_with_count(
    grid: tuple[int, int], target: int, rng: np.random.Generator, *, min_patches: int, aspect: tuple[float, float]
) -> np.ndarray:
    mask = np.zeros(grid, dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < target:
        added = _add_block(mask, target - count, min_patches, log_aspect, rng)
        if added == 0:
            break
        count += added
    if count < target:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=target - count, replace=False)] = True
    return mask


def sample_ibot_mask(
    grid: tuple[int, int],
    *,
    rng: np.random.Generator,
    mask_prob: float = 0.5,
    ratio_min: float = 0.1,
    ratio_max: float = 0.5,
    min_patches: int = 4,
) -> np.ndarray:
    """iBOT mask of one global crop -> (H * W,) bool, row-major over the patch grid.

    With probability ``mask_prob`` the crop is masked, with ``ratio ~ U(ratio_min, ratio_max)`` of its N patches
    (rounded, then clamped to the integers in [ratio_min * N, ratio_max * N]); otherwise nothing is masked.
    DINOv2 instead masks exactly ``int(B * mask_prob)`` crops of a batch with ratios stratified over the range;
    drawing per crop keeps every sample reproducible on its own (see ``raddino.data.dataset``) and has the same
    expectation.
    """
    height, width = grid
    n = height * width
    if not 0.0 <= mask_prob <= 1.0:
        raise RaddinoError(f"mask probability must be in [0, 1], got {mask_prob}")
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise RaddinoError(f"mask ratios must satisfy 0 <= min <= max <= 1, got ({ratio_min}, {ratio_max})")
    low, high = math.ceil(ratio_min * n - 1e-9), math.floor(ratio_max * n + 1e-9)
    if low > high:
        raise RaddinoError(
            f"a {height}x{width} patch grid has no whole patch count in [{ratio_min}, {ratio_max}] x {n}; "
            "use larger global crops or a wider mask ratio range"
        )
    if rng.random() >= mask_prob:
        return np.zeros(n, dtype=bool)
    target = min(max(int(round(rng.uniform(ratio_min, ratio_max) * n)), low), high)
    return _mask_with_count(grid, target, rng, min_patches=min_patches, aspect=(0.3, 1 / 0.3)).reshape(n)
