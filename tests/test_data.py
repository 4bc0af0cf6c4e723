"""Data side of the SSL core: synthetic radiographs, sources, multi-crop, iBOT masks, batches, the sample stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import raddino  # noqa: F401  (torchvision shim before torchvision.transforms is imported below)
from raddino.data.augment import (
    Jitter,
    MultiCropAugmentation,
    gaussian_blur,
    random_resized_crop_box,
    solarize,
)
from raddino.data.batch import SSLBatch, SSLSample, collate_ssl
from raddino.data.dataset import PositionSampler, SSLDataset, build_ssl_loader
from raddino.data.masking import block_mask, sample_ibot_mask
from raddino.data.sources import NpzSource, SyntheticSource, rgb_to_gray
from raddino.data.synthetic import synthetic_cxr
from raddino.errors import RaddinoError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _no_jitter(**kwargs) -> MultiCropAugmentation:
    """Geometry only: no flip, jitter or blur (so outputs can be predicted exactly)."""
    defaults = dict(
        global_size=32,
        local_size=16,
        n_global=2,
        n_local=3,
        flip_p=0.0,
        jitter_p=0.0,
        global_blur_p=(0.0,),
        local_blur_p=0.0,
    )
    return MultiCropAugmentation(**{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------- synthetic images


def test_synthetic_is_deterministic_per_index_and_seed():
    a, la = synthetic_cxr(7, seed=3, size=48)
    synthetic_cxr(8, seed=3, size=48)  # generating other images in between changes nothing
    b, lb = synthetic_cxr(7, seed=3, size=48)
    assert a.dtype == np.uint8 and a.shape == (48, 48)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, synthetic_cxr(8, seed=3, size=48)[0])
    assert not np.array_equal(a, synthetic_cxr(7, seed=4, size=48)[0])


def test_synthetic_labels_are_balanced():
    labels = np.array([synthetic_cxr(i, seed=11, size=16)[1] for i in range(600)])
    assert set(np.unique(labels)) == {0, 1}
    assert 0.42 < labels.mean() < 0.58


def test_synthetic_anatomy_lungs_darker_than_mediastinum():
    # Row at mid-lung height: the lung fields (x ~ +-0.45) are darker than the mediastinum (x ~ 0).
    size = 64
    diffs = []
    for i in range(20):
        image = synthetic_cxr(i, seed=0, size=size, lesion=False)[0].astype(np.float64)
        row = image[int(size * 0.4) - 2 : int(size * 0.4) + 2].mean(0)
        lungs = (row[int(size * 0.27)] + row[int(size * 0.73)]) / 2
        diffs.append(row[size // 2 - 1 : size // 2 + 1].mean() - lungs)
    assert np.median(diffs) > 25


def test_synthetic_lesion_is_a_local_change_of_the_same_patient():
    for i in range(6):
        without, label0 = synthetic_cxr(i, seed=2, size=64, lesion=False)
        with_lesion, label1 = synthetic_cxr(i, seed=2, size=64, lesion=True)
        assert (label0, label1) == (0, 1)
        diff = with_lesion.astype(np.int64) - without.astype(np.int64)
        changed = np.abs(diff) > 3
        assert diff.max() > 10  # visible
        assert 0.001 < changed.mean() < 0.2  # local
        assert diff[changed].mean() > 0  # an opacity: brighter
    image, label = synthetic_cxr(5, seed=2, size=64)
    assert np.array_equal(image, synthetic_cxr(5, seed=2, size=64, lesion=bool(label))[0])


@pytest.mark.parametrize("finding", ["reticular", "miliary"])
def test_synthetic_diffuse_findings_spread_over_the_lungs_without_brightening_them(finding):
    for i in range(4):
        without, label0 = synthetic_cxr(i, seed=2, size=64, lesion=False, finding=finding)
        with_finding, label1 = synthetic_cxr(i, seed=2, size=64, lesion=True, finding=finding)
        assert (label0, label1) == (0, 1)
        # the anatomy is the finding-independent patient of the focal stream
        assert np.array_equal(without, synthetic_cxr(i, seed=2, size=64, lesion=False)[0])
        diff = with_finding.astype(np.int64) - without.astype(np.int64)
        changed = np.abs(diff) > 3
        assert 0.12 < changed.mean() < 0.35  # diffuse: far more of the image than a focal lesion (< 0.05 here)
        assert diff.max() > 20 and diff.min() < -20  # brighter and darker than the normal lung
        assert abs(diff[changed].mean()) < 0.7 * np.abs(diff[changed]).mean()  # no one-signed brightness shift


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(RaddinoError, match="size"):
        synthetic_cxr(0, seed=0, size=8)
    with pytest.raises(RaddinoError, match="index"):
        synthetic_cxr(-1, seed=0, size=32)
    with pytest.raises(RaddinoError, match="finding 'fibrosis'; choose one of focal, reticular, miliary"):
        synthetic_cxr(0, seed=0, size=32, finding="fibrosis")


# --------------------------------------------------------------------------------------------------- sources


def test_synthetic_source_matches_generator():
    source = SyntheticSource(n=5, seed=9, size=32)
    assert len(source) == 5
    image, label = source.get(3)
    ref, ref_label = synthetic_cxr(3, seed=9, size=32)
    assert np.array_equal(image, ref) and label == ref_label
    with pytest.raises(IndexError):
        source.get(5)
    miliary = SyntheticSource(n=5, seed=9, size=32, finding="miliary")
    positive = next(i for i in range(5) if source.get(i)[1] == 1)  # the label does not depend on the finding
    assert np.array_equal(miliary.get(positive)[0], synthetic_cxr(positive, seed=9, size=32, finding="miliary")[0])
    assert not np.array_equal(miliary.get(positive)[0], source.get(positive)[0])
    with pytest.raises(RaddinoError, match="unknown synthetic finding"):
        SyntheticSource(n=5, seed=9, size=32, finding="x")


def test_npz_source_gray_rgb_uint16_and_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(4, 10, 12), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, size=(2, 6, 6), dtype=np.uint16)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        train_images=gray,
        train_labels=np.array([[0], [1], [1], [0]]),
        val_images=rgb,
        val_labels=np.array([2, 0, 1]),
        test_images=deep,
        test_labels=np.array([[1, 0, 1], [0, 0, 1]]),
    )
    train = NpzSource(path, split="train")
    assert len(train) == 4
    image, label = train.get(1)
    assert np.array_equal(image, gray[1]) and label == 1 and isinstance(label, int)

    val = NpzSource(path, split="val")
    image, label = val.get(2)
    r, g, b = (rgb[2, ..., k].astype(np.float64) for k in range(3))
    assert np.array_equal(image, np.rint(0.299 * r + 0.587 * g + 0.114 * b).astype(np.uint8))
    pil_gray = np.asarray(Image.fromarray(rgb[2]).convert("L")).astype(np.int64)  # PIL: same weights, int rounding
    assert np.abs(image.astype(np.int64) - pil_gray).max() <= 1
    assert label == 1

    test = NpzSource(path, split="test")  # multi-label rows -> no single integer label
    image, label = test.get(0)
    assert image.dtype == np.uint16 and np.array_equal(image, deep[0]) and label is None


def test_npz_source_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(RaddinoError, match="not found"):
        NpzSource(tmp_path / "missing.npz")
    path = tmp_path / "data.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(RaddinoError, match=r"val_images.*available keys: train_images"):
        NpzSource(path, split="val")
    assert NpzSource(path).get(0)[1] is None  # labels are optional
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(RaddinoError, match="junk.npz"):
        NpzSource(tmp_path / "junk.npz")
    np.savez(path, train_images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(RaddinoError, match="dtype float32"):
        NpzSource(path)


def test_npz_source_on_pneumoniamnist(pneumoniamnist: Path):
    source = NpzSource(pneumoniamnist, split="train")
    image, label = source.get(0)
    assert image.dtype == np.uint8 and image.shape == (28, 28)
    labels = {source.get(i)[1] for i in range(0, len(source), 97)}
    assert labels == {0, 1}
    assert len(NpzSource(pneumoniamnist, split="test")) > 0


def test_rgb_to_gray_uint16_keeps_depth():
    rgb = np.array([[[65535, 65535, 65535], [1000, 2000, 3000]]], dtype=np.uint16)
    gray = rgb_to_gray(rgb)
    assert gray.dtype == np.uint16
    assert gray.tolist() == [[65535, round(0.299 * 1000 + 0.587 * 2000 + 0.114 * 3000)]]


# ------------------------------------------------------------------------------------------------ augmentation


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(120, 200, (0.1, 0.5), rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 120
        assert 0.1 * 0.9 <= w * h / (120 * 200) <= 0.5 * 1.1
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # impossible request (whole area of a very wide image within the ratio bounds) -> centre-crop fallback
    left, top, right, bottom = random_resized_crop_box(10, 1000, (1.0, 1.0), rng)
    assert (top, bottom) == (0, 10) and right - left == round(10 * 4 / 3) and left == (1000 - (right - left)) // 2


def test_multicrop_shapes_dtypes_and_no_nan():
    aug = MultiCropAugmentation(
        global_size=40, local_size=20, n_global=2, n_local=5, brightness=0.9, contrast=0.9, solarize_p=1.0
    )
    image = synthetic_cxr(0, seed=0, size=96)[0]
    g, loc = aug(image, np.random.default_rng(0))
    assert g.shape == (2, 1, 40, 40) and loc.shape == (5, 1, 20, 20)  # gray: one channel leaves the loader
    assert g.dtype == torch.float32 and loc.dtype == torch.float32
    assert torch.isfinite(g).all() and torch.isfinite(loc).all()
    assert g.min() >= 0 and g.max() <= 1 and loc.min() >= 0 and loc.max() <= 1
    for constant in (0, 255):  # flat images: the contrast mean and blur stay finite
        g, loc = aug(np.full((64, 64), constant, np.uint8), np.random.default_rng(1))
        assert torch.isfinite(g).all() and torch.isfinite(loc).all()


def test_multicrop_normalisation_is_exact_on_a_flat_image():
    # gray crops carry the normalisation; SSLBatch.normalized() replicates them to 3 channels (gray - mean) / std
    aug = _no_jitter()
    for dtype, value, full in ((np.uint8, 77, 255), (np.uint16, 40000, 65535)):
        g, loc = aug(np.full((50, 60), value, dtype), np.random.default_rng(0))
        torch.testing.assert_close(g, torch.full_like(g, value / full), atol=1e-6, rtol=0)
        model_input = SSLBatch(
            global_crops=g, local_crops=loc, masks=torch.zeros(2, 1, dtype=torch.bool), mean=aug.mean, std=aug.std
        ).normalized()
        assert model_input.global_crops.shape == (2, 3, *g.shape[2:]) and model_input.mean is None
        for ch in range(3):
            expected = (value / full - MEAN[ch]) / STD[ch]
            for crops in (model_input.global_crops, model_input.local_crops):
                torch.testing.assert_close(crops[:, ch], torch.full_like(crops[:, ch], expected), atol=1e-5, rtol=0)


def test_multicrop_determinism_and_rng_dependence():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=4)
    image = synthetic_cxr(1, seed=0, size=80)[0]
    a = aug(image, np.random.default_rng(5))
    b = aug(image, np.random.default_rng(5))
    c = aug(image, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_multicrop_flip_mirrors_the_same_crop():
    image = synthetic_cxr(2, seed=0, size=80)[0]
    plain = _no_jitter(flip_p=0.0)(image, np.random.default_rng(3))
    flipped = _no_jitter(flip_p=1.0)(image, np.random.default_rng(3))
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1].flip(-1))


def test_multicrop_crop_matches_torchvision_resized_crop():
    # One global crop, no jitter, vs torchvision's crop-then-resize of the box drawn from the same generator.
    # interpolation="bicubic" is PIL's filter: its box resize also reads pixels just outside the box for its filter
    # support, so the outermost output pixels may differ slightly; the interior must agree. The reduced-copy
    # shortcut (reducing_gap) stays within ~1 gray level on average (a few pixels up to 12) on this small, noisy
    # image. The default "pyramid" resampling approximates the filter: per pixel it differs on noise, not on average.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    image = synthetic_cxr(3, seed=0, size=90)[0]
    cases = (
        ("bicubic", None, 1.5 / 255, 0.6 / 255),
        ("bicubic", 2.0, 14 / 255, 2.0 / 255),
        ("pyramid", None, None, 5 / 255),
    )
    for interpolation, reducing_gap, atol, mean_atol in cases:
        aug = _no_jitter(
            n_global=1,
            n_local=0,
            global_size=32,
            global_scale=(0.32, 1.0),
            interpolation=interpolation,
            reducing_gap=reducing_gap,
        )
        for seed in range(6):
            g, _ = aug(image, np.random.default_rng(seed))
            left, top, right, bottom = random_resized_crop_box(90, 90, (0.32, 1.0), np.random.default_rng(seed))
            ref = tvf.resized_crop(
                Image.fromarray(image), top, left, bottom - top, right - left, [32, 32], InterpolationMode.BICUBIC
            )
            ref = torch.from_numpy(np.asarray(ref, np.float32) / 255)[3:-3, 3:-3]
            ours = g[0, 0][3:-3, 3:-3]
            if atol is not None:
                torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
            assert (ours - ref).abs().mean() < mean_atol
            assert abs(ours.mean() - ref.mean()) < 1.5 / 255


def _former_random_resized_crop_box(height, width, scale, rng):
    """``random_resized_crop_box`` as it was before the loader speed-up (four numpy draws); None for the fallback."""
    area = height * width
    targets = area * rng.uniform(scale[0], scale[1], size=10)
    ratios = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), size=10))
    widths = np.rint(np.sqrt(targets * ratios)).astype(np.int64)
    heights = np.rint(np.sqrt(targets / ratios)).astype(np.int64)
    ok = np.flatnonzero((widths > 0) & (widths <= width) & (heights > 0) & (heights <= height))
    if not len(ok):
        return None
    w, h = int(widths[ok[0]]), int(heights[ok[0]])
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return left, top, left + w, top + h


def _box_features(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """(N, 4) boxes -> area fraction, log aspect ratio, centre x, centre y."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return w * h / (height * width), np.log(w / h), (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2


