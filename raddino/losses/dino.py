"""DINO loss: cross-entropy between teacher targets and student predictions of the CLS token over crop pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Mean over crop pairs ``(s, t)`` with ``s != t`` of the batch-mean cross-entropy.

    For every pair, ``CE = -sum_k teacher[t, b, k] * log_softmax(student[s, b] / student_temp)_k`` averaged over b.
    Student crops ``0..T-1`` are the same global crops as the teacher's, so the pairs ``(t, t)`` are skipped
    (a crop is never asked to predict itself); all ``S * T - T`` remaining pairs get equal weight, which is
    DINOv2's weighting of the global and local terms.

    Args:
        student_logits: ``(S, B, K)`` student head outputs, global crops first then local crops (S >= T).
        teacher_probs: ``(T, B, K)`` teacher targets of the global crops (centered softmax or Sinkhorn-Knopp).
        student_temp: student temperature (> 0).

    Returns:
        Scalar loss (float32).
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student (S, B, K) and teacher (T, B, K), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    n_student, batch, k = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, k) or n_student < n_teacher:
        raise ValueError(
            f"incompatible student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_probs.shape)}: need S >= T and equal (B, K)"
        )
    n_pairs = n_student * n_teacher - n_teacher
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least one crop pair with s != t (got S = T = 1)")
    if student_temp <= 0:
        raise ValueError(f"student temperature must be > 0, got {student_temp}")
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    teacher_probs = teacher_probs.float()
    # (S, T) batch-mean cross-entropies. Elementwise products rather than a matmul: a matmul may run in TF32 on
    # GPUs, which would cost ~3 significant digits in the loss and its gradient.
    ce = torch.stack([-(log_probs * teacher_probs[t]).sum(dim=-1).mean(dim=-1) for t in range(n_teacher)], dim=1)
    keep = torch.ones(n_student, n_teacher, dtype=ce.dtype, device=ce.device)
    keep[:n_teacher].fill_diagonal_(0.0)  # a multiplicative mask, not ce[bool_mask], avoids a host sync on GPUs
    return (ce * keep).sum() / n_pairs
