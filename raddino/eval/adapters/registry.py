"""The spec registry: one interface from images to features for our checkpoints and off-the-shelf models.

A backbone is named by a spec string:

* ``timm:NAME`` -- any timm model: DINOv2 ``vit_*_patch14_dinov2*``, ImageNet ``resnet50`` / ``vit_base_patch16_224``,
  SAM's image encoder ``samvit_base_patch16``, FocalNet (SEEM's backbone) ``focalnet_*``;
* ``hf:PATH_OR_ID`` -- a Hugging Face ``transformers`` vision model: ``Dinov2Model`` (RAD-DINO, DINOv2, also with
  registers) or a BLIP vision encoder (``BlipVisionModel``, or the ``vision_model`` of a full BLIP checkpoint);
* ``open_clip:ARCH/TAG`` -- an OpenCLIP image tower (optional extra: ``pip install 'raddino[open_clip]'``);
* ``ours:PATH`` -- a raddino run directory (teacher of the newest checkpoint) or an exported directory;
* ``pixels`` / ``pixels:SIZE`` -- no model: the preprocessed gray image itself, flattened (the raw-pixel floor).

Each prefix is one module of :mod:`raddino.eval.adapters` (imported only when its spec is built, so optional
libraries stay optional); the adapter interface and the feature protocols live in
:mod:`raddino.eval.adapters.base`.

Weights come from each library's usual source (timm / Hugging Face hub downloads on a user's machine); ``weights``
loads a local file instead; ``random_init`` builds the architecture with seeded random weights and never downloads
(tests, baselines). ``img_size`` overrides the input size (ViTs interpolate their position embeddings): SAM's
native 1024 px is impractical on a CPU, so tests and quick runs build it at e.g. 64 px.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone

log = logging.getLogger(__name__)

# spec prefix -> (module of raddino.eval.adapters, builder name); a module is imported on first use
BUILDERS = {
    "timm": ("timm", "build_timm"),
    "hf": ("hf", "build_hf"),
    "open_clip": ("open_clip", "build_open_clip"),
    "ours": ("ours", "build_ours"),
    "pixels": ("pixels", "build_pixels"),
}
BACKBONE_KINDS = tuple(BUILDERS)


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
    module, builder_name = BUILDERS[kind]
    builder = getattr(importlib.import_module(f"raddino.eval.adapters.{module}"), builder_name)
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
