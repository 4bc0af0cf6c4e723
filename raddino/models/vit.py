"""Vision transformer backbone in Meta's DINOv2 layout, built from timm layers.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``) plus the iBOT
``mask_token (1, D)``, so timm / DINOv2 / RAD-DINO weights map onto it by renaming only.

Token layout (Meta's ``DinoVisionTransformer``, not timm's ``no_embed_class`` register variant):

1. patch embeddings ``(B, N, D)``; masked patches are replaced by ``mask_token`` (iBOT);
2. ``[CLS] + patches`` get ``pos_embed`` added (``1 + N_grid`` positions: the CLS token has a position);
3. register tokens are inserted right after CLS, *after* the position embedding (registers have no position).

Position embeddings are stored for the square grid of ``img_size`` and interpolated for any other input size with
exactly Meta's ``interpolate_pos_encoding`` (see :func:`interpolate_patch_pos_embed`), or with the rule of the
implementation imported weights come from (``hf``: Hugging Face ``Dinov2Model``), so that continued pretraining
sees what the source model computes at every crop size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, Mlp, PatchEmbed, SwiGLUPacked
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

PosEmbedInterp = Literal["dinov2", "dinov2_reg", "hf"]

# (offset added to the target grid before computing a scale factor, antialias) for each interpolation rule.
# "dinov2": original DINOv2 ViT-S/B/L/g (hubconf defaults interpolate_offset=0.1, interpolate_antialias=False).
# "dinov2_reg": Meta's *_reg4 hub models (interpolate_offset=0.0, interpolate_antialias=True); also timm's
#     resample_abs_pos_embed (every timm ViT, dynamic_img_size) and HF transformers' Dinov2WithRegistersModel.
# "hf": HF transformers' Dinov2Model (>= 4.45): bicubic to the target size, no offset, no antialias.
POS_EMBED_INTERP: dict[str, tuple[float, bool]] = {
    "dinov2": (0.1, False),
    "dinov2_reg": (0.0, True),
    "hf": (0.0, False),
}


@dataclass(frozen=True)
class ArchSpec:
    """Size of one ViT variant. ``swiglu`` selects DINOv2-g's SwiGLU FFN (timm ``SwiGLUPacked`` + SiLU)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    swiglu: bool = False


ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec(embed_dim=192, depth=12, num_heads=3),
    "small": ArchSpec(embed_dim=384, depth=12, num_heads=6),
    "base": ArchSpec(embed_dim=768, depth=12, num_heads=12),
    "large": ArchSpec(embed_dim=1024, depth=24, num_heads=16),
    # DINOv2 ViT-g/14 ("vit_giant2"): SwiGLU with hidden (int(4 * 1536 * 2 / 3) + 7) // 8 * 8 = 4096. timm's packed
    # SwiGLU takes the *packed* fc1 width: int(1536 * 2.66667 * 2) = 8192 = 2 * 4096 (as in vit_giant_patch14_dinov2).
    "giant": ArchSpec(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, swiglu=True),
}


