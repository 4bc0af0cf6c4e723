"""Student–teacher meta-architecture: DINO + iBOT + KoLeo losses and the EMA teacher.

The student sees every crop (global crops with iBOT masks, local crops unmasked); the teacher sees the global
crops only. Teacher targets are centred with Sinkhorn-Knopp (default) or an EMA center, both from
:mod:`raddino.losses.centering`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor, nn

from raddino.data.batch import SSLBatch
from raddino.losses.centering import centered_softmax, sinkhorn_knopp, update_center
from raddino.losses.dino import dino_loss
from raddino.losses.ibot import ibot_loss
from raddino.losses.koleo import koleo_loss
from raddino.models.vit import VisionTransformer


@dataclass
class SSLOutput:
    """Loss terms (scalars, fp32) and collapse monitors of one step."""

    loss: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor
    teacher_entropy: Tensor  # mean per-sample entropy (nats) of the teacher's CLS targets; 0 or log K = collapse
    # mean per-sample entropy (nats) of the student's CLS softmax at the student temperature, over all crops; near
    # log K = the student predicts uniform, so the DINO cross-entropy is log K whatever the targets (no bootstrap)
    student_entropy: Tensor
    student_std: Tensor  # std over the batch of L2-normalised student CLS features, averaged over dims

    def terms(self) -> dict[str, Tensor]:
        """The loss terms (what the non-finite guard checks)."""
        return {"dino": self.dino, "ibot": self.ibot, "koleo": self.koleo}

    def scalars(self) -> dict[str, Tensor]:
        """Every field by name: the loss, its terms and the monitors (what a metrics row logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class SSLMetaArch(nn.Module):
    """Holds ``student`` and ``teacher`` (each a ModuleDict with ``backbone``, ``dino_head``, optional ``ibot_head``).

    The teacher starts as a copy of the student without stochastic depth, never receives gradients, is updated by
    :meth:`update_teacher` and always stays in eval mode (:meth:`train` does not switch it): its targets are a
    deterministic function of its weights and the batch, as in DINOv2.
    """

    def __init__(
        self,
        *,
        backbone: VisionTransformer,
        dino_head: nn.Module,
        ibot_head: nn.Module | None,
        n_global: int,
        n_local: int,
        student_temp: float,
        centering: str,
        sinkhorn_iterations: int,
        center_momentum: float,
        dino_weight: float,
        ibot_weight: float,
        koleo_weight: float,
        pack_crops: bool = False,
    ) -> None:
        super().__init__()
        student = {"backbone": backbone, "dino_head": dino_head}
        if ibot_head is not None:
            student["ibot_head"] = ibot_head
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        # Drop path only regularises the student; on the teacher it would make the targets random.
        self.teacher["backbone"].set_drop_path_rate(0.0)
        self.teacher.eval()
        self.n_global = n_global
        self.n_local = n_local
        self.student_temp = student_temp
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.center_momentum = center_momentum
        self.dino_weight = dino_weight
        self.ibot_weight = ibot_weight
        self.koleo_weight = koleo_weight
        # one student backbone pass for global and local crops (VisionTransformer.forward_features_packed)
        self.pack_crops = pack_crops
        out_dim = dino_head.out_dim
        self.register_buffer("dino_center", torch.zeros(1, out_dim))
        self.register_buffer("ibot_center", torch.zeros(1, (ibot_head or dino_head).out_dim))

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Set the student's mode; the teacher stays in eval mode whatever ``mode`` is (it only computes targets)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def out_dim(self) -> int:
        """Number of DINO prototypes K (the DINO loss of a uniform student is log K)."""
        return self.student["dino_head"].out_dim

    def _ibot_head(self, tower: nn.ModuleDict) -> nn.Module:
        return tower["ibot_head"] if "ibot_head" in tower else tower["dino_head"]

    def _targets(self, logits: Tensor, *, temp: float, center_name: str, n_samples: Tensor | None = None) -> Tensor:
        """Teacher logits (N, K) -> target probabilities (N, K); updates the EMA center in ``centering`` mode."""
        logits = logits.float()
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp=temp, n_iters=self.sinkhorn_iterations, n_samples=n_samples)
        center = getattr(self, center_name)
        probs = centered_softmax(logits, center, temp)
        center.copy_(update_center(center, logits, self.center_momentum))
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch: SSLBatch, *, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """The teacher's half of a step: CLS targets (G, B, K) and masked-patch targets (M, K), no grad."""
        assert not batch.is_gray, "SSLMetaArch takes model input: call batch.normalized() on the device first"
        tower = self.teacher
        out = tower["backbone"].forward_features(batch.global_crops)
        cls_logits = tower["dino_head"](out.cls)
        patch_logits = self._ibot_head(tower)(out.patch[batch.masks])
        cls_probs = self._targets(cls_logits, temp=teacher_temp, center_name="dino_center")
        n_masked = batch.masks.sum().reshape(1).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n_masked)
        patch_probs = self._targets(patch_logits, temp=teacher_temp, center_name="ibot_center", n_samples=n_masked)
        return cls_probs.reshape(self.n_global, batch.batch_size, -1), patch_probs

    def forward(self, batch: SSLBatch, *, teacher_temp: float) -> SSLOutput:
        """One step's losses: :meth:`teacher_targets`, then :meth:`student_loss` against them."""
        return self.student_loss(batch, self.teacher_targets(batch, teacher_temp=teacher_temp))

    def student_loss(self, batch: SSLBatch, targets: tuple[Tensor, Tensor]) -> SSLOutput:
        """The student's half: forward of all crops, DINO + iBOT + KoLeo against ``targets`` (from
        :meth:`teacher_targets`), and the monitors. Separate so benchmarks can time the two halves."""
        assert not batch.is_gray, "SSLMetaArch takes model input: call batch.normalized() on the device first"
        cls_targets, patch_targets = targets
        tower = self.student
        backbone = tower["backbone"]
        if self.n_local and self.pack_crops:
            glob, loc = backbone.forward_features_packed([batch.global_crops, batch.local_crops], [batch.masks, None])
            cls_tokens = [glob.cls, loc.cls]
        else:
            glob = backbone.forward_features(batch.global_crops, masks=batch.masks)
            cls_tokens = [glob.cls]
            if self.n_local:
                cls_tokens.append(backbone.forward_features(batch.local_crops).cls)
        cls_logits = tower["dino_head"](torch.cat(cls_tokens)).float()
        n_crops = self.n_global + self.n_local
        dino = dino_loss(cls_logits.reshape(n_crops, batch.batch_size, -1), cls_targets, self.student_temp)
        patch_logits = self._ibot_head(tower)(glob.patch[batch.masks]).float()
        ibot = ibot_loss(patch_logits, patch_targets, batch.masks, self.student_temp)
        koleo = sum(koleo_loss(c) for c in glob.cls.float().chunk(self.n_global))
        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        with torch.no_grad():
            entropy = -(cls_targets * cls_targets.clamp_min(1e-12).log()).sum(-1).mean()
            student_log_p = torch.log_softmax(cls_logits.detach() / self.student_temp, dim=-1)
            student_entropy = -(student_log_p.exp() * student_log_p).sum(-1).mean()
            student_std = nn.functional.normalize(glob.cls.float(), dim=-1).std(0).mean()
        return SSLOutput(
            loss=loss,
            dino=dino.detach(),
            ibot=ibot.detach(),
            koleo=koleo.detach(),
            teacher_entropy=entropy,
            student_entropy=student_entropy,
            student_std=student_std,
        )

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher = momentum * teacher + (1 - momentum) * student, over all parameters at once."""
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
