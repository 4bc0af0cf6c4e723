"""The adapter interface shared by every backbone family: preprocessing, tokens, feature protocols.

Each adapter carries its own :class:`Preprocess` (input size, mean / std, gray or colour) and declares the feature
dimension of every protocol (:meth:`Backbone.feature_dim`). Feature protocols (:data:`FEATURE_PROTOCOLS`):

* ``cls``: the global image embedding -- the CLS token for ViTs; the model's own pooled embedding (timm's
  pre-logits: global average pooling for ResNet / FocalNet / SAM's neck) for models without a CLS token;
* ``mean``: the mean of the patch tokens (the spatial positions of the last feature map for CNNs);
* ``cls_mean``: ``cls`` and ``mean`` concatenated;
* ``dinov2_linear``: DINOv2's linear-evaluation features, the CLS tokens of the last 4 blocks (each through the
  final norm) and the mean patch token of the last block, concatenated (``5 D``); ViTs only;
* ``cls_grid``: ``cls`` and the patch tokens average-pooled to a 2 x 2 grid (quadrant means, row-major),
  concatenated (``D + 4 D``): a linear probe that can tell where in the image a feature is (which lung), at a
  width independent of the input size. Square token grids only.
* ``cls_grid4``: the same with a 4 x 4 grid (``D + 16 D``): finer positions (upper / middle / lower lung field),
  read from an input with at least 4 x 4 patch tokens (e.g. 56 px at patch 14; 112 px gives 2 x 2 tokens a cell).

This module never imports a family module (``timm.py``, ``hf.py``, ...); the families import it, and
:mod:`raddino.eval.adapters.registry` maps spec prefixes to their builders.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

FEATURE_PROTOCOLS = ("cls", "mean", "cls_mean", "dinov2_linear", "cls_grid", "cls_grid4")
RESIZE_MODES = ("resize", "pad")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
N_LAST_BLOCKS = 4  # DINOv2 linear protocol: CLS tokens of the last 4 blocks
GRIDS = {"cls_grid": 2, "cls_grid4": 4}  # patch tokens pooled to g x g cells


# --------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float image -> float32 in [0, 1] (integers by their type's range, floats clipped)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.integer) or image.dtype == bool:
        raise RaddinoError(f"unsupported image dtype {image.dtype} (expected uint8, uint16 or float)")
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _resize_channel(channel: np.ndarray, *, size: int) -> np.ndarray:
    """``(H, W)`` float32 -> shorter side ``size`` (bicubic, PIL's antialiasing when shrinking), central square."""
    height, width = channel.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    pil = Image.fromarray(channel, mode="F")
    resized = pil.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # bicubic overshoots


def _pad_channel(channel: np.ndarray, *, size: int) -> np.ndarray:
    """``(H, W)`` with ``H, W <= size`` centred on a ``size x size`` black canvas (MedMNIST+ zero padding)."""
    height, width = channel.shape
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = channel
    return canvas


@dataclass(frozen=True)
class Preprocess:
    """A backbone's input transform: ``image (H, W) | (H, W, 3)`` -> ``(3, size, size)`` float32, normalised.

    Attributes:
        size: side of the square input.
        mean / std: per-channel normalisation of [0, 1] pixels.
        gray: reduce colour images to gray (BT.601 luma) before replicating to 3 channels -- for backbones
            pretrained on grayscale radiographs; colour backbones keep colour (gray images are replicated).
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    gray: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise RaddinoError(f"input size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise RaddinoError(f"mean / std need 3 values with std > 0, got {self.mean} / {self.std}")

    def __call__(self, image: np.ndarray, *, resize: str = "resize") -> Tensor:
        """``resize``: shorter side to ``size`` + central square crop; ``pad``: images no larger than ``size`` are
        zero-padded to it unscaled (larger ones are resized as with ``resize``)."""
        if resize not in RESIZE_MODES:
            raise RaddinoError(f"unknown resize mode {resize!r}; expected {' or '.join(RESIZE_MODES)}")
        pixels = to_unit_float(np.asarray(image))
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        if pixels.ndim == 3 and self.gray:
            pixels = pixels[..., :3] @ _LUMA_601
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
            raise RaddinoError(f"expected an (H, W) or (H, W, 3) image, got shape {pixels.shape}")
        channels = [pixels] if pixels.ndim == 2 else [pixels[..., c] for c in range(3)]
        pad = resize == "pad" and max(pixels.shape[:2]) <= self.size
        out = [_pad_channel(c, size=self.size) if pad else _resize_channel(c, size=self.size) for c in channels]
        if len(out) == 1:
            out = out * 3
        tensor = torch.from_numpy(np.stack(out))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (tensor - mean) / std

    def describe(self) -> dict[str, object]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "gray": self.gray}


# --------------------------------------------------------------------------------------------------------------
# the adapter interface
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """One layer's outputs: ``cls (B, Dc)`` (None without a CLS token), ``patch (B, N, Dp)`` (None for models
    without patch tokens), and the model's own pooled embedding ``pooled (B, Dc)`` when there is no CLS token."""

    cls: Tensor | None
    patch: Tensor | None
    pooled: Tensor | None = None


