"""KoLeo regulariser: Kozachenko-Leonenko differential-entropy estimate of the L2-normalised features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo loss ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows.

    Pushes each feature away from its nearest neighbour in the batch, spreading features uniformly on the sphere.
    The nearest neighbour (largest dot product, self excluded) is chosen without gradient; the gradient flows
    through both ends of each distance. The self-exclusion uses ``-inf`` on the diagonal (DINOv2 uses ``-1``, which
    can pick the point itself when all its neighbours are antipodal).

    Args:
        x: ``(B, D)`` features (B >= 2), computed in float32 whatever the input dtype or autocast state.
        eps: used in the normalisation, in the pairwise distance (as ``nn.PairwiseDistance(2, eps)``) and in the log.

    Returns:
        Scalar loss (float32).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs x of shape (B, D) with B >= 2, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-math.inf)
            nearest = dots.argmax(dim=1)  # (B,)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # (B,)
        return -torch.log(distances + eps).mean()
