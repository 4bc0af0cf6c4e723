"""One interface from images to features for our checkpoints and off-the-shelf foundation models.

A backbone is named by a spec string:

* ``timm:NAME`` -- any timm model: DINOv2 ``vit_*_patch14_dinov2*``, ImageNet ``resnet50`` / ``vit_base_patch16_224``,
  SAM's image encoder ``samvit_base_patch16``, FocalNet (SEEM's backbone) ``focalnet_*``;
* ``hf:PATH_OR_ID`` -- a Hugging Face ``transformers`` vision model: ``Dinov2Model`` (RAD-DINO, DINOv2, also with
  registers) or a BLIP vision encoder (``BlipVisionModel``, or the ``vision_model`` of a full BLIP checkpoint);
* ``open_clip:ARCH/TAG`` -- an OpenCLIP image tower (optional extra: ``pip install 'raddino[open_clip]'``);
* ``ours:PATH`` -- a raddino run directory (teacher of the newest checkpoint) or an exported directory;
* ``pixels`` / ``pixels:SIZE`` -- no model: the preprocessed gray image itself, flattened (the raw-pixel floor).

Each adapter carries its own :class:`Preprocess` (input size, mean / std, gray or colour) and declares the feature
dimension of every protocol (:meth:`Backbone.feature_dim`). Feature protocols (:data:`FEATURE_PROTOCOLS`):

* ``cls``: the global image embedding -- the CLS token for ViTs; the model's own pooled embedding (timm's
  pre-logits: global average pooling for ResNet / FocalNet / SAM's neck) for models without a CLS token;
* ``mean``: the mean of the patch tokens (the spatial positions of the last feature map for CNNs);
* ``cls_mean``: ``cls`` and ``mean`` concatenated;
* ``dinov2_linear``: DINOv2's linear-evaluation features, the CLS tokens of the last 4 blocks (each through the
  final norm) and the mean patch token of the last block, concatenated (``5 D``); ViTs only.

Weights come from each library's usual source (timm / Hugging Face hub downloads on a user's machine); ``weights``
loads a local file instead; ``random_init`` builds the architecture with seeded random weights and never downloads
(tests, baselines). ``img_size`` overrides the input size (ViTs interpolate their position embeddings): SAM's
native 1024 px is impractical on a CPU, so tests and quick runs build it at e.g. 64 px.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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

FEATURE_PROTOCOLS = ("cls", "mean", "cls_mean", "dinov2_linear")
RESIZE_MODES = ("resize", "pad")
BACKBONE_KINDS = ("timm", "hf", "open_clip", "ours", "pixels")
PIXELS_SIZE = 28  # pixels baseline default: MedMNIST's native size (the raw-pixel floor on PneumoniaMNIST)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
N_LAST_BLOCKS = 4  # DINOv2 linear protocol: CLS tokens of the last 4 blocks


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
        if protocol in ("mean", "cls_mean") and not self.patch_dim:
            raise RaddinoError(f"backbone {self.spec} gives no patch tokens, so only the cls protocol applies")
        if protocol == "dinov2_linear" and not self.has_cls:
            raise RaddinoError(
                f"backbone {self.spec} has no CLS token, so the dinov2_linear protocol does not apply; "
                "use cls, mean or cls_mean"
            )

    def feature_dim(self, protocol: str) -> int:
        """Declared width of ``protocol``'s features."""
        self.check_protocol(protocol)
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
            else:
                out[protocol] = torch.cat([layer.cls for layer in layers] + [mean], dim=1)
        return {k: v.float() for k, v in out.items()}

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


# --------------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------------