def drop_path_rates(drop_path_rate: float, *, depth: int, uniform: bool) -> list[float]:
    """Per-block stochastic-depth rates: ``drop_path_rate`` everywhere (``uniform``, DINOv2's ViT-L/g rule) or growing
    linearly from 0 at the first block to ``drop_path_rate`` at the last (timm / DeiT rule)."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise RaddinoError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if uniform:
        return [drop_path_rate] * depth
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]


DropPathMode = Literal["sample", "subset"]
DROP_PATH_MODES = ("sample", "subset")


# Packed tokens: the crops of several sizes as one (T, D) tensor, each group's (B_g, N_g, D) tokens flattened to
# B_g * N_g rows and concatenated in order. Only attention needs the groups; every other layer is row-wise.
PackedGroups = tuple[tuple[int, int], ...]  # (batch, tokens per sample) of each group, in packing order


def _group_rows(groups: PackedGroups) -> list[int]:
    return [b * n for b, n in groups]


def packed_attention(attn: nn.Module, x: torch.Tensor, groups: PackedGroups) -> torch.Tensor:
    """timm ``Attention`` over packed tokens ``x (T, D)`` -> ``(T, D)``, each group attending only within itself.

    One ``qkv`` and one ``proj`` matmul for all groups (the weights are read once, the GEMMs are large); one fused
    ``scaled_dot_product_attention`` per group, so every group keeps the flash / memory-efficient kernels that a
    block-diagonal mask over the packed sequence would lose. Same arithmetic as ``attn`` on each group alone.
    """
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x)
    dropout = attn.attn_drop.p if attn.training else 0.0
    outs = []
    for (b, n), rows in zip(groups, qkv.split(_group_rows(groups)), strict=True):
        q, k, v = rows.view(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)
        outs.append(out.transpose(1, 2).reshape(b * n, width))
    out = getattr(attn, "norm", nn.Identity())(torch.cat(outs))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _packed_drop_path(drop_path: nn.Module, x: torch.Tensor, groups: PackedGroups) -> torch.Tensor:
    """``drop_path`` applied per sample of each group of packed ``x (T, D)`` (draws in group order)."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0.0:
        return x
    parts = x.split(_group_rows(groups))
    return torch.cat([drop_path(p.view(b, n, -1)).reshape(b * n, -1) for (b, n), p in zip(groups, parts, strict=True)])


class PackableBlock(Block):
    """timm's pre-norm ``Block`` that also runs packed tokens: ``block(x (T, D), groups)`` (see
    :func:`packed_attention`); ``block(x (B, N, D))`` is timm's forward unchanged. Same parameters and names."""

    def forward(self, x: torch.Tensor, groups: PackedGroups | None = None, **kwargs) -> torch.Tensor:
        if groups is None:
            return super().forward(x, **kwargs)
        assert not kwargs, f"packed tokens take no attention options, got {sorted(kwargs)}"
        assert x.dim() == 2 and x.shape[0] == sum(_group_rows(groups)), "packed tokens must be (sum B*N, D)"
        x = x + _packed_drop_path(self.drop_path1, self.ls1(packed_attention(self.attn, self.norm1(x), groups)), groups)
        return x + _packed_drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), groups)


def subset_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], rate: float) -> torch.Tensor:
    """``x + drop_path(branch(x))`` computing ``branch`` only on the samples that keep it.

    ``x`` is ``(B, T, D)``. A random subset of ``max(int(B * (1 - rate)), 1)`` samples runs the branch, its output
    scaled by ``B / kept`` (so the expectation over draws is ``x + branch(x)``, as with per-sample drop path) and
    added back in place of those rows; the other samples pass through unchanged. The branch then costs ``kept / B``
    of its full compute (DINOv2's "efficient stochastic depth"); the subset is drawn from torch's default generator,
    like timm's ``DropPath``.
    """
    batch = x.shape[0]
    kept = max(int(batch * (1.0 - rate)), 1)
    index = torch.randperm(batch, device=x.device)[:kept]
    out = branch(x[index])
    return torch.index_add(x, 0, index, out.to(x.dtype), alpha=batch / kept)


def subset_residual_packed(
    x: torch.Tensor,
    groups: PackedGroups,
    branch: Callable[[torch.Tensor, PackedGroups], torch.Tensor],
    rate: float,
) -> torch.Tensor:
    """:func:`subset_residual` on packed tokens ``x (T, D)``: each group keeps its own subset (drawn in group
    order), and the kept samples of all groups run ``branch(tokens, kept_groups)`` packed together."""
    per_group = [rows.view(b, n, -1) for (b, n), rows in zip(groups, x.split(_group_rows(groups)), strict=True)]
    kept_groups = tuple((max(int(b * (1.0 - rate)), 1), n) for b, n in groups)
    indices = [torch.randperm(b, device=x.device)[:kept] for (b, _), (kept, _) in zip(groups, kept_groups, strict=True)]
    parts = [tokens[index].flatten(0, 1) for tokens, index in zip(per_group, indices, strict=True)]
    out = branch(torch.cat(parts), kept_groups).to(x.dtype)
    merged = [
        torch.index_add(tokens, 0, index, done.view(kept, n, -1), alpha=tokens.shape[0] / kept).flatten(0, 1)
        for tokens, index, (kept, n), done in zip(
            per_group, indices, kept_groups, out.split(_group_rows(kept_groups)), strict=True
        )
    ]
    return torch.cat(merged)


