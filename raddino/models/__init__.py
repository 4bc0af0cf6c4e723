"""Vision transformer backbone and projection heads (architecture only)."""

from raddino.models.heads import DINOHead
from raddino.models.vit import ARCHS, ArchSpec, BackboneOutput, VisionTransformer, build_backbone

__all__ = ["ARCHS", "ArchSpec", "BackboneOutput", "DINOHead", "VisionTransformer", "build_backbone"]