class Backbone(nn.Module):
    """Adapter base: a wrapped model, its preprocessing and its feature protocols.

    Subclasses implement :meth:`tokens`; :meth:`features` builds every protocol from it. ``spec`` is the name
    used in result tables; ``cls_dim`` / ``patch_dim`` are the declared widths of the global embedding and of the
    patch tokens (``patch_dim = 0``: the model gives no patch tokens, only ``cls`` applies).
    """

    def __init__(
        self, *, spec: str, model: nn.Module, preprocess: Preprocess, cls_dim: int, patch_dim: int, has_cls: bool
    ) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.cls_dim = cls_dim
        self.patch_dim = patch_dim
        self.has_cls = has_cls
        self._digest: str | None = None

    @abstractmethod
    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        """Images ``(B, 3, S, S)`` -> outputs of the last ``n_last`` blocks (earliest first; ``n_last`` > 1 only
        for ViTs with a CLS token)."""

    def check_protocol(self, protocol: str) -> None:
        if protocol not in FEATURE_PROTOCOLS:
            raise RaddinoError(f"unknown feature protocol {protocol!r}; expected one of {', '.join(FEATURE_PROTOCOLS)}")
        if protocol in ("mean", "cls_mean", *GRIDS) and not self.patch_dim:
            raise RaddinoError(f"backbone {self.spec} gives no patch tokens, so only the cls protocol applies")
        if protocol == "dinov2_linear" and not self.has_cls:
            raise RaddinoError(
                f"backbone {self.spec} has no CLS token, so the dinov2_linear protocol does not apply; "
                "use cls, mean or cls_mean"
            )

    def feature_dim(self, protocol: str) -> int:
        """Declared width of ``protocol``'s features."""
        self.check_protocol(protocol)
        if protocol in GRIDS:
            return self.cls_dim + GRIDS[protocol] ** 2 * self.patch_dim
        return {
            "cls": self.cls_dim,
            "mean": self.patch_dim,
            "cls_mean": self.cls_dim + self.patch_dim,
            "dinov2_linear": N_LAST_BLOCKS * self.cls_dim + self.patch_dim,
        }[protocol]

    def features(self, x: Tensor, protocols: Sequence[str]) -> dict[str, Tensor]:
        """Images ``(B, 3, S, S)`` -> ``{protocol: (B, feature_dim(protocol))}`` (float32) from one forward pass."""
        for protocol in protocols:
            self.check_protocol(protocol)
        layers = self.tokens(x, N_LAST_BLOCKS if "dinov2_linear" in protocols else 1)
        last = layers[-1]
        glob = last.cls if last.cls is not None else last.pooled
        mean = last.patch.mean(dim=1) if last.patch is not None else None
        out: dict[str, Tensor] = {}
        for protocol in protocols:
            if protocol == "cls":
                out[protocol] = glob
            elif protocol == "mean":
                out[protocol] = mean
            elif protocol == "cls_mean":
                out[protocol] = torch.cat([glob, mean], dim=1)
            elif protocol in GRIDS:
                out[protocol] = torch.cat([glob, self._grid_pool(last.patch, protocol)], dim=1)
            else:
                out[protocol] = torch.cat([layer.cls for layer in layers] + [mean], dim=1)
        return {k: v.float() for k, v in out.items()}

    def _grid_pool(self, patch: Tensor, protocol: str) -> Tensor:
        """Patch tokens ``(B, N, D)`` of a square ``g x g`` token grid -> cell means ``(B, grid * grid * D)`` with
        ``grid = GRIDS[protocol]``, cells row-major (adaptive average pooling: cells of unequal size when ``grid``
        does not divide ``g``)."""
        grid = GRIDS[protocol]
        b, n, d = patch.shape
        g = round(n**0.5)
        if g * g != n or g < grid:
            raise RaddinoError(
                f"backbone {self.spec}: the {protocol} protocol needs a square grid of at least {grid} x {grid} "
                f"patch tokens, got {n} tokens; a larger --img-size gives more"
            )
        cells = nn.functional.adaptive_avg_pool2d(patch.transpose(1, 2).reshape(b, d, g, g), grid)  # (B, D, grid, grid)
        return cells.flatten(2).transpose(1, 2).reshape(b, grid * grid * d)

    def weights_digest(self) -> str:
        """BLAKE2b over every parameter and buffer (names, shapes, dtypes, bytes), computed once."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for name, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._digest = h.hexdigest()
        return self._digest

    def identity(self) -> dict[str, object]:
        """What determines this backbone's features (the feature-cache key)."""
        return {"spec": self.spec, "weights": self.weights_digest(), "preprocess": self.preprocess.describe()}