class TimmBackbone(Backbone):
    """A timm model. ViTs (token output) give CLS / patch tokens; CNN-like models (feature maps) give spatial
    positions as patches and timm's pre-logits pooling as the global embedding."""

    def __init__(self, *, spec: str, model: nn.Module, preprocess: Preprocess) -> None:
        self.is_vit = hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_intermediates")
        has_cls = self.is_vit and getattr(model, "cls_token", None) is not None
        # timm: num_features = channels of forward_features; head_hidden_size = width of the pre-logits output.
        width = int(model.num_features)
        pooled_dim = int(getattr(model, "head_hidden_size", None) or width)
        if self.is_vit:
            patch_dim = int(model.embed_dim)
            cls_dim = patch_dim if has_cls else pooled_dim
        else:
            patch_dim, cls_dim = width, pooled_dim
        super().__init__(
            spec=spec, model=model, preprocess=preprocess, cls_dim=cls_dim, patch_dim=patch_dim, has_cls=has_cls
        )

    def _map_tokens(self, fmap: Tensor) -> Tensor:
        """``(B, C, H, W)`` (or NHWC) -> ``(B, H*W, C)``."""
        if fmap.ndim != 4:
            raise RaddinoError(f"{self.spec}: unexpected feature shape {tuple(fmap.shape)}")
        if fmap.shape[1] != self.patch_dim and fmap.shape[-1] == self.patch_dim:
            fmap = fmap.permute(0, 3, 1, 2)
        return fmap.flatten(2).transpose(1, 2)

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        model = self.model
        if not self.is_vit:
            fmap = model.forward_features(x)
            return [Tokens(cls=None, patch=self._map_tokens(fmap), pooled=model.forward_head(fmap, pre_logits=True))]
        prefix = int(model.num_prefix_tokens)
        if n_last == 1:
            out = model.forward_features(x)  # (B, T, D), through the final norm
            pooled = None if self.has_cls else model.forward_head(out, pre_logits=True)
            return [Tokens(cls=out[:, 0] if self.has_cls else None, patch=out[:, prefix:], pooled=pooled)]
        layers = model.forward_intermediates(
            x, indices=n_last, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )
        return [Tokens(cls=pre[:, 0], patch=patch) for patch, pre in layers]


