"""iBOT loss: cross-entropy between teacher and student predictions of the masked patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ibot_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """DINOv2's ``forward_masked`` normalisation of the masked-patch cross-entropy.

    Each image's masked patches share a total weight of 1 (weight ``1 / its masked count``), so images with many
    masked patches do not dominate; the weighted sum is divided by the number of images ``G * B`` including those
    with no masked patch.

    Args:
        student_logits: ``(M, K)`` student head outputs of the masked patches, in ``masks[masks]`` order
            (image-major, then patch index).
        teacher_probs: ``(M, K)`` teacher targets of the same patches.
        masks: ``(G * B, N)`` bool, True = masked; ``M == masks.sum()``.
        student_temp: student temperature (> 0).

    Returns:
        Scalar loss (float32). With ``M == 0`` it is a zero that is still part of ``student_logits``' graph, so
        ``backward()`` works on every rank even when one rank drew no masks.
    """
    if student_logits.ndim != 2 or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of equal shape (M, K), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a (G*B, N) bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    if student_temp <= 0:
        raise ValueError(f"student temperature must be > 0, got {student_temp}")
    per_image = 1.0 / masks.sum(dim=-1).clamp_min(1).float()  # (G*B,)
    weights = per_image.unsqueeze(-1).expand_as(masks)[masks]  # (M,) in masks[masks] order
    if weights.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"masks select {weights.shape[0]} patches but student_logits has {student_logits.shape[0]} rows"
        )
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -(teacher_probs.float() * log_probs).sum(dim=-1)  # (M,)
    # For M == 0 this is sum() of an empty tensor: 0 with a grad_fn leading back to student_logits.
    return (ce * weights).sum() / masks.shape[0]