_RESNET_LAYER = re.compile(r"(?:^|\.)layer(\d)\.")  # ResNet stages layer1..layer4 (numbered from 1)
_LAYER_PATTERNS = (
    re.compile(r"(?:^|\.)blocks\.(\d+)\."),  # timm / raddino ViT, SAM
    re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\."),  # Hugging Face Dinov2 / BLIP
    re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\."),  # OpenCLIP ViT
    re.compile(r"(?:^|\.)layers\.(\d+)\."),  # FocalNet stages
    _RESNET_LAYER,
    re.compile(r"(?:^|\.)stages\.(\d+)\."),  # other timm hierarchical models
)
_INPUT_NAMES = re.compile(
    r"(?:^|\.)(patch_embed|pos_embed|cls_token|reg_token|mask_token|embeddings|conv1|bn1|stem|class_embedding|"
    r"positional_embedding|ln_pre)(?:\.|$)"
)


def layer_index(name: str) -> int | None:
    """Depth of a parameter for layer-wise lr decay: 0 for input embeddings, ``i + 1`` for block / stage ``i``
    (ResNet's ``layerK`` -> K), None for what follows the last block (final norm, neck, projection)."""
    for pattern in _LAYER_PATTERNS:
        match = pattern.search(name)
        if match:
            index = int(match.group(1))
            return index if pattern is _RESNET_LAYER else index + 1
    if _INPUT_NAMES.search(name):
        return 0
    return None


@contextlib.contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """Seed torch's generators inside the block and restore their state afterwards: library initialisers (timm,
    transformers) and dropout draw from the default generators, and the caller's RNG streams must not change."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(seed)
        yield


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a local weights file into ``model``: every parameter must be present; unused entries are logged."""
    from raddino.interop.files import read_state_dict

    state = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RaddinoError(f"weights file {path} lacks {len(missing)} parameters, e.g. {missing[0]}")
    if unexpected:
        log.warning("weights file %s: %d unused entries, e.g. %s", path, len(unexpected), unexpected[0])
