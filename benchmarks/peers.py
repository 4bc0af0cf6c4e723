"""Time one DINOv2-style training step of the peers raddino is compared with, on one device, from one synthetic batch.

Peers ("what a user would pick instead of raddino"):

* ``dinov2``: Meta's own modules from the ``dinov2`` package (``vit_base``, ``DINOHead``, ``DINOLoss``,
  ``iBOTPatchLoss``, ``KoLeoLoss``) assembled the way ``SSLMetaArch.forward_backward`` assembles them. Meta's
  ``ssl_meta_arch`` asserts xFormers at import and its nested-tensor blocks need it, so the student runs one forward
  per crop size instead of one packed forward; attention is what Meta's ``MemEffAttention`` does without xFormers
  (an explicit ``softmax(q k^T) v``), or xFormers' kernel where it is installed.
* ``dinov2-sdpa``: the same, with each block's attention computed by ``F.scaled_dot_product_attention`` -- the
  stand-in for xFormers' fused kernel that Meta would use on a machine that has it.
* ``lightly``: lightly's ``DINOLoss`` / ``IBOTPatchLoss`` / ``KoLeoLoss`` / ``DINOv2ProjectionHead`` and
  ``MaskedVisionTransformerTIMM`` on a timm ``vit_base_patch14_dinov2``, assembled as lightly's DINOv2 example does.

Every peer gets the same batch (generated once on the device, so only the step is timed; the loader is measured by
``raddino bench loader``), the same recipe numbers as raddino's defaults (ViT-B/14, 65536 shared prototypes, teacher
temperature 0.07, student 0.1, KoLeo 0.1, uniform drop path 0.1, LayerScale 1e-5, grad clip 3.0, AdamW), bf16
autocast on CUDA (fp32 on CPU), then AdamW and an EMA teacher update. raddino itself is timed by
``raddino bench train`` (command printed and stored in peers.json).

Writes ``peers.json`` and ``peers.md`` under ``--out``. A peer whose package is missing is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

# before timm / lightly: raddino makes torchvision (which they import) loadable next to a torch it was not built for
import raddino  # noqa: F401

PEERS = {
    "dinov2": ("DINOv2 official model + loss code, per-crop forward (no xformers packing)", ["dinov2"]),
    "dinov2-sdpa": (
        "DINOv2 official model + loss code, per-crop forward (no xformers packing), attention via torch SDPA",
        ["dinov2"],
    ),
    "lightly": (
        "lightly losses + heads on timm vit_base_patch14_dinov2 (MaskedVisionTransformerTIMM)",
        ["lightly", "timm"],
    ),
}
RADDINO_COMMAND = "raddino bench train --arch base --batch {batch} --precision bf16 --steps {steps} --warmup {warmup}"


@dataclass(frozen=True)
class Shape:
    """Architecture and crop geometry of one comparison (the real one, or the tiny CPU smoke)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch: int
    global_size: int
    local_size: int
    n_local: int
    prototypes: int
    hidden_dim: int
    bottleneck_dim: int
    vit_base: bool  # use the packages' ViT-B constructors as such (not a tiny stand-in with the same classes)

    @property
    def grid(self) -> int:
        return self.global_size // self.patch


FULL = Shape(768, 12, 12, 14, 224, 98, 8, 65536, 2048, 256, True)
SMOKE = Shape(192, 2, 3, 14, 56, 28, 8, 1024, 256, 64, False)

# recipe numbers shared by all peers (raddino's defaults = DINOv2's ViT-L/g recipe)
TEACHER_TEMP = 0.07
STUDENT_TEMP = 0.1
KOLEO_WEIGHT = 0.1
DROP_PATH = 0.1
LAYERSCALE = 1e-5
CLIP_GRAD = 3.0
EMA_MOMENTUM = 0.994
LR = 1e-4
WEIGHT_DECAY = 0.04
MASK_PROB = 0.5
MASK_RATIO = (0.1, 0.5)