class SubsetDropPathBlock(PackableBlock):
    """timm's pre-norm ``Block`` whose stochastic depth skips the dropped samples' compute (:func:`subset_residual`,
    :func:`subset_residual_packed`).

    Same parameters and names as ``Block``; identical to it in eval mode and at rate 0 (the teacher)."""

    def forward(self, x: torch.Tensor, groups: PackedGroups | None = None, **kwargs) -> torch.Tensor:
        rate = float(getattr(self.drop_path1, "drop_prob", 0.0))
        if not self.training or rate == 0.0 or kwargs:
            return super().forward(x, groups, **kwargs)
        if groups is None:
            x = subset_residual(x, lambda t: self.ls1(self.attn(self.norm1(t))), rate)
            return subset_residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)
        attn = self.attn
        x = subset_residual_packed(x, groups, lambda t, g: self.ls1(packed_attention(attn, self.norm1(t), g)), rate)
        return subset_residual_packed(x, groups, lambda t, g: self.ls2(self.mlp(self.norm2(t))), rate)


class BackboneOutput(NamedTuple):
    """Tokens after the final norm: ``cls (B, D)``, ``patch (B, N, D)`` (row-major grid), ``registers (B, R, D)``.

    A NamedTuple, not a dataclass: FSDP2 registers its pre-backward all-gather on the tensors it finds in a unit's
    output, and before torch 2.13 it finds them only inside pytree containers (tuples, lists, dicts), not inside a
    dataclass. With a dataclass the backbone's root parameters (patch embedding, tokens, position embedding, final
    norm) were resharded after forward and never gathered again, and backward failed with "data is not allocated
    yet" (torch 2.11, every FSDP2 run).
    """

    cls: torch.Tensor
    patch: torch.Tensor
    registers: torch.Tensor


def interpolate_patch_pos_embed(
    patch_pos_embed: torch.Tensor, *, grid_h: int, grid_w: int, offset: float, antialias: bool
) -> torch.Tensor:
    """Meta DINOv2's ``interpolate_pos_encoding`` for the patch part of a position embedding.

    ``patch_pos_embed (1, M*M, D)`` stored for an ``M x M`` grid -> ``(1, grid_h*grid_w, D)`` float32. Bicubic on a
    ``(1, D, M, M)`` float32 view; with ``offset != 0`` the call passes ``scale_factor=((grid_h + offset) / M,
    (grid_w + offset) / M)`` (the operator then maps coordinates with that scale, not ``M / grid``; the historical
    DINO kludge), otherwise ``size=(grid_h, grid_w)``. Meta names the axes ``w``/``h`` but passes ``x.shape[2]`` as
    ``w``, so its first factor is the row (height) factor, as here.
    """
    _, n_pos, dim = patch_pos_embed.shape
    m = math.isqrt(n_pos)
    if m * m != n_pos:
        raise RaddinoError(f"stored position embedding has {n_pos} patch positions, which is not a square grid")
    grid = patch_pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((grid_h + offset) / m, (grid_w + offset) / m)}
    else:
        kwargs = {"size": (grid_h, grid_w)}
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(out.shape[-2:]) != (grid_h, grid_w):  # floor((g + offset) / M * M) must give g back
        raise RuntimeError(f"position-embedding interpolation gave {tuple(out.shape[-2:])}, wanted {(grid_h, grid_w)}")
    return out.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)


