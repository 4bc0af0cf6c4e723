"""Model FLOPs of a training step, counted from the modules' shapes (for MFU in ``raddino bench train``).

Convention (as in PaLM / torchtitan MFU): one multiply-add is 2 FLOPs; only the matmul-like work is counted
(linear layers, the patch-embedding convolution, the attention score and value products); norms, activations,
softmax and losses are left out (a few % for ViTs). Backward costs 2x forward, so a trained tower costs 3x its
forward; recomputation by activation checkpointing is *not* model FLOPs and is not counted.

For a ViT with width D, T tokens (CLS + registers + patches) and linear layers of total size ``sum(in * out)`` per
block (12 D^2 for an MLP ratio of 4), one block's forward is ``2 T sum(in * out) + 4 T^2 D`` (QK^T and AV); the
patch embedding is ``2 (C p^2) D N`` for N patches. A DINO head on R rows is ``2 R sum(in * out)`` of its MLP plus
``2 R bottleneck K`` for the prototypes.

A DINOv2 step: the teacher runs forward on the G global crops (its DINO head on their CLS tokens, its iBOT head
on the M masked patches); the student runs forward + backward on the G global and L local crops (DINO head on
all G + L CLS tokens, iBOT head on the M masked patches).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def linear_flops(module: nn.Module, *, rows: int) -> int:
    """Forward FLOPs of every ``nn.Linear`` in ``module`` applied to ``rows`` rows: ``2 rows in out`` each."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def vit_forward_flops(backbone: nn.Module, *, image_size: int) -> int:
    """Forward FLOPs of :class:`raddino.models.vit.VisionTransformer` on one ``image_size`` square image."""
    p, d = backbone.patch_size, backbone.embed_dim
    n = (image_size // p) ** 2
    tokens = 1 + backbone.num_registers + n
    in_chans = backbone.patch_embed.proj.in_channels
    patch = 2 * in_chans * p * p * d * n
    blocks = sum(linear_flops(block, rows=tokens) + 4 * tokens * tokens * d for block in backbone.blocks)
    return patch + blocks


def head_flops(head: nn.Module, *, rows: int) -> int:
    """Forward FLOPs of a :class:`raddino.models.heads.DINOHead` on ``rows`` rows (MLP + prototypes)."""
    return linear_flops(head.mlp, rows=rows) + 2 * rows * head.bottleneck_dim * head.out_dim


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step (all images of the batch)."""

    teacher_forward: int
    student_forward: int

    @property
    def total(self) -> int:
        """Teacher forward + student forward and backward (3x)."""
        return self.teacher_forward + 3 * self.student_forward


def ssl_step_flops(
    model: nn.Module,
    *,
    batch_size: int,
    global_size: int,
    local_size: int,
    n_global: int,
    n_local: int,
    masked_patches: int,
) -> StepFlops:
    """FLOPs of one step of :class:`raddino.ssl.SSLMetaArch` on ``batch_size`` images; ``masked_patches`` is the
    number of masked patches M over the whole batch (iBOT head rows)."""
    student, teacher = model.student, model.teacher
    ibot = "ibot_head" if "ibot_head" in student else "dino_head"
    globals_, locals_ = n_global * batch_size, n_local * batch_size
    teacher_fwd = (
        globals_ * vit_forward_flops(teacher["backbone"], image_size=global_size)
        + head_flops(teacher["dino_head"], rows=globals_)
        + head_flops(teacher[ibot], rows=masked_patches)
    )
    student_fwd = (
        globals_ * vit_forward_flops(student["backbone"], image_size=global_size)
        + locals_ * vit_forward_flops(student["backbone"], image_size=local_size)
        + head_flops(student["dino_head"], rows=globals_ + locals_)
        + head_flops(student[ibot], rows=masked_patches)
    )
    return StepFlops(teacher_forward=teacher_fwd, student_forward=student_fwd)
