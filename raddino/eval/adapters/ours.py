"""The ``ours:PATH`` backbone: raddino's own ViT from a run directory or an exported directory.

* Run directory (``raddino pretrain`` output): ``config.yaml`` + ``checkpoints/step_*``; the **teacher** backbone of
  the newest complete checkpoint is read from the DCP checkpoint (only its tensors are loaded, not the heads or the
  optimizer).
* Exported directory: ``config.yaml`` + one ``*.safetensors`` file with the backbone state dict (keys in
  :class:`raddino.models.vit.VisionTransformer` names, optionally prefixed ``teacher.backbone.`` / ``backbone.``).

The architecture comes from the config's ``model`` section; the preprocessing from ``crops`` (``global_size``,
``mean``, ``std``), with colour inputs reduced to gray as in pretraining. ``weights`` overrides the checkpoint with a
state-dict file; ``random_init`` keeps the seeded initialisation (the same architecture without pretraining).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone, Preprocess, Tokens, torch_seed
from raddino.interop.files import read_state_dict

log = logging.getLogger(__name__)

_PREFIXES = ("teacher.backbone.", "backbone.", "module.")


class OursBackbone(Backbone):
    """:class:`raddino.models.vit.VisionTransformer`: ``forward_features`` / ``get_intermediate_layers`` give CLS and
    patch tokens after the final norm; register tokens are excluded from the patches."""

    def __init__(self, *, spec: str, model: nn.Module, preprocess: Preprocess) -> None:
        dim = int(model.embed_dim)
        super().__init__(spec=spec, model=model, preprocess=preprocess, cls_dim=dim, patch_dim=dim, has_cls=True)

    def tokens(self, x: Tensor, n_last: int) -> list[Tokens]:
        if n_last == 1:
            out = self.model.forward_features(x)
            return [Tokens(cls=out.cls, patch=out.patch)]
        return [Tokens(cls=o.cls, patch=o.patch) for o in self.model.get_intermediate_layers(x, n_last)]


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the backbone's entries, without a ``teacher.backbone.`` / ``backbone.`` prefix."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _load_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    missing, unexpected = model.load_state_dict(_strip(state), strict=False)
    if missing:
        raise RaddinoError(f"{source}: {len(missing)} backbone parameters missing, e.g. {missing[0]}")
    if unexpected:
        log.warning("%s: %d entries not used by the backbone, e.g. %s", source, len(unexpected), unexpected[0])


def build_ours(path: str, *, weights: Path | None, random_init: bool, img_size: int | None, seed: int) -> Backbone:
    from raddino.build import backbone_from_config
    from raddino.config import load_config
    from raddino.interop.runs import run_pos_embed_interp

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise RaddinoError(f"ours:{path}: directory not found (expected a run directory or an exported directory)")
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise RaddinoError(f"ours:{path}: {config_file} not found (run and export directories hold config.yaml)")
    cfg = load_config(config_file)
    with torch_seed(seed):
        # `auto` was resolved against the run's init_from source when it trained; derived.json records the rule
        model = backbone_from_config(cfg.model, pos_embed_interp=run_pos_embed_interp(directory, cfg))
    exports = sorted(directory.glob("*.safetensors"))
    if weights is not None:
        _load_into(model, read_state_dict(weights), str(weights))
        source = str(weights)
    elif random_init:
        source = "random init"
    elif len(exports) == 1:
        _load_into(model, read_state_dict(exports[0]), str(exports[0]))
        source = str(exports[0])
    elif len(exports) > 1:
        raise RaddinoError(f"ours:{path}: several *.safetensors files; pass the one to use with --weights")
    else:
        from raddino.interop.runs import read_run_teacher  # the one reader of a run's checkpoints

        run = read_run_teacher(directory)
        _load_into(model, run.backbone, str(run.checkpoint))
        source = str(run.checkpoint)
    model.eval()
    size = img_size or int(cfg.crops.global_size)
    if size % model.patch_size:
        raise RaddinoError(f"ours:{path}: input size {size} is not a multiple of the patch size {model.patch_size}")
    preprocess = Preprocess(
        size=size,
        mean=tuple(float(v) for v in cfg.crops.mean),
        std=tuple(float(v) for v in cfg.crops.std),
        gray=True,
    )
    log.info("ours:%s: ViT-%s/%d from %s", path, cfg.model.arch, cfg.model.patch_size, source)
    return OursBackbone(spec=f"ours:{path}", model=model, preprocess=preprocess)
