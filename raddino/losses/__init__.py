"""SSL losses: DINO, iBOT, KoLeo, and teacher centering (EMA center, Sinkhorn-Knopp)."""

from __future__ import annotations

from raddino.losses.centering import centered_softmax, sinkhorn_knopp, update_center
from raddino.losses.dino import dino_loss
from raddino.losses.ibot import ibot_loss
from raddino.losses.koleo import koleo_loss

__all__ = ["centered_softmax", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp", "update_center"]
