"""Batched feature extraction and its on-disk cache (hits, invalidation on new weights or images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from raddino.eval.adapters.base import Backbone, Preprocess, Tokens
from raddino.eval.datasets.base import ArrayImages
from raddino.eval.features import compute_features, extract_features


class CountingBackbone(Backbone):
    """A tiny conv "ViT": CLS = linear of the mean pixel, patches = 4x4 conv; counts forward passes."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        model = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        with torch.no_grad():
            model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
            model.bias.zero_()
        super().__init__(
            spec="test:counting", model=model, preprocess=Preprocess(size=16), cls_dim=8, patch_dim=8, has_cls=True
        )
        self.calls = 0

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        self.calls += 1
        patch = self.model(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return [Tokens(cls=patch.amax(dim=1) + i, patch=patch) for i in range(n_last)]


def _images(n: int = 10, seed: int = 0) -> ArrayImages:
    rng = np.random.default_rng(seed)
    return ArrayImages(rng.integers(0, 255, (n, 12, 12), dtype=np.uint8), identity=f"test-{seed}")


def test_features_match_a_direct_forward_and_share_one_pass():
    backbone, images = CountingBackbone(), _images()
    feats = compute_features(backbone, images, protocols=["cls", "mean", "cls_mean"], batch_size=4)
    assert backbone.calls == 3  # ceil(10 / 4) batches, every protocol from the same pass
    batch = torch.stack([backbone.preprocess(images.load(i)) for i in range(10)])
    with torch.no_grad():
        patch = backbone.model(batch).flatten(2).transpose(1, 2)
    np.testing.assert_allclose(feats["mean"], patch.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["cls_mean"], np.concatenate([feats["cls"], feats["mean"]], axis=1))
    assert feats["cls"].dtype == np.float32 and feats["cls"].shape == (10, 8)


def test_cache_hit_skips_the_forward_pass(tmp_path: Path):
    backbone, images = CountingBackbone(), _images()
    first = extract_features(backbone, images, protocols=["cls", "dinov2_linear"], batch_size=5, cache_dir=tmp_path)
    assert backbone.calls == 2
    second = extract_features(backbone, images, protocols=["cls", "dinov2_linear"], batch_size=5, cache_dir=tmp_path)
    assert backbone.calls == 2  # nothing recomputed
    for protocol in ("cls", "dinov2_linear"):
        np.testing.assert_array_equal(first[protocol], second[protocol])
    assert second["dinov2_linear"].shape == (10, 5 * 8)
    extract_features(backbone, images, protocols=["cls", "mean"], batch_size=5, cache_dir=tmp_path)
    assert backbone.calls == 4  # only the new protocol is computed (in one pass over 2 batches)


def test_cache_invalidated_by_new_weights_images_or_resize(tmp_path: Path):
    images = _images()
    first = CountingBackbone(seed=0)
    reference = extract_features(first, images, protocols=["cls"], cache_dir=tmp_path)["cls"]
    changed = CountingBackbone(seed=1)  # same spec, different weights
    other = extract_features(changed, images, protocols=["cls"], cache_dir=tmp_path)["cls"]
    assert changed.calls == 1 and not np.allclose(other, reference)
    same = CountingBackbone(seed=0)
    extract_features(same, images, protocols=["cls"], cache_dir=tmp_path)
    assert same.calls == 0  # identical weights -> cache hit
    extract_features(same, _images(seed=5), protocols=["cls"], cache_dir=tmp_path)
    assert same.calls == 1  # different images
    extract_features(same, images, protocols=["cls"], cache_dir=tmp_path, resize="pad")
    assert same.calls == 2  # different preprocessing
    extract_features(same, images, protocols=["cls"], cache_dir=None)
    assert same.calls == 3  # cache disabled
