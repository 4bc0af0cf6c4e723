"""The CLS token's attention in the last block of a :class:`~raddino.models.vit.VisionTransformer`, computed explicitly.

timm's ``Attention`` normally runs ``F.scaled_dot_product_attention``, which never materialises the attention
weights. Rather than patching timm, :func:`last_block_cls_attention` runs the blocks before the last one as usual and
then recomputes the last block's query / key projections from its own ``norm1`` and ``attn.qkv`` (with timm's
``q_norm`` / ``k_norm`` and ``scale``), for the CLS query row only -- the same arithmetic as timm's non-fused path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ClsAttention:
    """The CLS query's attention in the last block.

    Attributes:
        weights: ``(B, H, T)`` softmax over every key token ``[CLS, registers, patches]`` (``T = 1 + R + N``);
            each row sums to 1.
        num_prefix: ``1 + R`` (CLS and register tokens before the patches).
        grid: ``(grid_h, grid_w)`` patch grid, ``N = grid_h * grid_w`` (row-major, as the patch embedding).
    """

    weights: Tensor
    num_prefix: int
    grid: tuple[int, int]

    @property
    def patch_maps(self) -> Tensor:
        """``(B, H, grid_h, grid_w)``: the attention paid to each patch (DINO's maps; a head's map sums to one minus
        what it gives to the CLS and register tokens)."""
        b, h, _ = self.weights.shape
        return self.weights[:, :, self.num_prefix :].reshape(b, h, *self.grid)


def cls_attention_row(attn: nn.Module, tokens: Tensor) -> Tensor:
    """CLS row of a timm ``Attention``'s softmax weights.

    Args:
        attn: a timm ``Attention`` (``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``).
        tokens: ``(B, T, D)`` its input, i.e. the block's ``norm1`` output; token 0 is the CLS token.

    Returns:
        ``(B, H, T)`` float32: ``softmax(scale * q_cls . k_t)`` over ``t`` for each head.
    """
    b, t, _ = tokens.shape
    # (B, T, 3 * H * hd) -> (3, B, H, T, hd): timm's layout of the fused projection (q, k, v blocks, heads inside)
    qkv = attn.qkv(tokens).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, H, T, hd) each
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float() * attn.scale, k.float())  # (B, H, T)
    return logits.softmax(dim=-1)


@torch.no_grad()
def last_block_cls_attention(model: nn.Module, images: Tensor) -> ClsAttention:
    """The CLS token's attention over all tokens in the last block of ``model``.

    Args:
        model: a :class:`~raddino.models.vit.VisionTransformer` (``prepare_tokens``, ``blocks`` of timm ``Block``
            with ``norm1`` and ``attn``, ``num_registers``, ``grid_size``).
        images: ``(B, 3, H, W)``, ``H`` and ``W`` multiples of the patch size.

    Returns:
        :class:`ClsAttention` with ``weights (B, heads, 1 + R + N)``.
    """
    tokens = model.prepare_tokens(images)  # (B, T, D)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    last = model.blocks[-1]
    weights = cls_attention_row(last.attn, last.norm1(tokens))
    return ClsAttention(
        weights=weights,
        num_prefix=1 + int(model.num_registers),
        grid=model.grid_size(images.shape[-2], images.shape[-1]),
    )
