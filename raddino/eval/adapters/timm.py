"""``timm:NAME`` -- any timm model: DINOv2 ``vit_*_patch14_dinov2*``, ImageNet ``resnet50`` /
``vit_base_patch16_224``, SAM's image encoder ``samvit_base_patch16``, FocalNet (SEEM's backbone) ``focalnet_*``."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone, Preprocess, Tokens, torch_seed


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