def build_timm(name: str, *, weights: Path | None, random_init: bool, img_size: int | None, seed: int) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise RaddinoError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs: dict[str, object] = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    pretrained = not random_init
    if weights is not None:
        if not weights.is_file():
            raise RaddinoError(f"weights file not found: {weights}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        with torch_seed(seed):
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError:
                # CNNs take no img_size (they accept any input size); the override then only sets the input size.
                kwargs.pop("img_size", None)
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise RaddinoError(f"cannot build timm:{name}: {str(err).splitlines()[0] if str(err) else err}") from err
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    size = img_size or int(cfg["input_size"][-1])
    preprocess = Preprocess(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return TimmBackbone(spec=f"timm:{name}", model=model, preprocess=preprocess)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------------------


class HFBackbone(Backbone):
    """A transformers ViT (Dinov2Model, Dinov2WithRegistersModel, BlipVisionModel): ``last_hidden_state`` is
    already through the final norm; intermediate layers are normed with the model's own final norm."""

    def __init__(self, *, spec: str, model: nn.Module, preprocess: Preprocess, n_prefix: int, norm: nn.Module) -> None:
        dim = int(model.config.hidden_size)
        super().__init__(spec=spec, model=model, preprocess=preprocess, cls_dim=dim, patch_dim=dim, has_cls=True)
        self.n_prefix = n_prefix
        self.norm = norm

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        out = self.model(pixel_values=x, output_hidden_states=n_last > 1, return_dict=True)
        if n_last == 1:
            hidden = [out.last_hidden_state]
        else:
            hidden = [self.norm(h) for h in out.hidden_states[-n_last:]]
        return [Tokens(cls=h[:, 0], patch=h[:, self.n_prefix :]) for h in hidden]


def _hf_preprocess(path: str, config: object, *, img_size: int | None, local_only: bool) -> Preprocess:
    """Size / mean / std from the checkpoint's ``preprocessor_config.json`` when there is one."""
    is_blip = "blip" in type(config).__name__.lower()
    defaults = (CLIP_MEAN, CLIP_STD) if is_blip else (IMAGENET_MEAN, IMAGENET_STD)
    size = int(getattr(config, "image_size", 224))
    mean, std = defaults
    payload = None
    local = Path(path) / "preprocessor_config.json"
    if local.is_file():
        payload = json.loads(local.read_text())
    elif not local_only:
        try:
            from huggingface_hub import hf_hub_download

            payload = json.loads(Path(hf_hub_download(path, "preprocessor_config.json")).read_text())
        except Exception as err:  # noqa: BLE001  (no processor config is fine: defaults apply)
            log.info("hf:%s: no preprocessor_config.json (%s); using defaults", path, type(err).__name__)
    if payload:
        mean = tuple(payload.get("image_mean", mean))
        std = tuple(payload.get("image_std", std))
        crop = payload.get("crop_size") or payload.get("size") or {}
        if isinstance(crop, dict):
            size = int(crop.get("height") or crop.get("shortest_edge") or size)
        elif isinstance(crop, int):
            size = crop
    patch = int(getattr(config, "patch_size", 1))
    size = img_size or size
    if size % patch:
        size = max(patch, round(size / patch) * patch)
    return Preprocess(size=size, mean=mean, std=std)


def build_hf(path: str, *, weights: Path | None, random_init: bool, img_size: int | None, seed: int) -> Backbone:
    try:
        import transformers
    except ImportError:
        raise RaddinoError("hf: backbones need transformers: pip install 'raddino[hf]'") from None
    local = Path(path).is_dir()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=random_init and not local)
    except OSError as err:
        raise RaddinoError(f"hf:{path}: cannot load its config ({str(err).splitlines()[0]})") from None
    # AutoModel has no entry for vision-only configs such as BlipVisionConfig: use the matching *Model class.
    model_class = getattr(transformers, type(config).__name__.replace("Config", "Model"), None)
    if model_class is None:
        raise RaddinoError(f"hf:{path}: unsupported config {type(config).__name__} (expected Dinov2 / BLIP)")
    with torch_seed(seed):
        if random_init or weights is not None:
            model = model_class(config)
        else:
            model = model_class.from_pretrained(path)
    if weights is not None:
        _load_state_dict_file(model, weights)
    if hasattr(model, "vision_model"):  # full BLIP / CLIP-style checkpoints: keep the image tower
        model = model.vision_model
    model.eval()
    if hasattr(model, "layernorm"):
        norm = model.layernorm  # Dinov2Model
    elif hasattr(model, "post_layernorm"):
        norm = model.post_layernorm  # BlipVisionModel
    else:
        raise RaddinoError(f"hf:{path}: unsupported model class {type(model).__name__} (Dinov2 / BLIP vision)")
    n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    preprocess = _hf_preprocess(path, model.config, img_size=img_size, local_only=random_init)
    return HFBackbone(spec=f"hf:{path}", model=model, preprocess=preprocess, n_prefix=n_prefix, norm=norm)


# --------------------------------------------------------------------------------------------------------------
# OpenCLIP (optional)
# --------------------------------------------------------------------------------------------------------------


class OpenClipBackbone(Backbone):
    """An OpenCLIP image tower: the global embedding is the (projected) image embedding; ViT towers also give their
    patch tokens (``output_tokens``), other towers only ``cls``."""

    def __init__(self, *, spec: str, visual: nn.Module, preprocess: Preprocess, embed_dim: int) -> None:
        transformer = getattr(visual, "transformer", None)
        self.token_width = int(transformer.width) if transformer is not None else 0
        super().__init__(
            spec=spec,
            model=visual,
            preprocess=preprocess,
            cls_dim=embed_dim,
            patch_dim=self.token_width,
            has_cls=False,
        )
        if self.token_width:
            visual.output_tokens = True

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        if self.token_width:
            pooled, patch = self.model(x)
            return [Tokens(cls=None, patch=patch, pooled=pooled)]
        return [Tokens(cls=None, patch=None, pooled=self.model(x))]


def build_open_clip(name: str, *, weights: Path | None, random_init: bool, img_size: int | None, seed: int) -> Backbone:
    try:
        import open_clip
    except ImportError:
        raise RaddinoError(
            f"open_clip:{name} needs the optional OpenCLIP package: pip install 'raddino[open_clip]'"
        ) from None
    arch, _, tag = name.partition("/")
    if arch not in open_clip.list_models():
        raise RaddinoError(f"unknown OpenCLIP architecture {arch!r} (see open_clip.list_models())")
    pretrained = None if random_init else (str(weights) if weights is not None else (tag or None))
    if not random_init and pretrained is None:
        raise RaddinoError(f"open_clip:{name}: name the pretrained tag (open_clip:ARCH/TAG) or pass --weights")
    extra = {} if img_size is None else {"force_image_size": img_size}
    try:
        with torch_seed(seed):
            model = open_clip.create_model(arch, pretrained=pretrained, **extra)
    except (OSError, RuntimeError, ValueError) as err:
        raise RaddinoError(f"cannot build open_clip:{name}: {err}") from None
    visual = model.visual.eval()
    size = visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    embed_dim = int(visual.output_dim)
    return OpenClipBackbone(
        spec=f"open_clip:{name}",
        visual=visual,
        preprocess=Preprocess(size=size, mean=mean, std=std),
        embed_dim=embed_dim,
    )


# --------------------------------------------------------------------------------------------------------------
# raw pixels (baseline)
# --------------------------------------------------------------------------------------------------------------


class PixelsBackbone(Backbone):
    """The raw-pixel baseline: features are the preprocessed gray image, ``(B, 3, S, S)`` -> ``(B, S*S)`` (the
    three channels are the same gray copy, so one is kept). No parameters; only the ``cls`` protocol applies."""

    def __init__(self, *, size: int) -> None:
        # mean 0 / std 1: features are the [0, 1] pixels (the probes standardise them anyway)
        preprocess = Preprocess(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), gray=True)
        super().__init__(
            spec=f"pixels:{size}",
            model=nn.Identity(),
            preprocess=preprocess,
            cls_dim=size * size,
            patch_dim=0,
            has_cls=False,
        )

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        return [Tokens(cls=None, patch=None, pooled=x[:, 0].flatten(1))]


