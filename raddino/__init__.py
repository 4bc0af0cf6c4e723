"""raddino: self-supervised domain pretraining of vision transformers on radiographs (the RAD-DINO recipe)."""

from raddino._compat import ensure_torchvision_importable

# Must run before anything imports torchvision or timm (see raddino/_compat.py).
ensure_torchvision_importable()

__version__ = "0.1.0"
