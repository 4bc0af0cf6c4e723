"""``open_clip:ARCH/TAG`` -- an OpenCLIP image tower (optional extra: ``pip install 'raddino[open_clip]'``)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import CLIP_MEAN, CLIP_STD, Backbone, Preprocess, Tokens, torch_seed


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
