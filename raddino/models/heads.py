"""DINO / iBOT projection head: MLP -> bottleneck -> L2 normalisation -> weight-normalised prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """DINOv2's ``DINOHead`` (no batch norm, MLP biases on).

    ``mlp`` is ``Linear(in, hidden) -> GELU -> [Linear(hidden, hidden) -> GELU] * (nlayers - 2) ->
    Linear(hidden, bottleneck)`` (a single ``Linear(in, bottleneck)`` when ``nlayers == 1``), always an
    ``nn.Sequential`` so parameters are named ``mlp.0 ... mlp.{2(nlayers-1)}`` (Meta's head uses a bare ``Linear``,
    named ``mlp.weight``, for ``nlayers == 1``). Its output is L2-normalised and scored against the prototypes
    ``last_layer.weight (out_dim, bottleneck_dim)``.

    The prototypes are weight-normalised with the norm fixed to 1: ``logits = x @ normalize(W, dim=1).T``. This equals
    ``torch.nn.utils.weight_norm(Linear(bottleneck, out, bias=False))`` with ``weight_g == 1`` (Meta fills ``weight_g``
    with 1 at init; ``last_layer.weight`` plays ``weight_v``), but keeps one plain parameter, which FSDP2 shards and
    DCP checkpoints like any other. A checkpoint's ``weight_v``/``weight_g`` pair loads as ``weight = g * v / ||v||``
    only if ``g`` is still 1 (DINOv2 leaves ``weight_g`` trainable; the conversion must check or fold it).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        """``generator``: initialisation RNG (``None``: torch's default generator)."""
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if value < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights(generator=generator)

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """MLP: trunc-normal(0.02) weights, zero biases. Prototypes: ``nn.Linear``'s default (Kaiming-uniform)
        draw, which is what DINOv2's ``weight_v`` starts from (its head init runs before ``last_layer`` exists)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                nn.init.zeros_(module.bias)
        nn.init.kaiming_uniform_(self.last_layer.weight, a=math.sqrt(5), generator=generator)

    def prototypes(self) -> torch.Tensor:
        """Effective prototype matrix ``(out_dim, bottleneck_dim)`` with unit-norm rows."""
        return F.normalize(self.last_layer.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, in_dim)`` -> prototype logits ``(N, out_dim)``."""
        x = self.mlp(x)
        # Meta's eps: 1e-12 underflows in float16.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return F.linear(x, self.prototypes().to(x.dtype))
