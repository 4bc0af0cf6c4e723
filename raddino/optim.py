"""AdamW with DINOv2's parameter groups, and helpers to apply the schedules and clip gradients."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Position embeddings and learned tokens sit in the input layer; like biases and norms they are not decayed.
_INPUT_LAYER = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "mask_token")


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is optimised: multipliers on the scheduled lr / weight decay."""

    lr_mult: float
    wd_mult: float
    is_last_layer: bool


def layer_decay_lr_mult(layer_id: int, *, num_layers: int, layer_decay: float) -> float:
    """Layer-wise lr decay: ``layer_decay ** (num_layers + 1 - layer_id)`` (input layer 0, block ``i`` -> ``i + 1``,
    what follows the last block -> ``num_layers + 1``, which trains at the full lr)."""
    return layer_decay ** (num_layers + 1 - layer_id)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, layer-scale gammas, learned tokens and position embeddings are not decayed (names of any
    backbone family: raddino / timm ``cls_token``, HF ``embeddings.cls_token``, ...)."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or "norm" in name
        or ".gamma" in name
        or "token" in name
        or "pos_embed" in name
    )


def param_rule(
    name: str, param: nn.Parameter, *, num_layers: int, layer_decay: float, patch_embed_lr_mult: float
) -> ParamRule:
    """DINOv2's rule for one parameter of the student (``backbone.…`` or a head's ``….last_layer.…``).

    Layer ids: input layer (patch embed, pos embed, tokens) = 0, block i = i + 1, everything after the blocks
    (final norm, heads) = num_layers + 1; lr multiplier = layer_decay ** (num_layers + 1 - layer_id).
    """
    in_backbone = name.startswith("backbone.")
    short = name.removeprefix("backbone.")
    if not in_backbone:
        layer_id = num_layers + 1
    elif short.startswith(_INPUT_LAYER):
        layer_id = 0
    elif match := _BLOCK.search(name):
        layer_id = int(match.group(1)) + 1
    else:
        layer_id = num_layers + 1
    lr_mult = layer_decay_lr_mult(layer_id, num_layers=num_layers, layer_decay=layer_decay)
    if short.startswith("patch_embed."):
        lr_mult *= patch_embed_lr_mult
    no_wd = no_weight_decay(short, param)
    return ParamRule(lr_mult=lr_mult, wd_mult=0.0 if no_wd else 1.0, is_last_layer="last_layer" in name)


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], *, num_layers: int, layer_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """Group trainable parameters by rule so the optimizer holds few groups (each group keeps its multipliers)."""
    groups: dict[ParamRule, dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        rule = param_rule(
            name, param, num_layers=num_layers, layer_decay=layer_decay, patch_embed_lr_mult=patch_embed_lr_mult
        )
        group = groups.setdefault(
            rule, {"params": [], "lr_mult": rule.lr_mult, "wd_mult": rule.wd_mult, "is_last_layer": rule.is_last_layer}
        )
        group["params"].append(param)
    return list(groups.values())


# optim.implementation -> the torch.optim.AdamW flags that select its kernel ("auto": torch's default choice)
ADAMW_IMPLEMENTATIONS = {
    "auto": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "for_loop": {"foreach": False},
}


def build_optimizer(
    param_groups: list[dict], *, betas: tuple[float, float], implementation: str = "auto"
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; ``implementation`` picks torch's kernel (:data:`ADAMW_IMPLEMENTATIONS`): the same
    update up to float rounding, at different speeds."""
    # lr / weight_decay are set every step by apply_schedule; the values here are placeholders overwritten at step 0.
    return torch.optim.AdamW(
        param_groups, lr=0.0, weight_decay=0.0, betas=betas, **ADAMW_IMPLEMENTATIONS[implementation]
    )


def apply_schedule(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float) -> None:
    """Set each group's lr / weight decay from the scheduled values and its multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (``max_norm <= 0`` only measures it). Returns the norm before clipping, as a
    plain tensor equal on every rank (with FSDP2's sharded gradients the norm is reduced over the shards)."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
