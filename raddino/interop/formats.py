"""Key maps between raddino's backbone / head state dicts and the layouts of DINOv2, timm and HF transformers.

All functions are pure renames / reshapes of ``{name: tensor}`` dicts; nothing here touches a model. raddino's
backbone names (:class:`raddino.models.vit.VisionTransformer`) are timm's plus ``mask_token (1, D)``, with Meta's
token layout: ``pos_embed (1, 1 + N, D)`` holds a CLS position and register tokens (``reg_token (1, R, D)``) have
none.

Layouts (``D`` width, ``N`` stored grid positions, ``R`` registers):

* ``dinov2`` -- Meta's hub checkpoints (``dinov2_vit*14[_reg4]_pretrain.pth``, RAD-DINO's
  ``backbone_compatible.safetensors``): raddino's names except ``register_tokens`` for ``reg_token`` and, for the
  SwiGLU FFN of ViT-g, ``mlp.w12`` / ``mlp.w3`` for ``mlp.fc1`` / ``mlp.fc2``. Training checkpoints with
  ``block_chunks`` name blocks ``blocks.<chunk>.<index>.``.
* ``timm`` -- timm's ``vit_*_patch14_dinov2`` (no mask token). Its register variants use ``no_embed_class``:
  ``pos_embed (1, N, D)`` without a CLS position, the CLS position folded into ``cls_token`` (exactly equivalent).
* ``hf`` -- transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` as saved by ``save_pretrained`` (the
  transformers 4.x names, which 5.x still writes and converts on load): ``embeddings.*``, ``encoder.layer.N.*`` with
  separate ``query`` / ``key`` / ``value`` projections, ``layer_scale1.lambda1``, ``layernorm``. The 5.x in-memory
  names (``q_proj`` ... ``o_proj``, ``gate_proj`` / ``up_proj`` / ``down_proj``) are read too.

DINO heads: raddino's :class:`raddino.models.heads.DINOHead` has ``mlp.{0,2,4}`` (as Meta's) and one prototype
matrix ``last_layer.weight`` that is normalised row-wise in the forward pass. Meta's head keeps a weight-normalised
``last_layer`` (``weight_g (K, 1)``, ``weight_v (K, B)``, or ``parametrizations.weight.original0/1``), whose logits
are ``x @ (g * v / ||v||).T``: identical to raddino's with ``weight = v`` exactly when every ``g`` is 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from raddino.errors import RaddinoError

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# HF per-layer names (transformers 4.x on-disk layout, still written by 5.x save_pretrained) <-> raddino block names.
_HF_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.weights_in.weight": "mlp.fc1.weight",  # SwiGLU: packed [gate; up], gate first (as Meta's w12)
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
    # transformers 5.x in-memory names
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight",
    "mlp.down_proj.bias": "mlp.fc2.bias",
}
_HF_QKV = {  # (4.x name, 5.x name) of each of q, k, v
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 hub layout
# ---------------------------------------------------------------------------------------------------------------


def from_dinov2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Meta hub / training-checkpoint backbone names (prefix already stripped) -> raddino names."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        name = _CHUNKED_BLOCK.sub(r"blocks.\1.", name)  # block_chunks > 0: blocks.<chunk>.<index>.
        if name == "register_tokens":
            name = "reg_token"
        name = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", name)
        name = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", name)
        out[name] = tensor
    return out


def to_dinov2(state: Mapping[str, Tensor], *, swiglu: bool) -> dict[str, Tensor]:
    """raddino names -> Meta hub names (what ``torch.hub.load('facebookresearch/dinov2', ...)`` strict-loads)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "reg_token":
            name = "register_tokens"
        if swiglu:
            name = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", name)
            name = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", name)
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------


def timm_has_class_position(state: Mapping[str, Tensor]) -> bool:
    """Whether a timm ``pos_embed`` holds a CLS position (``1 + M*M`` rows) or not (``no_embed_class``: ``M*M``)."""
    n = int(state["pos_embed"].shape[1])
    if _is_square(n - 1) and n > 1:
        return True
    if _is_square(n):
        return False
    raise RaddinoError(f"timm pos_embed has {n} positions: neither a square grid nor 1 + a square grid")