@dataclass
class Batch:
    """One synthetic multi-crop batch, crop-major like DINOv2's collate (all images of crop 0, then crop 1, ...).

    global_crops: (2B, 3, G, G); local_crops: (n_local*B, 3, L, L); masks: (2B, N) bool over the N = (G/p)^2 patches;
    mask_indices: (M,) flat indices of the masked patches in masks; masks_weight: (M,) 1 / (masked patches of that
    image); n_masked: (1,) long, M; upperbound: Meta's padded size of the masked-patch buffer (>= M).
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor
    mask_indices: torch.Tensor
    masks_weight: torch.Tensor
    n_masked: torch.Tensor
    upperbound: int


def make_batch(shape: Shape, batch: int, device: torch.device, seed: int = 0) -> Batch:
    """Random crops and iBOT masks: half of the 2B global crops get 10-50 % of their patches masked.

    The ratios are spread over [0.1, 0.5] as in DINOv2's collate (one sub-interval per masked image); positions are
    random rather than blocks, which changes nothing the step's cost depends on (only the counts matter).
    """
    g = torch.Generator().manual_seed(seed)
    n_glob = 2 * batch
    n_patch = shape.grid**2
    n_masked_imgs = int(n_glob * MASK_PROB)
    probs = torch.linspace(*MASK_RATIO, n_masked_imgs + 1)
    masks = torch.zeros(n_glob, n_patch, dtype=torch.bool)
    upperbound = 0
    for i in range(n_masked_imgs):
        lo, hi = float(probs[i]), float(probs[i + 1])
        k = int(n_patch * (lo + (hi - lo) * float(torch.rand((), generator=g))))
        masks[i, torch.randperm(n_patch, generator=g)[:k]] = True
        upperbound += int(n_patch * hi)
    masks = masks[torch.randperm(n_glob, generator=g)]
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return Batch(
        global_crops=torch.randn(n_glob, 3, shape.global_size, shape.global_size, generator=g).to(device),
        local_crops=torch.randn(shape.n_local * batch, 3, shape.local_size, shape.local_size, generator=g).to(device),
        masks=masks.to(device),
        mask_indices=mask_indices.to(device),
        masks_weight=masks_weight.to(device),
        n_masked=torch.full((1,), mask_indices.numel(), dtype=torch.long, device=device),
        upperbound=upperbound,
    )


def ema_update(student: list[torch.nn.Parameter], teacher: list[torch.nn.Parameter], m: float) -> None:
    """teacher = m * teacher + (1 - m) * student, as two foreach kernels (what SSLMetaArch.update_teacher does)."""
    with torch.no_grad():
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1 - m)


# ----------------------------------------------------------------------------------------------------------- dinov2
@contextlib.contextmanager
def single_rank_group(device: torch.device):
    """A one-rank process group for Meta's loss code.

    ``iBOTPatchLoss.sinkhorn_knopp_teacher`` calls ``dist.all_reduce`` without checking ``dist.is_initialized()``
    (Meta always trains distributed), so without a group it raises. A file store needs no network.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _sdpa_attention_class():
    """Meta's ``MemEffAttention`` with its forward computed by torch's fused SDPA (same parameters, same math)."""
    from dinov2.layers.attention import MemEffAttention

    class SDPAAttention(MemEffAttention):
        def forward(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
            if attn_bias is not None:
                raise ValueError("nested-tensor attention bias needs xFormers")
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            return self.proj_drop(self.proj(x))

    return SDPAAttention


def build_dinov2(shape: Shape, b: Batch, device: torch.device, *, sdpa: bool, centering: str):
    """Student/teacher from Meta's modules; returns (step function, notes). The step returns its loss terms."""
    from dinov2.layers import DINOHead
    from dinov2.layers import attention as dinov2_attention
    from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
    from dinov2.models import vision_transformer as vits

    def backbone(drop_path: float) -> torch.nn.Module:
        kw = dict(
            img_size=shape.global_size,
            init_values=LAYERSCALE,
            block_chunks=0,
            drop_path_rate=drop_path,
            drop_path_uniform=True,
            ffn_layer="mlp",
        )
        if shape.vit_base:
            return vits.vit_base(patch_size=shape.patch, **kw)
        # vit_base's own classes (NestedTensorBlock + MemEffAttention), smaller
        return vits.DinoVisionTransformer(
            patch_size=shape.patch,
            embed_dim=shape.embed_dim,
            depth=shape.depth,
            num_heads=shape.num_heads,
            mlp_ratio=4,
            block_fn=partial(vits.Block, attn_class=dinov2_attention.MemEffAttention),
            **kw,
        )

    def head() -> torch.nn.Module:
        return DINOHead(
            in_dim=shape.embed_dim,
            out_dim=shape.prototypes,
            hidden_dim=shape.hidden_dim,
            bottleneck_dim=shape.bottleneck_dim,
            nlayers=3,
        )

    student_bb, student_head = backbone(DROP_PATH).to(device), head().to(device)
    teacher_bb, teacher_head = backbone(0.0).to(device), head().to(device)
    if sdpa:
        cls = _sdpa_attention_class()
        for m in (student_bb, teacher_bb):
            for blk in m.blocks:
                blk.attn.__class__ = cls
    teacher_bb.load_state_dict(student_bb.state_dict())
    teacher_head.load_state_dict(student_head.state_dict())
    for m in (teacher_bb, teacher_head):
        m.eval().requires_grad_(False)
    student_bb.train()
    student_head.train()
    dino_loss = DINOLoss(shape.prototypes, student_temp=STUDENT_TEMP).to(device)
    ibot_loss = iBOTPatchLoss(shape.prototypes, student_temp=STUDENT_TEMP).to(device)
    koleo_loss = KoLeoLoss().to(device)
    s_params = list(student_bb.parameters()) + list(student_head.parameters())
    t_params = list(teacher_bb.parameters()) + list(teacher_head.parameters())
    opt = torch.optim.AdamW(s_params, lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999))
    n_local = shape.n_local
    n_loss_terms = (2 - 1) * 2 + 2 * n_local  # global-vs-global + local-vs-global, SSLMetaArch's normaliser
    m_count = int(b.n_masked.item())  # Meta reads this from the collate on the host too (mask_indices_list.shape)

    @torch.no_grad()
    def teacher_targets():
        out = teacher_bb(b.global_crops, is_training=True)
        cls = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((cls[1], cls[0]))  # swapped so crop A's student is matched to crop B's teacher
        patches = out["x_norm_patchtokens"]
        n_cls = cls.shape[0]
        # shared head: CLS and masked patch tokens through one head call, in Meta's padded buffer
        buf = patches.new_zeros(b.upperbound + n_cls, patches.shape[-1])
        buf[:n_cls].copy_(cls)
        torch.index_select(patches.flatten(0, 1), 0, b.mask_indices, out=buf[n_cls : n_cls + m_count])
        after = teacher_head(buf)
        t_cls, t_masked = after[:n_cls], after[n_cls : n_cls + m_count]
        if centering == "sinkhorn_knopp":
            t_dino = dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp=TEACHER_TEMP).view(2, -1, t_cls.shape[-1])
            t_ibot = ibot_loss.sinkhorn_knopp_teacher(
                t_masked, teacher_temp=TEACHER_TEMP, n_masked_patches_tensor=b.n_masked.clone()
            )
        else:
            t_dino = dino_loss.softmax_center_teacher(t_cls, teacher_temp=TEACHER_TEMP).view(2, -1, t_cls.shape[-1])
            dino_loss.update_center(t_cls)
            t_masked = t_masked.unsqueeze(0)
            t_ibot = ibot_loss.softmax_center_teacher(t_masked, teacher_temp=TEACHER_TEMP).squeeze(0)
            ibot_loss.update_center(t_masked)
        return t_dino, t_ibot

    def step(autocast) -> dict[str, torch.Tensor]:
        with autocast:
            t_dino, t_ibot = teacher_targets()
            # one forward per crop size: Meta packs both into one xFormers block-diagonal forward
            s_glob = student_bb(b.global_crops, masks=b.masks, is_training=True)
            s_loc = student_bb(b.local_crops, masks=None, is_training=True)
            patches = s_glob["x_norm_patchtokens"]
            buf = patches.new_zeros(b.upperbound, patches.shape[-1])
            buf[:m_count].copy_(torch.index_select(patches.flatten(0, 1), 0, b.mask_indices))
            # one head call over [local CLS | global CLS | masked patches], as Meta's packed head call (per token)
            parts = [s_loc["x_norm_clstoken"], s_glob["x_norm_clstoken"], buf]
            outs = student_head(torch.cat(parts)).split([p.shape[0] for p in parts])
            s_loc_out, s_glob_out, s_masked_out = outs[0], outs[1], outs[2][:m_count]
            dino_local = dino_loss(list(s_loc_out.chunk(n_local)), t_dino) / n_loss_terms
            dino_global = dino_loss([s_glob_out], [t_dino.flatten(0, 1)]) * 2 / n_loss_terms
            koleo = KOLEO_WEIGHT * sum(koleo_loss(p) for p in s_glob["x_norm_clstoken"].chunk(2))
            ibot = (
                ibot_loss.forward_masked(
                    s_masked_out,
                    t_ibot,
                    student_masks_flat=b.masks,
                    n_masked_patches=m_count,
                    masks_weight=b.masks_weight,
                )
                * 2
                * 0.5
            )
            loss = dino_local + dino_global + koleo + ibot
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, CLIP_GRAD)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(s_params, t_params, EMA_MOMENTUM)
        return {
            "dino_local": dino_local.detach(),
            "dino_global": dino_global.detach(),
            "koleo": koleo.detach(),
            "ibot": ibot.detach(),
            "total": loss.detach(),
        }

    xformers = importlib.util.find_spec("xformers") is not None
    attn = (
        "torch SDPA"
        if sdpa
        else ("xFormers memory_efficient_attention" if xformers else "Meta's fallback softmax(q k^T) v (no xFormers)")
    )
    notes = [
        f"attention: {attn}",
        f"teacher: {centering}",
        "EMA: torch._foreach_mul_/_foreach_add_",
        "AdamW (torch default, foreach), one param group; Meta: layer-wise lr decay groups, fp16 + GradScaler",
        "student: one forward per crop size (Meta: one xFormers-packed forward)",
    ]
    return step, notes, sum(p.numel() for p in s_params)