def build_pixels(name: str, *, weights: Path | None, random_init: bool, img_size: int | None, seed: int) -> Backbone:
    """``pixels`` (``name`` empty: :data:`PIXELS_SIZE`) or ``pixels:SIZE``; ``img_size`` overrides the size.
    ``random_init`` / ``seed`` change nothing (there are no weights)."""
    if weights is not None:
        raise RaddinoError("the pixels baseline has no weights; drop --weights / weights:")
    if name and not (name.isdigit() and int(name) > 0):
        raise RaddinoError(
            f"pixels:{name}: expected pixels or pixels:SIZE with a positive integer SIZE, e.g. pixels:28"
        )
    return PixelsBackbone(size=img_size or (int(name) if name else PIXELS_SIZE))


# --------------------------------------------------------------------------------------------------------------
# weights files
# --------------------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``.pt`` / ``.pth`` / ``.bin``; a ``state_dict`` /
    ``model`` entry is unwrapped)."""
    if not path.is_file():
        raise RaddinoError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle / zip errors of a bad file)
        raise RaddinoError(f"cannot read weights file {path}: {err}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict):
        raise RaddinoError(f"weights file {path} does not hold a state dict")
    return payload


def _load_state_dict_file(model: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RaddinoError(f"weights file {path} lacks {len(missing)} parameters, e.g. {missing[0]}")
    if unexpected:
        log.warning("weights file %s: %d unused entries, e.g. %s", path, len(unexpected), unexpected[0])


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:name"`` (or ``"pixels"``) -> (kind, name); raises :class:`RaddinoError` for an unknown kind."""
    kind, sep, name = spec.partition(":")
    if spec == "pixels":  # the one kind without a name
        return "pixels", ""
    if not sep or not name or kind not in BACKBONE_KINDS:
        raise RaddinoError(
            f"unknown backbone {spec!r}; expected timm:NAME, hf:PATH_OR_ID, open_clip:ARCH/TAG, ours:PATH or "
            "pixels[:SIZE]"
        )
    return kind, name


def build_backbone_adapter(
    spec: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    seed: int = 0,
) -> Backbone:
    """Build the adapter named by ``spec`` (see the module docstring), in eval mode on the CPU.

    Args:
        weights: a local weights file instead of the library's download.
        random_init: seeded random weights (never downloads).
        img_size: input size override (ViTs interpolate position embeddings).
        seed: seed of the random initialisation.
    """
    kind, name = parse_spec(spec)
    weights_path = Path(weights) if weights is not None else None
    if kind == "timm":
        builder = build_timm
    elif kind == "hf":
        builder = build_hf
    elif kind == "open_clip":
        builder = build_open_clip
    elif kind == "pixels":
        builder = build_pixels
    else:
        from raddino.eval.ours import build_ours

        builder = build_ours
    backbone = builder(name, weights=weights_path, random_init=random_init, img_size=img_size, seed=seed)
    n_params = sum(p.numel() for p in backbone.model.parameters())
    log.info(
        "backbone %s: %.1fM parameters, input %d px, dims cls=%d patch=%d%s",
        backbone.spec,
        n_params / 1e6,
        backbone.preprocess.size,
        backbone.cls_dim,
        backbone.patch_dim,
        " (random init)" if random_init else "",
    )
    return backbone
