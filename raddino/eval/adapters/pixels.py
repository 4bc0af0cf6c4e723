"""``pixels`` / ``pixels:SIZE`` -- no model: the preprocessed gray image itself, flattened (the raw-pixel floor)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone, Preprocess, Tokens

PIXELS_SIZE = 28  # pixels baseline default: MedMNIST's native size (the raw-pixel floor on PneumoniaMNIST)


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
