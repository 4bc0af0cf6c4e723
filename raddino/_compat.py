"""Make torchvision importable next to a torch it was not built for, and stay out of the way everywhere else.

The only torchvision wheel matching torch 2.13.0 on some package indexes is a CUDA build. Next to a CPU torch its
compiled extension (``torchvision/_C.so``) does not load, so the ``torchvision::nms`` / ``torchvision::qnms``
operator schemas are never defined and ``import torchvision`` (and therefore ``import timm``) fails while
registering fake kernels for them with ``operator torchvision::nms does not exist``. Defining the two schemas
first lets the import succeed; we never call these ops (images are decoded with PIL, not ``torchvision.io``).

On a matched install (CPU or CUDA) the extension loads and defines the schemas itself in C++; defining them here
as well would make that registration abort the process (``Duplicate registration``). So the shim asks the only
question that decides it -- *can the extension load?* -- by loading it the way torchvision does
(``torch.ops.load_library``; a second load by torchvision is a no-op, the dynamic loader returns the same handle)
and defines the schemas only when that fails.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


def torchvision_extension() -> Path | None:
    """Path of torchvision's compiled ``_C`` extension, or None (torchvision not installed, or built without it).

    Found without importing torchvision (``find_spec`` of a top-level package runs none of its code).
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"_C{suffix}"
            if candidate.is_file():
                return candidate
    return None


def extension_loads(path: Path) -> bool:
    """Load ``path`` as torchvision will (``torch.ops.load_library``); False when the dynamic loader refuses it."""
    try:
        torch.ops.load_library(str(path))
    except OSError as err:  # undefined symbols of another torch build, or a missing libcudart
        log.debug("torchvision extension %s does not load: %s", path, err)
        return False
    return True


@functools.cache
def ensure_torchvision_importable() -> torch.library.Library | None:
    """Define the torchvision op schemas once, and only when torchvision's own extension cannot define them.

    Returns the ``Library`` holding the definitions (cached: a collected ``Library`` unregisters its schemas), or
    ``None`` when nothing was needed: torchvision absent or already imported, the ops already registered, or the
    extension loads (a matched install).
    """
    if "torchvision" in sys.modules or hasattr(torch.ops.torchvision, "nms"):
        return None
    if importlib.util.find_spec("torchvision") is None:
        return None
    extension = torchvision_extension()
    if extension is not None and extension_loads(extension):
        return None
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    return lib