def test_random_resized_crop_boxes_keep_their_distribution():
    # The box sampler draws one vector of uniforms instead of four numpy calls: other boxes per seed, the same law.
    # Two-sample Kolmogorov-Smirnov tests against the former sampler (4000 boxes each, fixed seeds) on the area
    # fraction, the log aspect ratio and the box centre; a wrong range or a biased offset fails them (p < 1e-3).
    from scipy.stats import ks_2samp

    for (height, width), scale in (((512, 512), (0.32, 1.0)), ((512, 512), (0.05, 0.32)), ((300, 200), (0.5, 1.0))):
        ours_rng, former_rng = np.random.default_rng(1), np.random.default_rng(2)
        ours = np.array([random_resized_crop_box(height, width, scale, ours_rng) for _ in range(4000)], float)
        former = [_former_random_resized_crop_box(height, width, scale, former_rng) for _ in range(4000)]
        former = np.array([box for box in former if box is not None], float)
        assert len(former) > 3900
        for boxes in (ours, former):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()

        names = ("area", "log aspect", "centre x", "centre y")
        for name, a, b in zip(
            names, _box_features(ours, height, width), _box_features(former, height, width), strict=True
        ):
            assert ks_2samp(a, b).pvalue > 1e-3, (scale, name)


def _crop_statistics(crops: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) gray crops -> (N, 3): gray mean, gray std, mean |horizontal difference| per crop."""
    gray = crops[:, 0].double()
    return torch.stack(
        [gray.mean((1, 2)), gray.std((1, 2)), (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))], 1
    ).numpy()


def test_pyramid_resampling_keeps_the_crop_distribution():
    # The default recipe (jitter, blur) with the fast resampling vs PIL's antialiased bicubic (the former path and
    # DINOv2's filter), same seeds: identical boxes and augmentation draws, so the crops differ only by the resize.
    # Tolerances: per-crop mean within 1 gray level on average (worst crop 4), std and sharpness (mean absolute
    # neighbour difference, the statistic aliasing would inflate and over-smoothing deflate) within 2% / 6% on
    # average and 15% / 35% for every single crop.
    exact = MultiCropAugmentation(global_size=224, local_size=98, interpolation="bicubic", reducing_gap=None)
    fast = MultiCropAugmentation(global_size=224, local_size=98)
    stats_exact, stats_fast = [], []
    for index in range(4):
        image = synthetic_cxr(index, seed=0, size=512)[0]
        for seed in range(3):
            for ours, bucket in ((exact, stats_exact), (fast, stats_fast)):
                g, loc = ours(image, np.random.default_rng([index, seed]))
                bucket.append(np.concatenate([_crop_statistics(g), _crop_statistics(loc)]))
    stats_exact, stats_fast = np.concatenate(stats_exact), np.concatenate(stats_fast)
    mean_diff = np.abs(stats_fast[:, 0] - stats_exact[:, 0]) * 255
    assert mean_diff.mean() < 1.0 and mean_diff.max() < 4.0
    for column, (on_average, worst) in ((1, (0.02, 0.15)), (2, (0.06, 0.35))):
        ratio = stats_fast[:, column] / stats_exact[:, column]
        assert abs(np.mean(ratio) - 1) < on_average and np.abs(ratio - 1).max() < worst, (
            column,
            ratio.min(),
            ratio.max(),
        )


def test_16bit_input_keeps_its_depth_through_the_crop():
    # A ramp over 200 sixteen-bit levels that all fall inside ONE 8-bit level (116 * 257 + 10 .. + 210): any
    # 8-bit round trip would flatten it; kept at depth, the crop shows the ramp.
    base = 116 * 257 + 10
    ramp = np.tile(base + np.linspace(0, 200, 256), (256, 1)).astype(np.uint16)
    assert len(np.unique(ramp // 257)) == 1
    aug = _no_jitter(global_size=64, local_size=32, global_scale=(0.9, 1.0))
    g, loc = aug(ramp, np.random.default_rng(0))
    levels = g[:, 0].double() * 65535  # back to 16-bit units
    assert torch.isfinite(g).all() and torch.isfinite(loc).all()
    for crop in levels:
        span = crop[:, -1] - crop[:, 0]
        assert (span > 100).all()  # most of the 200-level ramp survives the >= 90% area crop
        assert (crop[:, 1:] - crop[:, :-1] > -1e-2).all()  # monotone along x (no flip): no quantisation steps back
        assert crop.min() >= base - 1 and crop.max() <= base + 201


def test_8bit_and_16bit_inputs_of_the_same_picture_agree():
    # uint8 x / 255 == (257 x) / 65535: the two dtypes must map to the same [0, 1] values, jitter and blur included.
    image = synthetic_cxr(4, seed=0, size=96)[0]
    aug = MultiCropAugmentation(global_size=48, local_size=24, n_local=4, jitter_p=1.0, solarize_p=1.0)
    for seed in range(3):
        g8, l8 = aug(image, np.random.default_rng(seed))
        g16, l16 = aug(image.astype(np.uint16) * 257, np.random.default_rng(seed))
        torch.testing.assert_close(g8, g16, atol=1e-5, rtol=0)
        torch.testing.assert_close(l8, l16, atol=1e-5, rtol=0)


def test_jitter_and_solarize_match_torchvision():
    from torchvision.transforms import functional as tvf

    values = torch.rand(1, 20, 30, generator=torch.Generator().manual_seed(0))
    for contrast_first in (False, True):
        ours = Jitter(brightness=1.3, contrast=0.6, contrast_first=contrast_first).apply(values.numpy()[0])
        ref = values
        for op in ["contrast", "brightness"] if contrast_first else ["brightness", "contrast"]:
            ref = tvf.adjust_brightness(ref, 1.3) if op == "brightness" else tvf.adjust_contrast(ref, 0.6)
        torch.testing.assert_close(torch.from_numpy(ours), ref[0], atol=1e-5, rtol=0)
    assert np.array_equal(Jitter().apply(values.numpy()[0]), values.numpy()[0])
    torch.testing.assert_close(
        torch.from_numpy(solarize(values.numpy()[0], 0.5)), tvf.solarize(values, 0.5)[0], atol=1e-6, rtol=0
    )


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    values = synthetic_cxr(5, seed=0, size=64)[0].astype(np.float32) / 255
    for sigma in (0.1, 0.7, 1.0, 2.0):
        ours = gaussian_blur(values, sigma)
        radius = max(1, math.ceil(3 * sigma))
        ref = gaussian_filter(values.astype(np.float64), sigma, mode="mirror", truncate=radius / sigma)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_augmentation_rejects_bad_input():
    aug = _no_jitter()
    with pytest.raises(RaddinoError, match="dtype float32"):
        aug(np.zeros((20, 20), np.float32), np.random.default_rng(0))
    with pytest.raises(RaddinoError, match="shape"):
        aug(np.zeros((20, 20, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(RaddinoError, match="interpolation"):
        _no_jitter(interpolation="nearest")


def test_eval_view_matches_resize_then_center_crop():
    # the demo / probe evaluation view is the eval adapters' Preprocess (gray: pretraining's single channel)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    from raddino.eval.adapters.base import Preprocess

    image = synthetic_cxr(6, seed=0, size=100)[0][:, 20:80]  # tall 100x60: shorter side 60 -> 30, scale 2
    out = Preprocess(size=30, mean=MEAN, std=STD, gray=True)(image)
    assert out.shape == (3, 30, 30) and out.dtype == torch.float32
    ref = tvf.center_crop(tvf.resize(Image.fromarray(image), 30, InterpolationMode.BICUBIC), 30)
    ref = torch.from_numpy(np.asarray(ref, np.float32) / 255)
    for ch in range(3):
        torch.testing.assert_close(out[ch] * STD[ch] + MEAN[ch], ref, atol=1.01 / 255, rtol=0)
    banded = np.zeros((100, 60), np.uint8)  # bright bands above and below the central 60x60 square are cut off
    banded[:20] = 255
    banded[80:] = 255
    out = Preprocess(size=30, mean=MEAN, std=STD, gray=True)(banded)
    torch.testing.assert_close(out[0, 2:-2], torch.full((26, 30), (0 - MEAN[0]) / STD[0]), atol=1e-5, rtol=0)
    ramp = np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (50, 1))
    out16 = Preprocess(size=50, gray=True)(ramp)  # same size: values pass through at 16-bit precision
    torch.testing.assert_close(out16[0] * STD[0] + MEAN[0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-4, rtol=0)


def _former_eval_transform(image: np.ndarray, *, size: int, mean, std) -> torch.Tensor:
    """The demo / probe view as ``data.augment.EvalTransform`` computed it before it was replaced by Preprocess."""
    scale = np.float32(1.0 / np.iinfo(image.dtype).max)
    pil = Image.fromarray(image.astype(np.float32) * scale, mode="F")
    side = min(pil.width, pil.height)
    left, top = (pil.width - side) // 2, (pil.height - side) // 2
    crop = pil.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    gray = torch.from_numpy(np.clip(np.asarray(crop, dtype=np.float32), 0.0, 1.0)).unsqueeze(0)
    return (gray - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _former_eval_preprocess(image: np.ndarray, *, size: int, mean, std) -> torch.Tensor:
    """The eval adapters' gray view as it was computed before the demo shared it (``x / max``, not ``x * 1/max``)."""
    pixels = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    side = min(pixels.shape)
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    pil = Image.fromarray(pixels, mode="F")
    channel = pil.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    gray = torch.from_numpy(np.clip(np.asarray(channel, dtype=np.float32), 0.0, 1.0))
    return (torch.stack([gray] * 3) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize(("dtype", "shape"), [(np.uint8, (100, 60)), (np.uint8, (37, 53)), (np.uint16, (32, 48))])
def test_demo_probe_and_eval_share_one_preprocessing(dtype, shape):
    from raddino.eval.adapters.base import Preprocess

    rng = np.random.default_rng(0)
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = Preprocess(size=30, mean=mean, std=std, gray=True)(image)
    # `raddino eval` features are bit-identical to before (the feature cache stays valid) ...
    assert torch.equal(out, _former_eval_preprocess(image, size=30, mean=mean, std=std))
    # ... and the demo / probe view differs from its former one only by float32 rounding of the [0, 1] scaling
    torch.testing.assert_close(out, _former_eval_transform(image, size=30, mean=mean, std=std), atol=2e-6, rtol=0)


def test_dinov2_reference_pipeline_shapes_normalisation_and_masks():
    # the benchmark's DINOv2 pipeline: 2 global + n local crops of an encoded gray PNG, ImageNet-normalised RGB,
    # one of the two global crops masked (mask_prob 0.5) with a ratio in range
    from raddino.data.dinov2_pipeline import DINOv2Pipeline
    from raddino.data.preprocess import encode_png

    torch.manual_seed(0)
    pipeline = DINOv2Pipeline(global_size=28, local_size=14, n_local=3, grid=(4, 4), seed=0)
    data = encode_png(synthetic_cxr(7, seed=0, size=64)[0], compress_level=1)
    for _ in range(5):
        g, loc, masks = pipeline(data)
        assert g.shape == (2, 3, 28, 28) and loc.shape == (3, 3, 14, 14) and masks.shape == (2, 16)
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        for crops in (g, loc):  # pixel values in [0, 1] before Normalize
            assert (crops >= -mean / std - 1e-5).all() and (crops <= (1 - mean) / std + 1e-5).all()
        counts = sorted(masks.sum(1).tolist())
        assert counts[0] == 0 and 0.1 * 16 - 1 <= counts[1] <= 0.5 * 16 + 1


# ------------------------------------------------------------------------------------------------------ masks


def test_block_mask_count_is_exact_and_blocky():
    rng = np.random.default_rng(0)
    for grid, ratio in (((16, 16), 0.15), ((16, 16), 0.5), ((4, 4), 0.3), ((7, 9), 0.4)):
        for _ in range(20):
            mask = block_mask(grid, ratio, rng)
            assert mask.shape == grid and mask.dtype == bool
            assert mask.sum() == round(ratio * grid[0] * grid[1])
    # blocks: nearly every masked patch has a masked 4-neighbour (random masking at 15% would give ~48%)
    with_neighbour, total = 0, 0
    for _ in range(50):
        mask = block_mask((16, 16), 0.15, rng)
        padded = np.pad(mask, 1)
        neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        with_neighbour += int((mask & neighbour).sum())
        total += int(mask.sum())
    assert with_neighbour / total > 0.9


def test_ibot_masks_ratio_bounds_probability_and_determinism():
    rng = np.random.default_rng(1)
    n, draws = 16 * 16, 2000
    counts = np.array([sample_ibot_mask((16, 16), rng=rng, mask_prob=0.5).sum() for _ in range(draws)])
    masked = counts[counts > 0]
    assert abs(len(masked) / draws - 0.5) < 0.04
    assert masked.min() >= math.ceil(0.1 * n) and masked.max() <= math.floor(0.5 * n)
    assert abs(masked.mean() / n - 0.3) < 0.02  # ratio ~ U(0.1, 0.5)
    small = [sample_ibot_mask((4, 4), rng=rng, mask_prob=1.0).sum() for _ in range(300)]
    assert min(small) >= 2 and max(small) <= 8  # [0.1 * 16, 0.5 * 16] -> whole counts 2..8
    a = sample_ibot_mask((14, 14), rng=np.random.default_rng(7), mask_prob=1.0)
    b = sample_ibot_mask((14, 14), rng=np.random.default_rng(7), mask_prob=1.0)
    assert a.shape == (196,) and np.array_equal(a, b)
    assert not sample_ibot_mask((14, 14), rng=rng, mask_prob=0.0).any()
    with pytest.raises(RaddinoError, match="patch grid"):
        sample_ibot_mask((1, 1), rng=rng, mask_prob=1.0)


# ----------------------------------------------------------------------------------------------------- batches


def _sample(j: int, n_global: int = 2, n_local: int = 3, label: int | None = 0) -> SSLSample:
    glob = torch.stack([torch.full((1, 4, 4), 100.0 * j + c) for c in range(n_global)])
    loc = torch.stack([torch.full((1, 2, 2), 100.0 * j + c) for c in range(n_local)])
    masks = torch.zeros(n_global, 4, dtype=torch.bool)
    for c in range(n_global):
        masks[c, (j + c) % 4] = True
    return SSLSample(global_crops=glob, local_crops=loc, masks=masks, mean=MEAN, std=STD, label=label)


def test_collate_is_crop_major():
    b = 5
    batch = collate_ssl([_sample(j, label=j % 2) for j in range(b)])
    assert batch.batch_size == b and batch.n_global == 2
    assert batch.global_crops.shape == (2 * b, 1, 4, 4) and batch.local_crops.shape == (3 * b, 1, 2, 2)
    for c in range(2):
        for j in range(b):
            assert torch.all(batch.global_crops[c * b + j] == 100 * j + c)
            assert batch.masks[c * b + j].nonzero().item() == (j + c) % 4
    for c in range(3):
        for j in range(b):
            assert torch.all(batch.local_crops[c * b + j] == 100 * j + c)
    assert batch.labels.tolist() == [0, 1, 0, 1, 0] and batch.labels.dtype == torch.long
    assert collate_ssl([_sample(0), _sample(1, label=None)]).labels is None
    moved = batch.to("cpu", non_blocking=True)
    assert torch.equal(moved.global_crops, batch.global_crops) and moved.batch_size == b
    assert moved.mean == MEAN and moved.std == STD and moved.is_gray
    # the model input: 3 channels, channel c = (gray - mean[c]) / std[c], rows unchanged
    model_input = moved.normalized()
    assert not model_input.is_gray and model_input.normalized() is model_input
    assert model_input.global_crops.shape == (2 * b, 3, 4, 4) and model_input.local_crops.shape == (3 * b, 3, 2, 2)
    for ch in range(3):
        expected = (batch.global_crops[:, 0] - MEAN[ch]) / STD[ch]
        torch.testing.assert_close(model_input.global_crops[:, ch], expected, rtol=1e-6, atol=1e-4)
    assert torch.equal(model_input.masks, batch.masks) and torch.equal(model_input.labels, batch.labels)


def test_batch_size_without_labels_and_shape_check():
    batch = SSLBatch(
        global_crops=torch.zeros(8, 3, 4, 4),
        local_crops=torch.zeros(8, 3, 2, 2),
        masks=torch.zeros(8, 4, dtype=torch.bool),
        labels=None,
    )
    assert batch.batch_size == 4
    with pytest.raises(RaddinoError, match="mask rows"):
        SSLBatch(
            global_crops=torch.zeros(8, 3, 4, 4),
            local_crops=torch.zeros(0, 3, 2, 2),
            masks=torch.zeros(6, 4, dtype=torch.bool),
        )
    with pytest.raises(RaddinoError, match="gray crops need 1 channel"):  # gray = mean / std attached
        SSLBatch(
            global_crops=torch.zeros(8, 3, 4, 4),
            local_crops=torch.zeros(8, 3, 2, 2),
            masks=torch.zeros(8, 4, dtype=torch.bool),
            mean=MEAN,
            std=STD,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs a CUDA device")
def test_batch_pin_memory():
    pinned = collate_ssl([_sample(j) for j in range(2)]).pin_memory()
    assert pinned.global_crops.is_pinned() and pinned.masks.is_pinned() and pinned.labels.is_pinned()


# ------------------------------------------------------------------------------------------------ sample stream


def _dataset(n: int = 10, seed: int = 0) -> SSLDataset:
    aug = MultiCropAugmentation(global_size=28, local_size=14, n_global=2, n_local=2)
    return SSLDataset(
        source=SyntheticSource(n=n, seed=1, size=40),
        augmentation=aug,
        patch_size=7,
        mask_prob=0.5,
        mask_ratio=(0.1, 0.5),
        seed=seed,
    )


def _assert_same_sample(a: SSLSample, b: SSLSample) -> None:
    assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)
    assert torch.equal(a.masks, b.masks) and a.label == b.label


def test_dataset_positions_are_reproducible_and_epochs_permute():
    ds, fresh = _dataset(), _dataset()
    sample = ds[13]
    assert sample.global_crops.shape == (2, 1, 28, 28) and sample.masks.shape == (2, 16)
    assert sample.masks.dtype == torch.bool
    ds[3], ds[25]  # other positions (and epochs) first change nothing
    _assert_same_sample(ds[13], sample)
    _assert_same_sample(fresh[13], sample)
    assert not torch.equal(ds[14].global_crops, sample.global_crops)
    epoch0 = [ds.image_index(p) for p in range(10)]
    epoch1 = [ds.image_index(p) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert ds[13].label == SyntheticSource(n=10, seed=1, size=40).get(epoch1[3])[1]
    assert [_dataset(seed=1).image_index(p) for p in range(10)] != epoch0


def test_dataset_rejects_crop_size_not_multiple_of_patch():
    with pytest.raises(RaddinoError, match="multiple of the patch size"):
        SSLDataset(
            source=SyntheticSource(n=2, seed=0, size=32),
            augmentation=_no_jitter(global_size=30),
            patch_size=7,
            mask_prob=0.5,
            mask_ratio=(0.1, 0.5),
            seed=0,
        )


def test_position_sampler_interleaves_ranks():
    take = lambda sampler, k: [p for p, _ in zip(sampler, range(k), strict=False)]  # noqa: E731
    assert take(PositionSampler(5), 4) == [5, 6, 7, 8]
    rank0, rank1 = take(PositionSampler(12, stride=2, offset=0), 3), take(PositionSampler(12, stride=2, offset=1), 3)
    assert rank0 == [12, 14, 16] and rank1 == [13, 15, 17]
    assert sorted(rank0 + rank1) == list(range(12, 18))
    with pytest.raises(RaddinoError):
        PositionSampler(0, stride=2, offset=2)


def _first_batches(loader, k: int) -> list[SSLBatch]:
    it = iter(loader)
    return [next(it) for _ in range(k)]


@pytest.mark.timeout(120)
def test_loader_batches_independent_of_workers_and_resume_exact():
    ds = _dataset()
    b = 4
    serial = _first_batches(build_ssl_loader(ds, batch_size=b, num_workers=0, start_position=0), 4)
    parallel = _first_batches(build_ssl_loader(ds, batch_size=b, num_workers=2, start_position=0), 4)
    resumed = _first_batches(build_ssl_loader(ds, batch_size=b, num_workers=0, start_position=2 * b), 2)
    for x, y in zip(serial, parallel, strict=True):
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.local_crops, y.local_crops)
        assert torch.equal(x.masks, y.masks) and torch.equal(x.labels, y.labels)
    for x, y in zip(serial[2:], resumed, strict=True):
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.masks, y.masks)
    manual = collate_ssl([ds[p] for p in range(b, 2 * b)])
    assert torch.equal(serial[1].global_crops, manual.global_crops) and torch.equal(serial[1].masks, manual.masks)
    # two ranks of world size 2 together read the same positions as one process with twice the batch
    ranks = [
        _first_batches(build_ssl_loader(ds, batch_size=2, num_workers=0, start_position=0, rank=r, world_size=2), 1)[0]
        for r in range(2)
    ]
    assert torch.equal(ranks[0].global_crops[0], ds[0].global_crops[0])
    assert torch.equal(ranks[1].global_crops[0], ds[1].global_crops[0])
    assert torch.equal(ranks[1].global_crops[1], ds[3].global_crops[0])
