from __future__ import annotations

import pytest
import torch
from torch import nn

from raddino.models.heads import DINOHead
from raddino.models.vit import build_backbone
from raddino.optim import apply_schedule, build_optimizer, build_param_groups


@pytest.fixture(scope="module")
def student() -> nn.ModuleDict:
    backbone = build_backbone(arch="tiny", img_size=28, num_registers=2)
    return nn.ModuleDict(
        {"backbone": backbone, "dino_head": DINOHead(in_dim=192, out_dim=64, hidden_dim=32, bottleneck_dim=16)}
    )


def _expected(name: str, depth: int, decay: float, pe_mult: float) -> tuple[float, float, bool]:
    """Independent statement of the rules, parameter by parameter."""
    short = name.removeprefix("backbone.")
    if not name.startswith("backbone."):
        layer = depth + 1
    elif short.split(".")[0] in ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token"):
        layer = 0
    elif short.startswith("blocks."):
        layer = int(short.split(".")[1]) + 1
    else:
        layer = depth + 1
    lr = decay ** (depth + 1 - layer) * (pe_mult if short.startswith("patch_embed") else 1.0)
    no_wd = (
        short.endswith("bias")
        or "norm" in short
        or "gamma" in short
        or short in ("pos_embed", "cls_token", "reg_token", "mask_token")
    )
    return lr, 0.0 if no_wd else 1.0, "last_layer" in name


def test_every_param_in_exactly_one_group_with_right_multipliers(student):
    depth = len(student["backbone"].blocks)
    student["dino_head"].mlp[0].bias.requires_grad_(False)  # frozen params must be left out
    try:
        groups = build_param_groups(
            student.named_parameters(), num_layers=depth, layer_decay=0.9, patch_embed_lr_mult=0.2
        )
    finally:
        student["dino_head"].mlp[0].bias.requires_grad_(True)
    owner = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = gi
    for name, p in student.named_parameters():
        if name == "dino_head.mlp.0.bias":
            assert id(p) not in owner
            continue
        assert id(p) in owner, f"{name} missing from the optimizer"
        g = groups[owner[id(p)]]
        lr, wd, last = _expected(name, depth, 0.9, 0.2)
        assert g["lr_mult"] == pytest.approx(lr), name
        assert g["wd_mult"] == wd, name
        assert g["is_last_layer"] == last, name
    # Spot checks of the rule itself.
    by_name = {n: groups[owner[id(p)]] for n, p in student.named_parameters() if id(p) in owner}
    assert by_name["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.9 ** (depth + 1) * 0.2)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.9**depth)
    assert by_name[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.9)
    assert by_name["dino_head.last_layer.weight"]["lr_mult"] == 1.0
    assert by_name["backbone.pos_embed"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_mult"] == 1.0


def test_apply_schedule_sets_group_lr_and_wd(student):
    depth = len(student["backbone"].blocks)
    groups = build_param_groups(student.named_parameters(), num_layers=depth, layer_decay=0.5, patch_embed_lr_mult=0.2)
    opt = build_optimizer(groups, betas=(0.9, 0.999))
    apply_schedule(opt, lr=1e-3, weight_decay=0.1, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_mult"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])


def test_frozen_last_layer_does_not_move(student):
    groups = build_param_groups(
        student.named_parameters(), num_layers=len(student["backbone"].blocks), layer_decay=0.9, patch_embed_lr_mult=0.2
    )
    opt = build_optimizer(groups, betas=(0.9, 0.999))
    apply_schedule(opt, lr=1e-2, weight_decay=0.04, last_layer_lr=0.0)
    before = student["dino_head"].last_layer.weight.detach().clone()
    qkv_before = student["backbone"].blocks[0].attn.qkv.weight.detach().clone()
    x = torch.randn(2, 3, 28, 28)
    student["dino_head"](student["backbone"].forward_features(x).cls).sum().backward()
    opt.step()
    opt.zero_grad()
    assert torch.equal(student["dino_head"].last_layer.weight, before)
    assert not torch.equal(student["backbone"].blocks[0].attn.qkv.weight, qkv_before)


@pytest.mark.parametrize("implementation", ["foreach", "fused", "for_loop"])
def test_adamw_implementations_make_the_same_update(implementation):
    from raddino.config import _CHOICES
    from raddino.optim import ADAMW_IMPLEMENTATIONS

    assert _CHOICES["optim.implementation"] == tuple(ADAMW_IMPLEMENTATIONS)  # every kernel selectable from config

    def model() -> nn.ModuleDict:  # the parameter names of a student, in miniature: several groups
        torch.manual_seed(0)
        blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        backbone = nn.ModuleDict({"patch_embed": nn.Linear(8, 16), "blocks": blocks, "norm": nn.LayerNorm(16)})
        return nn.ModuleDict({"backbone": backbone, "dino_head": nn.Linear(16, 4)})

    def forward(m: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        h = m["backbone"]["patch_embed"](x)
        for block in m["backbone"]["blocks"]:
            h = h + torch.tanh(block(h))
        return m["dino_head"](m["backbone"]["norm"](h))

    models = {impl: model() for impl in ("auto", implementation)}
    opts = {}
    for impl, m in models.items():
        groups = build_param_groups(m.named_parameters(), num_layers=2, layer_decay=0.5, patch_embed_lr_mult=0.2)
        assert len(groups) > 3
        opts[impl] = build_optimizer(groups, betas=(0.9, 0.999), implementation=impl)
        apply_schedule(opts[impl], lr=1e-2, weight_decay=0.04, last_layer_lr=1e-2)
    flag = "fused" if implementation == "fused" else "foreach"
    assert opts[implementation].defaults[flag] is (implementation != "for_loop")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for impl, m in models.items():
            forward(m, x).square().mean().backward()
            opts[impl].step()
            opts[impl].zero_grad()
    start = model()
    for (name, a), b, s in zip(
        models["auto"].named_parameters(), models[implementation].parameters(), start.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        assert not torch.equal(a, s), name  # every parameter moved