# ----------------------------------------------------------------------------------------------------------- lightly
def build_lightly(shape: Shape, b: Batch, device: torch.device):
    """Student/teacher as lightly's DINOv2 example; returns (step function, notes). The step returns its loss terms."""
    import timm
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_drop_path_rate

    kw = dict(pretrained=False, img_size=shape.global_size, init_values=LAYERSCALE, dynamic_img_size=True)
    if not shape.vit_base:
        kw.update(embed_dim=shape.embed_dim, depth=shape.depth, num_heads=shape.num_heads)
    vit = timm.create_model("vit_base_patch14_dinov2", **kw)
    teacher_bb = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
    student_bb = copy.deepcopy(teacher_bb)
    update_drop_path_rate(student_bb.vit, drop_path_rate=DROP_PATH, mode="uniform")

    def head() -> torch.nn.Module:
        return DINOv2ProjectionHead(
            input_dim=shape.embed_dim,
            hidden_dim=shape.hidden_dim,
            bottleneck_dim=shape.bottleneck_dim,
            output_dim=shape.prototypes,
        )

    student_head = head()  # shared DINO / iBOT head (separate_head: false)
    teacher_head = head()  # built, not deep-copied: weight_norm's derived weight refuses deepcopy
    teacher_head.load_state_dict(student_head.state_dict())
    student_bb, student_head, teacher_bb, teacher_head = (
        m.to(device) for m in (student_bb, student_head, teacher_bb, teacher_head)
    )
    for m in (teacher_bb, teacher_head):
        m.eval().requires_grad_(False)
    student_bb.train()
    student_head.train()
    dino_crit = DINOLoss(output_dim=shape.prototypes, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP).to(device)
    ibot_crit = IBOTPatchLoss(output_dim=shape.prototypes, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP).to(
        device
    )
    koleo_crit = KoLeoLoss().to(device)
    s_params = list(student_bb.parameters()) + list(student_head.parameters())
    t_params = list(teacher_bb.parameters()) + list(teacher_head.parameters())
    opt = torch.optim.AdamW(s_params, lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999))
    # lightly's masks: (2B, 1 + N) token mask with the CLS column unmasked, and the (2B, h, w) patch mask for the loss
    block_mask = b.masks.view(-1, shape.grid, shape.grid)
    token_mask = F.pad(b.masks, (1, 0), value=False)
    n_views = 2 + shape.n_local

    def step(autocast) -> dict[str, torch.Tensor]:
        with autocast:
            with torch.no_grad():
                t_feat = teacher_bb.encode(b.global_crops)
                t_cls_out = teacher_head(t_feat[:, 0])
                t_masked_out = teacher_head(t_feat[token_mask])
            s_glob = student_bb.encode(b.global_crops, mask=token_mask)
            s_glob_cls = s_glob[:, 0]
            s_glob_cls_out = student_head(s_glob_cls)
            s_masked_out = student_head(s_glob[token_mask])
            s_loc_cls_out = student_head(student_bb.encode(b.local_crops)[:, 0])
            s_cls_out = torch.cat([s_glob_cls_out, s_loc_cls_out])
            dino = dino_crit(
                teacher_out=list(t_cls_out.chunk(2)),
                student_out=list(s_cls_out.chunk(n_views)),
                teacher_temp=TEACHER_TEMP,
            )
            ibot = ibot_crit(
                teacher_out=t_masked_out, student_out=s_masked_out, mask=block_mask, teacher_temp=TEACHER_TEMP
            )
            koleo = KOLEO_WEIGHT * sum(koleo_crit(t) for t in s_glob_cls.chunk(2))
            loss = dino + ibot + koleo
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, CLIP_GRAD)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(s_params, t_params, EMA_MOMENTUM)  # = lightly.models.utils.update_momentum (foreach)
        return {"dino": dino.detach(), "koleo": koleo.detach(), "ibot": ibot.detach(), "total": loss.detach()}

    notes = [
        "teacher: centering (lightly's DINOLoss/IBOTPatchLoss have no Sinkhorn-Knopp)",
        "attention: timm (F.scaled_dot_product_attention)",
        "EMA: torch._foreach_mul_/_foreach_add_",
        "AdamW (torch default, foreach), one param group",
        "student: one forward per crop size; masked tokens gathered with boolean indexing (host sync)",
    ]
    return step, notes, sum(p.numel() for p in s_params)


