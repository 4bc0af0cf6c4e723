"""Multi-crop augmentation for radiographs (DINOv2's recipe adapted to single-channel, possibly 16-bit images).

Per crop, in DINOv2's order: random resized crop (area scale + log-uniform aspect ratio, torchvision's algorithm),
horizontal flip, brightness/contrast jitter, Gaussian blur, optional solarisation. Crops leave as one gray channel
in [0, 1]; replicating it to 3 channels normalised with ``mean``/``std`` happens on the training device
(:meth:`raddino.data.batch.SSLBatch.normalized`), so the loader moves a third of the bytes. See
``docs/AUGMENTATION.md`` for the choices against DINOv2's defaults.

Precision: every image is converted once to float32 in [0, 1] (uint8 / 255, uint16 / 65535), so 16-bit data keeps
its depth (never reduced to 8 bits) and both dtypes share one code path.

Speed: the default resampling (``interpolation="pyramid"``) shrinks the crop box by 2x box averages and bilinear
OpenCV resizes (``_PyramidResampler``); everything after the resize runs on the small crop (jitter, OpenCV separable
blur, and one write into the output crop). The random draws of a crop are one numpy call.
``"bicubic"`` / ``"bilinear"`` keep PIL's antialiased resampling (the exact torchvision / DINOv2 resize) for
ablations, about 6x slower per crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from raddino.errors import RaddinoError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_RESIZE_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a center crop
BOX_DRAWS = 2 * _RESIZE_ATTEMPTS + 2  # uniforms per crop box: area and aspect of each try, then top and left
# uniforms per crop after its box: flip, jitter (gate, order, brightness, contrast), blur (gate, sigma), solarise
_CROP_DRAWS = 8
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
INTERPOLATIONS = ("pyramid", *_RESAMPLE)
# Remaining shrinks below this are resized bilinearly alone (see _PyramidResampler); chosen where plain bilinear's
# sharpness starts to exceed PIL's antialiased bicubic by more than ~10% on noisy 512 px synthetic radiographs.
_BILINEAR_ALONE = 1.25


def _as_float(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 / uint16 -> (H, W) float32 in [0, 1] (the dtype's full range maps to 1)."""
    if image.ndim != 2:
        raise RaddinoError(f"augmentation expects a single-channel (H, W) image, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise RaddinoError(f"augmentation expects a uint8 or uint16 image, got dtype {image.dtype}")
    # one pass: the integer -> float32 cast is exact, so this equals astype(float32) * scale
    return np.multiply(image, np.float32(1.0 / np.iinfo(image.dtype).max), dtype=np.float32)


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with a numpy generator -> PIL box ``(left, top, right, bottom)``.

    The crop covers ``scale`` of the image area with an aspect ratio log-uniform in [3/4, 4/3]; after 10 failed tries
    it falls back to the largest center crop whose ratio is within bounds. Draws :data:`BOX_DRAWS` uniforms.
    """
    return _box_from_uniforms(height, width, scale, rng.random(BOX_DRAWS).tolist())


def _box_from_uniforms(
    height: int, width: int, scale: tuple[float, float], uniforms: list[float]
) -> tuple[int, int, int, int]:
    """The box of :func:`random_resized_crop_box` from ``BOX_DRAWS`` uniforms in [0, 1): 10 area fractions, 10 log
    aspect ratios, then the top and left offsets of the first try that fits.

    Plain floats: numpy calls on 10-element arrays cost more than the arithmetic, and one draw for all of it is
    cheaper than four (``a + (b - a) * u`` is how numpy's ``uniform`` maps its draw; ``floor(u * n)`` is uniform
    over ``0 .. n - 1`` as ``integers(0, n)``).
    """
    area = height * width
    low, span = scale[0], scale[1] - scale[0]
    for i in range(_RESIZE_ATTEMPTS):
        target = area * (low + span * uniforms[i])
        ratio = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * uniforms[_RESIZE_ATTEMPTS + i])
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))  # half to even, as np.rint
        if 0 < w <= width and 0 < h <= height:
            top = int(uniforms[2 * _RESIZE_ATTEMPTS] * (height - h + 1))
            left = int(uniforms[2 * _RESIZE_ATTEMPTS + 1] * (width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (H, W) float32 image -> new (H, W) float32; kernel radius ceil(3 sigma).

    Borders are mirrored without repeating the edge pixel (numpy's "reflect", scipy's "mirror", OpenCV's
    ``BORDER_REFLECT_101``); images not larger than the radius repeat the edge instead.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    # exp(-x^2 / (2 sigma^2)) at x = -radius..radius, normalised to sum 1 (computed in float64)
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma, cv2.CV_32F)
    values = np.asarray(image, dtype=np.float32)
    border = cv2.BORDER_REFLECT_101 if min(values.shape) > radius else cv2.BORDER_REPLICATE
    return cv2.sepFilter2D(values, cv2.CV_32F, kernel, kernel, borderType=border)


@dataclass(frozen=True)
class Jitter:
    """Brightness / contrast jitter of one crop (torchvision's ``ColorJitter`` definitions, gray images only).

    Brightness multiplies by its factor; contrast blends with the crop's mean gray level; each clips to [0, 1].
    ``None`` skips an operation; ``contrast_first`` gives the order (``ColorJitter`` draws a random one).
    """

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = False

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1] -> (H, W) float32 in [0, 1] (``values`` itself when nothing is applied)."""
        ops = ("contrast", "brightness") if self.contrast_first else ("brightness", "contrast")
        for op in ops:
            if op == "brightness" and self.brightness is not None:
                # values >= 0 and the factor >= 0, so only the upper clip can act
                values = np.multiply(values, np.float32(self.brightness))
                np.minimum(values, np.float32(1.0), out=values)
            elif op == "contrast" and self.contrast is not None:
                factor, mean = self.contrast, cv2.mean(values)[0]  # cv2.mean accumulates in float64
                values = cv2.addWeighted(values, factor, values, 0.0, (1.0 - factor) * mean)
                if factor > 1.0:  # a blend of values and their mean (factor <= 1) stays in [0, 1]
                    np.clip(values, 0.0, 1.0, out=values)
        return values


def solarize(values: np.ndarray, threshold: float) -> np.ndarray:
    """Invert values >= ``threshold`` (values in [0, 1]; torchvision's ``solarize`` on float images)."""
    return np.where(values >= np.float32(threshold), np.float32(1.0) - values, values)


class _PyramidResampler:
    """Crop-and-resize by 2x box reductions and bilinear resizes (OpenCV; the default, ``interpolation="pyramid"``).

    An approximation of PIL's antialiased bicubic resize (measured statistics in docs/AUGMENTATION.md) at a fraction
    of its cost, built from OpenCV's fastest resizes. A crop shrunk by ``s`` is box-averaged over 2x2 blocks
    ``floor(log2 s)`` times; the remaining shrink ``r`` in [1, 2) is then done by a bilinear resize alone when ``r``
    is below ``_BILINEAR_ALONE`` (its aliasing is small there), otherwise by a bilinear upsampling to twice the
    output size followed by one more 2x2 box average, which filters about as wide as the shrink (plain bilinear
    resampling at r near 2 keeps the pixel noise, measured 30% sharper than PIL's filter).
    The reductions run on the crop's own pixels, so the crop is exactly the box (an odd last row / column is
    dropped before a reduction: < 1 pixel of that level); pixels outside the box are not read (crop-then-resize, as
    torchvision). Every step averages with convex weights: the output stays in the input's range.
    """

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __call__(self, box: tuple[int, int, int, int], size: int) -> np.ndarray:
        """``box`` (left, top, right, bottom) of the image -> (size, size) float32 (a new array)."""
        left, top, right, bottom = box
        region = self.values[top:bottom, left:right]
        shrink = min(right - left, bottom - top) / size
        while shrink >= 2.0:
            region = _box_reduce(region)
            shrink /= 2.0
        if shrink < _BILINEAR_ALONE:
            return cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)
        return _box_reduce(cv2.resize(region, (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR))


def _box_reduce(values: np.ndarray) -> np.ndarray:
    """(H, W) float32 -> (H // 2, W // 2): the mean of each 2x2 block (OpenCV's INTER_AREA by exactly 2)."""
    h, w = values.shape[0] // 2, values.shape[1] // 2
    return cv2.resize(values[: 2 * h, : 2 * w], (w, h), interpolation=cv2.INTER_AREA)


class _PilResampler:
    """Crop-and-resize with PIL's antialiased filters; crops shrunk by >= ``reducing_gap`` use a 2x reduced copy.

    This is PIL's ``reducing_gap`` idea (``Image.thumbnail`` uses 2.0) shared across the crops of one image: the
    reduced copy is made once, at most, and resampling a large crop from it is ~4x cheaper. With a gap of 2 the
    output differs from direct bicubic resampling by 0.3-1.2 gray levels (of 255) on average (smooth to noisy
    images). ``None`` disables it.
    """

    def __init__(self, values: np.ndarray, *, resample: int, reducing_gap: float | None) -> None:
        self.image = Image.fromarray(values, mode="F")
        self.resample, self.reducing_gap = resample, reducing_gap
        self._half: Image.Image | None = None

    def __call__(self, box: tuple[int, int, int, int], size: int) -> np.ndarray:
        """``box`` (left, top, right, bottom) of the image -> (size, size) float32 in [0, 1] (a new array)."""
        left, top, right, bottom = box
        if self.reducing_gap is not None and min(right - left, bottom - top) >= self.reducing_gap * size:
            if self._half is None:
                self._half = self.image.reduce(2)
            half_box = (left / 2, top / 2, right / 2, bottom / 2)
            crop = self._half.resize((size, size), self.resample, box=half_box)
        else:
            crop = self.image.resize((size, size), self.resample, box=box)
        return np.clip(np.asarray(crop, dtype=np.float32), 0.0, 1.0)  # bicubic overshoots


class MultiCropAugmentation:
    """DINOv2-style multi-crop for radiographs.

    Args:
        global_size / local_size: side of the square global / local crops in pixels.
        n_global / n_local: crops per image (DINOv2: 2 and 8).
        global_scale / local_scale: area fraction range of the random resized crops.
        mean / std: per-channel normalisation of the 3 replicated gray channels (default: ImageNet, as DINOv2),
            attached to each sample and applied on the training device (:meth:`SSLBatch.normalized`).
        flip_p: horizontal flip probability.
        brightness / contrast: jitter strengths; factors are drawn from [max(0, 1 - s), 1 + s] as in torchvision.
        jitter_p: probability that a crop is jittered at all (DINOv2: 0.8).
        blur_sigma: range of the Gaussian blur sigma in pixels of the output crop (DINOv2: 0.1-2.0).
        global_blur_p: blur probability of global crop 0, 1, ... (the last value repeats). DINOv2's config says
            (1.0, 0.1), but its code applies 1 - p (effectively 0.0, 0.9); see docs/AUGMENTATION.md.
        local_blur_p: blur probability of each local crop (DINOv2: 0.5, unaffected by the 1 - p quirk).
        solarize_p: solarisation probability of global crop 1 (DINOv2: 0.2; default 0 for radiographs).
        solarize_threshold: solarisation threshold as a fraction of the full range (DINOv2: 128/255).
        interpolation: "pyramid" (default): bilinear OpenCV resize from a 2x box-filter pyramid, an approximation
            of antialiased bicubic about 5x cheaper (see ``_PyramidResampler``); "bicubic" (DINOv2's, exact: PIL's
            antialiased filter) or "bilinear" (PIL's antialiased bilinear, torchvision's default).
        reducing_gap: "bicubic" / "bilinear" only: crops shrunk by at least this factor are resampled from a 2x
            box-reduced copy of the image (faster, ~0.3 gray levels from exact); None resamples every crop from the
            full image.

    ``__call__(image (H, W) uint8 | uint16, rng) -> (global (G, 1, Hg, Wg), local (L, 1, Hl, Wl))`` float32 gray
    tensors in [0, 1].
    """

    def __init__(
        self,
        *,
        global_size: int,
        local_size: int,
        n_global: int = 2,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        jitter_p: float = 0.8,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        global_blur_p: tuple[float, ...] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        solarize_p: float = 0.0,
        solarize_threshold: float = 128 / 255,
        interpolation: str = "pyramid",
        reducing_gap: float | None = 2.0,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise RaddinoError(f"interpolation must be one of {list(INTERPOLATIONS)}, got '{interpolation}'")
        if global_size <= 0 or local_size <= 0:
            raise RaddinoError(f"crop sizes must be positive, got global_size={global_size}, local_size={local_size}")
        if n_global < 1 or n_local < 0:
            raise RaddinoError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise RaddinoError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise RaddinoError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        if not global_blur_p:
            raise RaddinoError("global_blur_p needs at least one probability")
        if blur_sigma[0] <= 0 or blur_sigma[1] < blur_sigma[0]:
            raise RaddinoError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma}")
        self.global_size, self.local_size = global_size, local_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip_p, self.jitter_p = flip_p, jitter_p
        self.brightness, self.contrast = brightness, contrast
        self.blur_sigma = tuple(blur_sigma)
        self.global_blur_p, self.local_blur_p = tuple(global_blur_p), local_blur_p
        self.solarize_p, self.solarize_threshold = solarize_p, solarize_threshold
        self.interpolation = interpolation
        if reducing_gap is not None and reducing_gap < 2.0:
            raise RaddinoError(f"reducing_gap must be >= 2 (or None) so crops are never upsampled, got {reducing_gap}")
        self.reducing_gap = reducing_gap

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        values = _as_float(image)
        if self.interpolation == "pyramid":
            resampler: _PyramidResampler | _PilResampler = _PyramidResampler(values)
        else:
            resample = _RESAMPLE[self.interpolation]
            resampler = _PilResampler(values, resample=resample, reducing_gap=self.reducing_gap)
        height, width = values.shape
        globals_ = torch.empty((self.n_global, 1, self.global_size, self.global_size), dtype=torch.float32)
        locals_ = torch.empty((self.n_local, 1, self.local_size, self.local_size), dtype=torch.float32)
        out_g, out_l = globals_.numpy()[:, 0], locals_.numpy()[:, 0]
        for c in range(self.n_global):
            blur_p = self.global_blur_p[min(c, len(self.global_blur_p) - 1)]
            solarize_p = self.solarize_p if c == 1 else 0.0
            self._crop_into(
                out_g[c], resampler, (height, width), self.global_size, self.global_scale, blur_p, solarize_p, rng
            )
        for c in range(self.n_local):
            self._crop_into(
                out_l[c], resampler, (height, width), self.local_size, self.local_scale, self.local_blur_p, 0.0, rng
            )
        return globals_, locals_

    def _jitter_from_uniforms(self, gate: float, order: float, brightness: float, contrast: float) -> Jitter:
        if gate >= self.jitter_p:
            return Jitter()
        low_b, low_c = max(0.0, 1 - self.brightness), max(0.0, 1 - self.contrast)
        return Jitter(
            brightness=low_b + (1 + self.brightness - low_b) * brightness if self.brightness > 0 else None,
            contrast=low_c + (1 + self.contrast - low_c) * contrast if self.contrast > 0 else None,
            contrast_first=order < 0.5,  # torchvision's ColorJitter applies its ops in a random order
        )

    def _crop_into(
        self,
        out: np.ndarray,
        resampler: _PyramidResampler | _PilResampler,
        shape: tuple[int, int],
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        rng: np.random.Generator,
    ) -> None:
        """Write one gray (size, size) crop in [0, 1] into ``out``.

        Draws a fixed number of uniforms from ``rng`` in one call (whatever is applied), in a fixed order: the box,
        then flip, jitter, blur and solarisation.
        """
        uniforms = rng.random(BOX_DRAWS + _CROP_DRAWS).tolist()
        box = _box_from_uniforms(shape[0], shape[1], scale, uniforms)
        flip_u, gate_u, order_u, brightness_u, contrast_u, blur_u, sigma_u, solarize_u = uniforms[BOX_DRAWS:]
        flip = flip_u < self.flip_p
        jitter = self._jitter_from_uniforms(gate_u, order_u, brightness_u, contrast_u)
        low, high = self.blur_sigma
        sigma = low + (high - low) * sigma_u if blur_u < blur_p else None
        solarized = solarize_u < solarize_p

        # Everything after the resize runs on the small crop. Jitter (a mean and point operations), the blur
        # (symmetric kernel, mirrored borders) and solarisation commute with a horizontal flip, so the flip comes
        # last, as the write into ``out``.
        values = jitter.apply(resampler(box, size))
        if sigma is not None:
            values = gaussian_blur(values, sigma)
        if solarized:
            values = solarize(values, self.solarize_threshold)
        np.copyto(out, values[:, ::-1] if flip else values)