def from_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` names -> raddino names. A ``no_embed_class`` position embedding gets a zero CLS
    position (timm's ``cls_token`` already includes it), which is the same computation."""
    out = {name: tensor for name, tensor in state.items() if not name.startswith(("head.", "fc_norm."))}
    if "pos_embed" in out and not timm_has_class_position(out):
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), dim=1)
    return out


def to_timm(state: Mapping[str, Tensor], *, no_embed_class: bool) -> dict[str, Tensor]:
    """raddino names -> timm names; ``no_embed_class`` (timm's register variants) folds the CLS position into
    ``cls_token``. The mask token (training only) is dropped: timm's ViT has none."""
    out = {name: tensor for name, tensor in state.items() if name != "mask_token"}
    if no_embed_class:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------------------------


def from_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Dinov2Model`` / ``Dinov2WithRegistersModel`` names (prefix such as ``dinov2.`` already stripped) -> raddino
    names. Separate q / k / v projections are stacked into ``attn.qkv`` (rows q, k, v, as timm's); 5.x's split
    SwiGLU ``gate_proj`` / ``up_proj`` are packed into ``mlp.fc1`` (gate first). Names that map to nothing are kept
    unchanged so the caller reports them as unexpected."""
    out: dict[str, Tensor] = {}
    per_layer: dict[int, dict[str, Tensor]] = {}
    for name, tensor in state.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = tensor
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            out[name] = tensor
            continue
        per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    for index, params in sorted(per_layer.items()):
        prefix = f"blocks.{index}."
        for kind in ("weight", "bias"):
            parts = []
            for legacy, current in _HF_QKV.values():
                part = params.pop(f"{legacy}.{kind}", None)
                part = params.pop(f"{current}.{kind}", part)
                parts.append(part)
            if all(p is not None for p in parts):
                out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            else:  # an incomplete q/k/v set: keep what is there for the mismatch report
                for (legacy, _), part in zip(_HF_QKV.values(), parts, strict=True):
                    if part is not None:
                        out[f"encoder.layer.{index}.{legacy}.{kind}"] = part
            gate, up = params.pop(f"mlp.gate_proj.{kind}", None), params.pop(f"mlp.up_proj.{kind}", None)
            if gate is not None and up is not None:
                out[f"{prefix}mlp.fc1.{kind}"] = torch.cat((gate, up), dim=0)
        for sub, tensor in params.items():
            target = _HF_BLOCK_RENAMES.get(sub)
            out[prefix + target if target else f"encoder.layer.{index}.{sub}"] = tensor
    return out


def to_hf(state: Mapping[str, Tensor], *, swiglu: bool) -> dict[str, Tensor]:
    """raddino names -> the transformers on-disk layout of ``Dinov2Model`` (``Dinov2WithRegistersModel`` with
    registers), loadable by transformers 4.x and 5.x ``from_pretrained``."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "attn.proj.weight": "attention.output.dense.weight",
        "attn.proj.bias": "attention.output.dense.bias",
        "ls1.gamma": "layer_scale1.lambda1",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "mlp.fc1.weight": "mlp.weights_in.weight" if swiglu else "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.weights_in.bias" if swiglu else "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.weights_out.weight" if swiglu else "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.weights_out.bias" if swiglu else "mlp.fc2.bias",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        match = _BLOCK.match(name)
        if match is None:
            raise RaddinoError(f"no HF transformers name for backbone parameter {name!r}")
        index, sub = match.groups()
        prefix = f"encoder.layer.{index}."
        if sub.startswith("attn.qkv."):
            kind = sub.rsplit(".", 1)[1]
            for (legacy, _), part in zip(_HF_QKV.values(), tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}{legacy}.{kind}"] = part
        elif sub in block:
            out[prefix + block[sub]] = tensor
        else:
            raise RaddinoError(f"no HF transformers name for backbone parameter {name!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# DINO heads
# ---------------------------------------------------------------------------------------------------------------


def head_from_meta(state: Mapping[str, Tensor], *, g_tolerance: float = 1e-4) -> tuple[dict[str, Tensor], float]:
    """Meta ``DINOHead`` names (prefix stripped) -> raddino :class:`DINOHead` names.

    Returns the converted dict and ``max |g - 1|`` over the weight-norm gains (0 for a plain ``last_layer.weight``).
    With gains within ``g_tolerance`` of 1 the conversion is exact (``weight = v``); otherwise ``weight = v`` keeps
    each prototype's direction but drops its gain (raddino's head fixes it to 1) and the caller decides.
    """
    out: dict[str, Tensor] = {}
    gain = state.get("last_layer.weight_g", state.get("last_layer.parametrizations.weight.original0"))
    direction = state.get("last_layer.weight_v", state.get("last_layer.parametrizations.weight.original1"))
    deviation = 0.0
    for name, tensor in state.items():
        if name.startswith("last_layer."):
            continue
        if name in ("mlp.weight", "mlp.bias"):  # nlayers == 1: Meta's bare Linear
            name = "mlp.0." + name.split(".", 1)[1]
        out[name] = tensor
    if direction is not None:
        if gain is None:
            raise RaddinoError("DINO head has last_layer weight_v but no weight_g")
        if bool((gain.reshape(-1) <= 0).any()):
            raise RaddinoError("DINO head has non-positive weight-norm gains (weight_g); it cannot be converted")
        deviation = float((gain.float() - 1).abs().max())
        out["last_layer.weight"] = direction
    elif "last_layer.weight" in state:
        out["last_layer.weight"] = state["last_layer.weight"]
    return out, deviation


def head_to_meta(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """raddino head names -> Meta ``DINOHead`` names with ``weight_norm`` (``weight_g`` = 1, ``weight_v`` = the
    prototypes), which Meta's head turns into exactly raddino's logits."""
    out = {name: tensor for name, tensor in state.items() if name != "last_layer.weight"}
    weight = state["last_layer.weight"]
    out["last_layer.weight_g"] = torch.ones(weight.shape[0], 1, dtype=weight.dtype)
    out["last_layer.weight_v"] = weight
    return out


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n
