"""Teacher targets: EMA centering + centered softmax (DINO) and Sinkhorn-Knopp (DINOv2).

Written once and used for both the DINO CLS targets and the iBOT masked-patch targets. All functions here
produce *teacher* quantities and run under ``torch.no_grad``: targets never carry gradients.

Distributed semantics: ``group=None`` means the default process group when ``torch.distributed`` is initialised,
otherwise everything is local. Batch statistics (center mean, Sinkhorn sums) are taken over the rows of *all*
ranks, so N rows split over R ranks give the same result as N rows on one process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def _all_reduce_(tensor: Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> Tensor:
    """In-place all-reduce when distributed; a no-op otherwise."""
    if _distributed():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


@torch.no_grad()
def update_center(
    center: Tensor, teacher_logits: Tensor, momentum: float, group: dist.ProcessGroup | None = None
) -> Tensor:
    """EMA update of the DINO/iBOT center with the global batch mean of the teacher logits.

    Args:
        center: ``(1, K)`` current center.
        teacher_logits: ``(N, K)`` teacher logits of this rank (N may differ between ranks, N may be 0).
        momentum: EMA momentum ``m``; ``new = m * center + (1 - m) * mean``.
        group: process group for the all-reduce.

    Returns:
        ``(1, K)`` new center (detached, dtype of ``center``). Unchanged when no rank has any row.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
    if teacher_logits.ndim != 2 or center.shape != (1, teacher_logits.shape[1]):
        raise ValueError(
            f"expected center (1, K) and teacher_logits (N, K), got {tuple(center.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    k = teacher_logits.shape[1]
    # Sum and row count travel in one all-reduce; dividing by the global count (not N * world_size) keeps the
    # mean exact when ranks hold different numbers of rows (e.g. masked patches).
    stats = torch.empty(k + 1, dtype=torch.float32, device=teacher_logits.device)
    stats[:k] = teacher_logits.detach().float().sum(dim=0)
    stats[k] = teacher_logits.shape[0]
    _all_reduce_(stats, dist.ReduceOp.SUM, group)
    count = stats[k]
    batch_mean = (stats[:k] / count.clamp_min(1.0)).unsqueeze(0)
    old = center.detach().float()
    new = old * momentum + batch_mean * (1.0 - momentum)
    # torch.where instead of `if count == 0` avoids a host sync on accelerators.
    return torch.where(count > 0, new, old).to(center.dtype)


@torch.no_grad()
def centered_softmax(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """DINO teacher targets ``softmax((logits - center) / temp)`` over the prototypes.

    Args:
        teacher_logits: ``(N, K)``.
        center: ``(1, K)``.
        temp: teacher temperature (> 0).

    Returns:
        ``(N, K)`` float32 probabilities (rows sum to 1).
    """
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    return torch.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


def _logsumexp_over_samples(log_q: Tensor, scratch: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Global ``logsumexp`` of ``log_q (N, K)`` over the sample dim (all ranks) -> ``(K,)``.

    Uses the all-reduced max so that the result is exact and overflow/underflow free; ``scratch`` is an
    ``(N, K)`` buffer reused to keep peak memory at two ``(N, K)`` tensors.
    """
    n, k = log_q.shape
    peak = log_q.amax(dim=0) if n else log_q.new_full((k,), -math.inf)
    _all_reduce_(peak, dist.ReduceOp.MAX, group)
    # A column with no finite entry anywhere (only possible for empty inputs) must not produce inf - inf = nan.
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.sub(log_q, peak, out=scratch).exp_().sum(dim=0)
    _all_reduce_(total, dist.ReduceOp.SUM, group)
    return total.log_().add_(peak)


def _logsumexp_over_prototypes(log_q: Tensor, scratch: Tensor) -> Tensor:
    """Local ``logsumexp`` of ``log_q (N, K)`` over the prototype dim -> ``(N, 1)`` (each row is one sample)."""
    peak = log_q.amax(dim=1, keepdim=True)
    total = torch.sub(log_q, peak, out=scratch).exp_().sum(dim=1, keepdim=True)
    return total.log_().add_(peak)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iters: int = 3,
    n_samples: int | Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher: balanced soft assignment of samples to prototypes.

    Same algorithm as DINOv2's ``SinkhornKnopp``: with ``Q = exp(logits / temp)`` (prototypes x samples),
    normalise Q by its global sum, then ``n_iters`` times make every prototype row sum to ``1/K`` (global row
    sums) and every sample column sum to ``1/B``; finally ``Q *= B``. It runs in the log domain in float32, which is
    mathematically identical but cannot overflow (DINOv2 exponentiates raw ``logits / temp``) or underflow a whole
    row/column to zero.

    Args:
        teacher_logits: ``(N, K)`` teacher logits of this rank (any float dtype; N may differ between ranks only
            when ``n_samples`` is given).
        temp: teacher temperature (> 0).
        n_iters: Sinkhorn iterations (DINOv2: 3).
        n_samples: global number of samples B. Default ``N * world_size``; pass it when ranks hold different N
            (iBOT masked patches), e.g. the all-reduced mask count. May be a tensor (no host sync).
        group: process group for the all-reduces.

    Returns:
        ``(N, K)`` float32 targets: every row sums to 1 exactly; summed over all ranks, every prototype column
        sums to approximately ``B / K`` (exactly before the last sample normalisation).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be (N, K), got shape {tuple(teacher_logits.shape)}")
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    n, k = teacher_logits.shape
    if n_samples is None:
        n_samples = n * _world_size(group)
    log_b = torch.as_tensor(n_samples, dtype=torch.float32, device=teacher_logits.device).reshape(()).log()

    # Rows of log_q are samples and columns prototypes (DINOv2's Q transposed); no transpose copy is needed.
    log_q = teacher_logits.float() / temp
    scratch = torch.empty_like(log_q)
    log_q -= _logsumexp_over_samples(log_q, scratch, group).logsumexp(dim=0)  # Q /= sum(Q)
    for _ in range(n_iters):
        log_q -= _logsumexp_over_samples(log_q, scratch, group).add_(math.log(k))  # prototypes sum to 1/K
        log_q -= _logsumexp_over_prototypes(log_q, scratch).add_(log_b)  # samples sum to 1/B
    return log_q.add_(log_b).exp_()  # Q *= B: each sample's row is a distribution
