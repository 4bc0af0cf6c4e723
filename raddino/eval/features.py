"""Batched feature extraction with an on-disk cache.

Features are computed once per (backbone, weights, preprocessing, images, protocol, resize mode) and stored as
``.npy`` files in ``cache_dir``; the file name is a SHA-256 over all of these (the weights enter as a digest of
every parameter, the images as the dataset's fingerprint: array identity, or path + size + mtime of every file), so
changed weights or images never reuse stale features. Several protocols requested together share one forward pass.
On CUDA the forward runs under bf16 autocast; features are stored as float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone, Preprocess
from raddino.eval.datasets.base import ImageList
from raddino.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored features change meaning


def default_cache_dir() -> Path:
    """``$RADDINO_CACHE/features`` or ``$XDG_CACHE_HOME/raddino/features`` (default ``~/.cache/raddino/features``)."""
    if os.environ.get("RADDINO_CACHE"):
        return Path(os.environ["RADDINO_CACHE"]) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "raddino" / "features"


class _Preprocessed(Dataset):
    """``images[i]`` through the backbone's preprocessing -> ``(3, S, S)`` float32."""

    def __init__(self, images: ImageList, preprocess: Preprocess, resize: str) -> None:
        self.images, self.preprocess, self.resize = images, preprocess, resize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.images.load(index), resize=self.resize)


def cache_key(backbone: Backbone, images_fingerprint: str, *, protocol: str, resize: str) -> str:
    """SHA-256 hex digest naming one cached feature array (``images_fingerprint``: ``ImageList.fingerprint()``)."""
    payload = {
        "version": CACHE_VERSION,
        "backbone": backbone.identity(),
        "images": images_fingerprint,
        "protocol": protocol,
        "resize": resize,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: Path, backbone: Backbone, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", backbone.spec)[-80:]
    return cache_dir / slug / f"{key}.npy"


def _save_atomic(path: Path, array: np.ndarray, meta: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # readers never see a partial file
        np.save(handle, array)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))


@torch.inference_mode()
def compute_features(
    backbone: Backbone,
    images: ImageList,
    *,
    protocols: Sequence[str],
    resize: str = "resize",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Features of every image, no cache: ``{protocol: (N, feature_dim(protocol)) float32}``."""
    device = torch.device(device)
    backbone.to(device).eval()
    loader = DataLoader(
        _Preprocessed(images, backbone.preprocess, resize),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    with tqdm(total=len(images), desc=desc, unit="img", disable=None, leave=False) as bar:
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            if autocast is not None:
                with autocast:
                    feats = backbone.features(batch, protocols)
            else:
                feats = backbone.features(batch, protocols)
            for protocol, value in feats.items():
                out[protocol].append(value.float().cpu().numpy())
            bar.update(len(batch))
    return {p: np.concatenate(v) if v else np.zeros((0, backbone.feature_dim(p)), np.float32) for p, v in out.items()}


def extract_features(
    backbone: Backbone,
    images: ImageList,
    *,
    protocols: Sequence[str],
    resize: str = "resize",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Cached :func:`compute_features`: protocols found in ``cache_dir`` are loaded, the others computed together
    and stored. ``cache_dir=None`` disables the cache."""
    for protocol in protocols:
        backbone.check_protocol(protocol)
    found: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        fingerprint = images.fingerprint()  # stats every file of a file list: computed once
        for protocol in protocols:
            key = cache_key(backbone, fingerprint, protocol=protocol, resize=resize)
            paths[protocol] = _cache_path(Path(cache_dir), backbone, key)
            if paths[protocol].is_file():
                try:
                    array = np.load(paths[protocol], allow_pickle=False)
                except (OSError, ValueError) as err:
                    log.warning("ignoring unreadable cached features %s: %s", paths[protocol], err)
                    continue
                if array.shape == (len(images), backbone.feature_dim(protocol)):
                    found[protocol] = array
    missing = [p for p in protocols if p not in found]
    if found:
        log.info("%s: %s loaded from the feature cache", desc, ", ".join(found))
    if missing:
        started = time.perf_counter()
        computed = compute_features(
            backbone,
            images,
            protocols=missing,
            resize=resize,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            desc=desc,
        )
        seconds = time.perf_counter() - started
        log.info("%s: %d images in %.1f s (%.0f img/s)", desc, len(images), seconds, len(images) / max(seconds, 1e-9))
        for protocol, array in computed.items():
            if not np.all(np.isfinite(array)):
                raise RaddinoError(f"{backbone.spec}: {desc} features contain NaN / inf ({protocol})")
            if protocol in paths:
                meta = {"backbone": backbone.identity(), "protocol": protocol, "resize": resize, "n": len(array)}
                _save_atomic(paths[protocol], array, meta)
        found.update(computed)
    return {p: found[p] for p in protocols}
