"""Make torchvision importable next to a CPU-only torch.

The only torchvision wheel matching torch 2.13.0 on our package index is a CUDA build. With a CPU torch its
compiled extension does not load, so the ``torchvision::nms`` / ``torchvision::qnms`` operator schemas are never
defined and ``import torchvision`` (and therefore ``import timm``) fails while registering fake kernels for them
with ``operator torchvision::nms does not exist``. Defining the two schemas first lets the import succeed; we never
call these ops (images are decoded with PIL, not ``torchvision.io``). On a normal install the ops already exist and
this does nothing.
"""

from __future__ import annotations

import functools

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


@functools.cache
def ensure_torchvision_importable() -> torch.library.Library | None:
    """Define the missing torchvision op schemas once, before torchvision is first imported.

    Returns the ``Library`` holding the definitions (cached: a collected ``Library`` unregisters its schemas),
    or ``None`` when torchvision's own extension already provides them.
    """
    if hasattr(torch.ops.torchvision, "nms"):
        return None
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    return lib