# ------------------------------------------------------------------------------------------------------------ timing
def time_steps(step: Callable, autocast, device: torch.device, *, warmup: int, steps: int):
    """Run warmup + steps; per timed step the device time in ms (CUDA events, one sync per step) and last losses."""
    times: list[float] = []
    losses: dict[str, torch.Tensor] = {}
    for i in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses = step(autocast)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            losses = step(autocast)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times, {k: float(v) for k, v in losses.items()}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def run_peer(name: str, shape: Shape, args, device: torch.device, missing: set[str]) -> dict:
    label, packages = PEERS[name]
    absent = [p for p in packages if p in missing or importlib.util.find_spec(p) is None]
    if absent:
        reason = f"package(s) not installed: {', '.join(absent)} (see benchmarks/fetch_gpu_wheels.sh)"
        print(f"[peers] {name}: skipped, {reason}", flush=True)
        return {"label": label, "status": "skipped", "reason": reason}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    b = make_batch(shape, args.batch, device)
    centering = args.dinov2_centering
    group = single_rank_group(device) if name.startswith("dinov2") else contextlib.nullcontext()
    try:
        with group:
            if name.startswith("dinov2"):
                step, notes, n_params = build_dinov2(shape, b, device, sdpa=name == "dinov2-sdpa", centering=centering)
            else:
                step, notes, n_params = build_lightly(shape, b, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            times, losses = time_steps(step, autocast, device, warmup=args.warmup, steps=args.steps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    except Exception as err:  # one broken peer must not cost the others' numbers in an unattended run
        traceback.print_exc()
        print(f"[peers] {name}: failed, {type(err).__name__}: {err}", flush=True)
        return {"label": label, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    finally:
        step = None  # noqa: F841 -- drop the models before the next peer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images = args.batch  # images per step (each image gives 2 global + n_local crops)
    med = percentile(times, 0.5)
    rec = {
        "label": label,
        "status": "ok",
        "student_params": n_params,
        "images_per_s": images / (med / 1e3),
        "step_ms_median": med,
        "step_ms_p90": percentile(times, 0.9),
        "step_ms_all": [round(t, 3) for t in times],
        "peak_mem_gib": peak,
        "last_losses": losses,
        "notes": notes,
        "masked_patches": int(b.n_masked.item()),
    }
    print(
        f"[peers] {name}: {rec['images_per_s']:.1f} img/s, median {med:.1f} ms, p90 {rec['step_ms_p90']:.1f} ms"
        + (f", peak {peak:.2f} GiB" if peak is not None else "")
        + f", losses {losses}",
        flush=True,
    )
    return rec


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"# Peer training-step benchmark ({result['device']}, torch {result['torch']})",
        "",
        f"shape: {result['shape']}; batch {result['batch']}; {result['steps']} timed steps after "
        f"{result['warmup']} warm-up; precision {result['precision']}",
        "",
        "| peer | status | images/s | step ms (median) | step ms (p90) | peak GiB | last total loss |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["peers"].values():
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r.get('reason') or r.get('error')} | | | | | |")
            continue
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(
            f"| {r['label']} | ok | {r['images_per_s']:.1f} | {r['step_ms_median']:.1f} | "
            f"{r['step_ms_p90']:.1f} | {peak} | {r['last_losses']['total']:.4f} |"
        )
    lines += ["", f"raddino on the same device: `{result['raddino_command']}`", ""]
    for name, r in result["peers"].items():
        for n in r.get("notes", []):
            lines.append(f"- {name}: {n}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for peers.json and peers.md")
    p.add_argument("--steps", type=int, default=20, help="timed steps per peer")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per peer before the timing")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64; 4 with --cpu-smoke)")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny ViT (dim 192, depth 2, 56/28 px, 1024 prototypes) on the CPU: checks the harness only",
    )
    p.add_argument(
        "--peers",
        nargs="+",
        default=list(PEERS),
        choices=list(PEERS),
        metavar="PEER",
        help=f"peers to time, of {', '.join(PEERS)} (default: all)",
    )
    p.add_argument(
        "--dinov2-centering",
        default="sinkhorn_knopp",
        choices=["sinkhorn_knopp", "centering"],
        help="DINOv2 teacher normalisation (raddino's default: sinkhorn_knopp)",
    )
    p.add_argument(
        "--pretend-missing",
        nargs="*",
        default=[],
        metavar="PACKAGE",
        help="treat these packages as not installed (checks the skip path)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch is None:
        args.batch = 4 if args.cpu_smoke else 64
    if args.batch < 2:
        p.error("--batch must be >= 2 (KoLeo needs a nearest neighbour within each crop's batch)")
    device = torch.device(
        "cpu"
        if args.cpu_smoke
        else ("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    shape = SMOKE if args.cpu_smoke else FULL
    torch.manual_seed(0)
    # same matmul precision for every peer (fp32 leftovers outside autocast may use TF32)
    torch.set_float32_matmul_precision("high")
    args.out.mkdir(parents=True, exist_ok=True)
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    raddino_cmd = RADDINO_COMMAND.format(batch=args.batch, steps=args.steps, warmup=args.warmup)
    print(f"[peers] device {dev_name}, torch {torch.__version__}; compare with: {raddino_cmd}", flush=True)
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_smoke": args.cpu_smoke,
        "shape": (
            f"ViT dim {shape.embed_dim} depth {shape.depth} patch {shape.patch}, 2x{shape.global_size} + "
            f"{shape.n_local}x{shape.local_size}, {shape.prototypes} prototypes"
        ),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "raddino_command": raddino_cmd,
        "peers": {},
    }
    missing = set(args.pretend_missing)
    for name in args.peers:
        result["peers"][name] = run_peer(name, shape, args, device, missing)
        # after every peer: a run cut short by the caller's timeout still leaves the peers it finished
        (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(args.out / "peers.md", result)
    print(f"[peers] wrote {args.out / 'peers.json'} and {args.out / 'peers.md'}", flush=True)
    return 1 if any(r["status"] == "failed" for r in result["peers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
