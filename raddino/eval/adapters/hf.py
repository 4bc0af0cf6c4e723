"""``hf:PATH_OR_ID`` -- a Hugging Face ``transformers`` vision model: ``Dinov2Model`` (RAD-DINO, DINOv2, also with
registers) or a BLIP vision encoder (``BlipVisionModel``, or the ``vision_model`` of a full BLIP checkpoint)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    Preprocess,
    Tokens,
    load_state_dict_file,
    torch_seed,
)

log = logging.getLogger(__name__)


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
        load_state_dict_file(model, weights)
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