class VisionTransformer(nn.Module):
    """ViT backbone (timm blocks, Meta DINOv2 token layout) with an iBOT mask token and registers.

    ``blocks`` is an ``nn.ModuleList`` called one block at a time through ``__call__``, so FSDP2 ``fully_shard`` per
    block and activation-checkpoint wrappers applied from outside take effect. Attention is timm's ``Attention``,
    which uses ``F.scaled_dot_product_attention`` unless timm's fused attention is disabled (``TIMM_FUSED_ATTN=0``).

    Stochastic depth uses timm's ``DropPath`` (per-sample, active in train mode only); like timm and DINOv2 it draws
    from torch's default generator, so the training loop must seed that one.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        swiglu: bool = False,
        qkv_bias: bool = True,
        num_registers: int = 0,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        drop_path_mode: DropPathMode = "sample",
        layerscale: float | None = 1e-5,
        pos_embed_interp: PosEmbedInterp = "dinov2",
        generator: torch.Generator | None = None,
    ) -> None:
        """Build and initialise the backbone.

        Args:
            img_size: side of the square image the position embeddings are stored for (multiple of ``patch_size``).
            num_registers: register tokens (0 disables; ``reg_token`` is then absent).
            drop_path_rate: stochastic-depth rate; ``drop_path_uniform`` applies it to every block (DINOv2's
                ``drop_path_uniform=True`` used for its ViT-L/g recipes), otherwise it grows linearly from 0 at the
                first block to ``drop_path_rate`` at the last (timm / DeiT rule).
            drop_path_mode: ``"sample"`` (timm's ``DropPath``: every sample runs each block, dropped ones are
                zeroed) or ``"subset"`` (:class:`SubsetDropPathBlock`: only the kept samples run the branch --
                less compute at the same expectation; exactly ``int(B * (1 - rate))`` samples keep it).
            layerscale: LayerScale init value; ``None`` (or 0) disables LayerScale (no ``ls1``/``ls2`` params).
            pos_embed_interp: ``"dinov2"`` (bicubic, offset 0.1, no antialias), ``"dinov2_reg"`` (bicubic, no
                offset, antialias) or ``"hf"`` (bicubic, no offset, no antialias); see
                :func:`interpolate_patch_pos_embed` and :data:`POS_EMBED_INTERP`.
            generator: initialisation RNG (``None``: torch's default generator).
        """
        super().__init__()
        if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
            raise RaddinoError(f"img_size ({img_size}) must be a positive multiple of patch_size ({patch_size})")
        if pos_embed_interp not in POS_EMBED_INTERP:
            raise RaddinoError(f"pos_embed_interp must be one of {sorted(POS_EMBED_INTERP)}, got {pos_embed_interp!r}")
        if num_registers < 0:
            raise RaddinoError(f"num_registers must be >= 0, got {num_registers}")
        if embed_dim % num_heads:
            raise RaddinoError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if drop_path_mode not in DROP_PATH_MODES:
            raise RaddinoError(f"drop_path_mode must be one of {', '.join(DROP_PATH_MODES)}, got {drop_path_mode!r}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.img_size = img_size
        self.num_registers = num_registers
        self.pos_embed_interp = pos_embed_interp
        self.stored_grid = img_size // patch_size

        # strict_img_size=False: any size divisible by the patch size is accepted (checked in grid_size).
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.stored_grid**2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        rates = drop_path_rates(drop_path_rate, depth=depth, uniform=drop_path_uniform)
        block_class = SubsetDropPathBlock if drop_path_mode == "subset" else PackableBlock
        self.blocks = nn.ModuleList(
            block_class(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                init_values=layerscale or None,
                drop_path=rates[i],
                norm_layer=LayerNorm,  # timm's LayerNorm defaults to eps=1e-6, as DINOv2
                act_layer=nn.SiLU if swiglu else nn.GELU,
                mlp_layer=SwiGLUPacked if swiglu else Mlp,
            )
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self.checkpoint_every = 0  # activation checkpointing; see set_grad_checkpointing
        self.init_weights(generator=generator)

    def set_grad_checkpointing(self, *, every: int = 1) -> None:
        """Recompute the activations of every ``every``-th block in backward instead of storing them (0: off,
        1: every block). Trades ~1/3 more compute per checkpointed block for its activation memory; parameter
        names are unchanged, so checkpoints and FSDP units do not notice."""
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {every}")
        self.checkpoint_every = every

    def _run_blocks(self, tokens: torch.Tensor, groups: PackedGroups | None = None) -> torch.Tensor:
        every = self.checkpoint_every
        args = () if groups is None else (groups,)
        for i, block in enumerate(self.blocks):
            if every and self.training and torch.is_grad_enabled() and i % every == 0:
                tokens = checkpoint(block, tokens, *args, use_reentrant=False)
            else:
                tokens = block(tokens, *args)
        return tokens

    def set_drop_path_rate(self, drop_path_rate: float, *, uniform: bool = True) -> None:
        """Replace the stochastic depth of every block (rule of :func:`drop_path_rates`); 0 removes it.

        DropPath holds no parameters, so the state dict and the parameter order are unchanged: the EMA teacher is
        a copy of the student with this set to 0 (DINOv2 builds its teacher without drop path)."""
        rates = drop_path_rates(drop_path_rate, depth=len(self.blocks), uniform=uniform)
        for block, rate in zip(self.blocks, rates, strict=True):
            # timm's Block uses an Identity for rate 0; keep that, so a rate-0 block does no per-sample draw at all
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()

    @property
    def drop_path_rates(self) -> list[float]:
        """Current stochastic-depth rate of each block (0 where it is an identity)."""
        return [getattr(block.drop_path1, "drop_prob", 0.0) for block in self.blocks]

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """DINOv2 / timm ViT init: trunc-normal(0.02) Linear weights + pos_embed, zero biases, CLS and registers
        N(0, 1e-6), zero mask token; LayerScale and LayerNorm keep their constructor values (init value; 1, 0). The
        patch-embedding conv gets PyTorch's default Conv2d init (as in DINOv2, whose init only touches Linear layers),
        drawn from ``generator``. This also overrides timm's SwiGLU gate init, as DINOv2's init does."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)
        nn.init.normal_(self.cls_token, std=1e-6, generator=generator)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6, generator=generator)
        nn.init.zeros_(self.mask_token)
        proj = self.patch_embed.proj
        nn.init.kaiming_uniform_(proj.weight, a=math.sqrt(5), generator=generator)
        if proj.bias is not None:
            bound = 1.0 / math.sqrt(proj.weight[0].numel())
            nn.init.uniform_(proj.bias, -bound, bound, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid ``(h // patch_size, w // patch_size)`` of an ``h x w`` input (both must be divisible)."""
        if h % self.patch_size or w % self.patch_size or h <= 0 or w <= 0:
            raise RaddinoError(f"input size {h}x{w} is not a positive multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding ``(1, 1 + grid_h*grid_w, D)`` (CLS first) for a ``grid_h x grid_w`` patch grid.

        The stored tensor itself when the grid is the stored one; otherwise the patch part is interpolated in
        float32 with the configured rule and the result is float32."""
        if (grid_h, grid_w) == (self.stored_grid, self.stored_grid):
            return self.pos_embed
        offset, antialias = POS_EMBED_INTERP[self.pos_embed_interp]
        patch = interpolate_patch_pos_embed(
            self.pos_embed[:, 1:], grid_h=grid_h, grid_w=grid_w, offset=offset, antialias=antialias
        )
        return torch.cat((self.pos_embed[:, :1].float(), patch), dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` (+ ``masks (B, N) bool``, True = masked) -> tokens ``(B, 1 + R + N, D)``
        ordered ``[CLS, registers, patches]``, ready for the first block."""
        b, _, h, w = x.shape
        grid_h, grid_w = self.grid_size(h, w)
        tokens = self.patch_embed(x)  # (B, N, D), row-major over the grid
        if masks is not None:
            if masks.shape != tokens.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be a bool tensor of shape {tuple(tokens.shape[:2])}, "
                    f"got {masks.dtype} {tuple(masks.shape)}"
                )
            # iBOT: replace before the position embedding, so a masked token still knows where it is.
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.to(tokens.dtype).expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_embed(grid_h, grid_w).to(tokens.dtype)
        if self.reg_token is not None:
            regs = self.reg_token.to(tokens.dtype).expand(b, -1, -1)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def _split(self, tokens: torch.Tensor) -> BackboneOutput:
        normed = self.norm(tokens)
        r = self.num_registers
        return BackboneOutput(cls=normed[:, 0], registers=normed[:, 1 : 1 + r], patch=normed[:, 1 + r :])

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> BackboneOutput:
        """Images ``(B, C, H, W)``, optional iBOT ``masks (B, N) bool`` -> normed CLS / patch / register tokens."""
        tokens = self.prepare_tokens(x, masks)
        return self._split(self._run_blocks(tokens))

    def forward_features_packed(
        self, crops: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]
    ) -> list[BackboneOutput]:
        """:meth:`forward_features` of several image batches (e.g. global and local crops, of different sizes) in
        one pass through the blocks: their tokens are packed into one ``(sum B*N, D)`` tensor, every matmul runs
        once over all of them and attention stays within each image (:class:`PackableBlock`). Equal to calling
        :meth:`forward_features` on each batch, up to float rounding; with stochastic depth the draws come in
        another order (block by block, not batch by batch), so the same seed drops other samples.

        Under FSDP2 each block's weights are gathered once for all batches, not once per batch."""
        if len(crops) != len(masks) or not crops:
            raise ValueError(f"need one mask (or None) per crop batch, got {len(crops)} batches, {len(masks)} masks")
        tokens = [self.prepare_tokens(x, m) for x, m in zip(crops, masks, strict=True)]
        groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        flat = self._run_blocks(torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]), groups)
        parts = flat.split(_group_rows(groups))
        return [self._split(p.view(b, n, -1)) for (b, n), p in zip(groups, parts, strict=True)]

    def get_intermediate_layers(self, x: torch.Tensor, n: int) -> list[BackboneOutput]:
        """Outputs of the last ``n`` blocks (earliest first), each through the final norm (DINOv2's ``norm=True``)."""
        depth = len(self.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be between 1 and the depth {depth}, got {n}")
        tokens = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i >= depth - n:
                outputs.append(self._split(tokens))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normed CLS token ``(B, D)``."""
        return self.forward_features(x).cls


def build_backbone(
    *,
    arch: str,
    img_size: int,
    patch_size: int = 14,
    num_registers: int = 0,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = True,
    drop_path_mode: DropPathMode = "sample",
    layerscale: float | None = 1e-5,
    pos_embed_interp: PosEmbedInterp = "dinov2",
    qkv_bias: bool = True,
    in_chans: int = 3,
    generator: torch.Generator | None = None,
) -> VisionTransformer:
    """A :class:`VisionTransformer` of the named size in :data:`ARCHS` (tiny | small | base | large | giant)."""
    if arch not in ARCHS:
        raise RaddinoError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        swiglu=spec.swiglu,
        qkv_bias=qkv_bias,
        num_registers=num_registers,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=drop_path_uniform,
        drop_path_mode=drop_path_mode,
        layerscale=layerscale,
        pos_embed_interp=pos_embed_interp,
        generator=generator,
    )
    log.info(
        "built ViT-%s/%d: %.1fM parameters, %d registers, pos-embed grid %dx%d (%s interpolation)",
        arch,
        patch_size,
        sum(p.numel() for p in model.parameters()) / 1e6,
        num_registers,
        model.stored_grid,
        model.stored_grid,
        pos_embed_interp,
    )
    return model
