"""Backbone and head: parity with timm / transformers, Meta's pos-embed interpolation, masks, registers, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import raddino  # noqa: F401  (torchvision shim before timm)
from raddino.errors import RaddinoError
from raddino.models.heads import DINOHead
from raddino.models.vit import VisionTransformer, build_backbone

PATCH = 14
TIMM_TINY = {"embed_dim": 192, "num_heads": 3}  # timm's dinov2 entry point at our "tiny" size (keeps tests fast)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=_gen(seed))


def _randomise_special_tokens(model: VisionTransformer, seed: int = 1) -> None:
    """cls / registers / mask token start near zero; give them O(1) values so comparisons are not vacuous."""
    g = _gen(seed)
    with torch.no_grad():
        model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=g))
        model.mask_token.copy_(torch.randn(model.mask_token.shape, generator=g))
        if model.reg_token is not None:
            model.reg_token.copy_(torch.randn(model.reg_token.shape, generator=g))
        for block in model.blocks:  # layerscale 1e-5 would hide most of what the blocks do
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Independent (numpy) re-derivation of Meta's interpolate_pos_encoding.
# "dinov2":     F.interpolate(scale_factor=((g+0.1)/M, ...), bicubic, antialias=False). PyTorch then maps output
#               index i to source (i + 0.5) / s - 0.5 with s the *given* scale factor, and mixes 4 neighbours with
#               Keys' cubic kernel (A = -0.75), clamping indices at the border.
# "dinov2_reg": F.interpolate(size=(g, ...), bicubic, antialias=True): PIL-style separable filter with A = -0.5,
#               support stretched by max(M/g, 1), weights renormalised.
# ---------------------------------------------------------------------------------------------------------------


def _keys_cubic_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    a = -0.75

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k, w in zip(range(x0 - 1, x0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            mat[i, min(max(k, 0), n_in - 1)] += w
    return mat


def _antialiased_cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    a = -0.5

    def kernel(x: float) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.array([kernel((j - center + 0.5) / stretch) for j in range(lo, hi)])
        mat[i, lo:hi] = w / w.sum()
    return mat


def _meta_pos_embed_reference(pos_embed: torch.Tensor, grid_h: int, grid_w: int, mode: str) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid_h*grid_w, D) float32, computed in float64 numpy (the stored grid is returned
    as is: Meta skips the interpolation there, which would not be the identity with the 0.1 offset)."""
    pe = pos_embed.detach().double().numpy()[0]
    cls, patch = pe[:1], pe[1:]
    m = math.isqrt(patch.shape[0])
    if (grid_h, grid_w) == (m, m):
        return pos_embed.detach().float().clone()
    grid = patch.reshape(m, m, -1)
    if mode == "dinov2":
        rows = _keys_cubic_matrix(m, grid_h, (grid_h + 0.1) / m)
        cols = _keys_cubic_matrix(m, grid_w, (grid_w + 0.1) / m)
    else:
        rows, cols = _antialiased_cubic_matrix(m, grid_h), _antialiased_cubic_matrix(m, grid_w)
    out = np.einsum("ij,jkd,lk->ild", rows, grid, cols).reshape(grid_h * grid_w, -1)
    return torch.from_numpy(np.concatenate([cls, out])[None]).float()


# ---------------------------------------------------------------------------------------------------------------
# timm parity
# ---------------------------------------------------------------------------------------------------------------


def test_matches_timm_dinov2_at_stored_resolution() -> None:
    ours = build_backbone(arch="small", img_size=56, generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    ref.load_state_dict(state, strict=True)  # same parameter names and shapes, nothing missing or extra
    x = _images(2, 56, 56)
    with torch.no_grad():
        out = ours.forward_features(x)
        tokens = ref.forward_features(x)
    assert out.cls.shape == (2, 384) and out.patch.shape == (2, 16, 384) and out.registers.shape == (2, 0, 384)
    torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch, tokens[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x), tokens[:, 0], atol=1e-5, rtol=0)


def test_registers_match_timm_reg4_after_folding_cls_position() -> None:
    """timm's reg4 models use ``no_embed_class`` (no position for CLS). Meta's layout (ours) gives CLS a position and
    registers none, which is timm's layout with ``cls_token + pos_embed[:, :1]`` folded into the CLS token."""
    ours = build_backbone(arch="small", img_size=56, num_registers=4, generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:]
    ref.load_state_dict(state, strict=True)
    x = _images(2, 56, 56)
    with torch.no_grad():
        out = ours.forward_features(x)
        tokens = ref.forward_features(x)
    assert out.registers.shape == (2, 4, 384) and out.patch.shape == (2, 16, 384)
    torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.registers, tokens[:, 1:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch, tokens[:, 5:], atol=1e-5, rtol=0)


def test_giant_uses_dinov2_swiglu_and_loads_into_timm_giant() -> None:
    with torch.device("meta"):  # 1.1B parameters: compare shapes without allocating or initialising them
        model = build_backbone(arch="giant", img_size=28)
        ref = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, img_size=28, num_classes=0)
    # DINOv2-g FFN: packed w12 (2 x 4096) and w3 (4096) around embed 1536.
    assert model.blocks[0].mlp.fc1.weight.shape == (8192, 1536)
    assert model.blocks[0].mlp.fc2.weight.shape == (1536, 4096)
    assert len(model.blocks) == 40 and model.embed_dim == 1536
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "mask_token"}
    assert ours_shapes == ref_shapes


# ---------------------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dinov2", "dinov2_reg"])
@pytest.mark.parametrize("grid", [(8, 8), (3, 3), (4, 7), (9, 2)])
def test_pos_embed_interpolation_matches_meta_formula(mode: str, grid: tuple[int, int]) -> None:
    model = build_backbone(arch="tiny", img_size=5 * PATCH, pos_embed_interp=mode, generator=_gen(0))
    with torch.no_grad():
        got = model.interpolate_pos_embed(*grid)
    assert got.dtype == torch.float32 and got.shape == (1, 1 + grid[0] * grid[1], 192)
    torch.testing.assert_close(got, _meta_pos_embed_reference(model.pos_embed, *grid, mode), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grid", [(8, 8), (3, 3), (4, 7)])
def test_dinov2_reg_interpolation_equals_timm_resample(grid: tuple[int, int]) -> None:
    from timm.layers import resample_abs_pos_embed

    model = build_backbone(arch="tiny", img_size=5 * PATCH, pos_embed_interp="dinov2_reg", generator=_gen(0))
    with torch.no_grad():
        ref = resample_abs_pos_embed(model.pos_embed, new_size=list(grid), old_size=[5, 5], num_prefix_tokens=1)
        torch.testing.assert_close(model.interpolate_pos_embed(*grid), ref, atol=1e-6, rtol=1e-5)


def test_modes_differ_and_stored_grid_is_not_interpolated() -> None:
    a = build_backbone(arch="tiny", img_size=70, pos_embed_interp="dinov2", generator=_gen(0))
    b = build_backbone(arch="tiny", img_size=70, pos_embed_interp="dinov2_reg", generator=_gen(0))
    assert a.interpolate_pos_embed(5, 5) is a.pos_embed
    with torch.no_grad():
        assert (a.interpolate_pos_embed(8, 8) - b.interpolate_pos_embed(8, 8)).abs().max() > 1e-3


def test_interpolation_runs_in_float32_for_bf16_parameters() -> None:
    model = build_backbone(arch="tiny", img_size=70, generator=_gen(0)).to(torch.bfloat16)
    with torch.no_grad():
        got = model.interpolate_pos_embed(4, 7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, _meta_pos_embed_reference(model.pos_embed.float(), 4, 7, "dinov2"), atol=1e-6, rtol=1e-5
    )


def test_reg_mode_full_features_match_timm_dynamic_img_size() -> None:
    """timm's dynamic_img_size resampling (bicubic, size=, antialias) is Meta's reg-model rule."""
    ours = build_backbone(arch="tiny", img_size=70, pos_embed_interp="dinov2_reg", generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    ref = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=70, num_classes=0, dynamic_img_size=True, **TIMM_TINY
    ).eval()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "mask_token"}, strict=True)
    for h, w in [(42, 42), (56, 98)]:
        x = _images(2, h, w)
        with torch.no_grad():
            out = ours.forward_features(x)
            tokens = ref.forward_features(x)
        torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.patch, tokens[:, 1:], atol=1e-5, rtol=0)


def test_dinov2_mode_full_features_at_other_sizes_match_timm_with_reference_pos_embed() -> None:
    """Whole forward at 112x112 and non-square 56x98 against a timm model built at that size whose (non-interpolated)
    pos_embed is the numpy re-derivation of Meta's rule."""
    ours = build_backbone(arch="tiny", img_size=70, pos_embed_interp="dinov2", generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    for h, w in [(112, 112), (56, 98)]:
        ref = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=(h, w), num_classes=0, **TIMM_TINY
        ).eval()
        state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
        state["pos_embed"] = _meta_pos_embed_reference(ours.pos_embed, h // PATCH, w // PATCH, "dinov2")
        ref.load_state_dict(state, strict=True)
        x = _images(2, h, w)
        with torch.no_grad():
            out = ours.forward_features(x)
            tokens = ref.forward_features(x)
        assert out.patch.shape == (2, (h // PATCH) * (w // PATCH), 192)
        torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.patch, tokens[:, 1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# transformers' Dinov2Model (an independent implementation, incl. the iBOT mask token)
# ---------------------------------------------------------------------------------------------------------------


def _hf_dinov2_from(ours: VisionTransformer, image_size: int, pos_embed: torch.Tensor):
    transformers = pytest.importorskip("transformers")
    depth, dim = len(ours.blocks), ours.embed_dim
    config = transformers.Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=ours.num_heads,
        mlp_ratio=4,
        image_size=image_size,
        patch_size=ours.patch_size,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    hf = transformers.Dinov2Model(config).eval()
    sd = ours.state_dict()
    new = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": pos_embed,
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            new[dst + name + ".weight"] = sd[src + name + ".weight"]
            new[dst + name + ".bias"] = sd[src + name + ".bias"]
        for part, w, b in zip(
            "qkv", sd[src + "attn.qkv.weight"].chunk(3), sd[src + "attn.qkv.bias"].chunk(3), strict=True
        ):
            new[dst + f"attention.{part}_proj.weight"] = w
            new[dst + f"attention.{part}_proj.bias"] = b
        new[dst + "attention.o_proj.weight"] = sd[src + "attn.proj.weight"]
        new[dst + "attention.o_proj.bias"] = sd[src + "attn.proj.bias"]
        new[dst + "layer_scale1.lambda1"] = sd[src + "ls1.gamma"]
        new[dst + "layer_scale2.lambda1"] = sd[src + "ls2.gamma"]
    hf.load_state_dict(new, strict=True)
    return hf


def test_matches_transformers_dinov2_with_masks() -> None:
    ours = build_backbone(arch="tiny", img_size=70, generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    # At 112x112 the HF model is built for 112 and given Meta's interpolated embeddings, so it does not interpolate
    # (transformers' own rule is size= bicubic without offset or antialias, which is neither of Meta's).
    for size in (70, 112):
        g = size // PATCH
        hf = _hf_dinov2_from(ours, size, _meta_pos_embed_reference(ours.pos_embed, g, g, "dinov2"))
        x = _images(3, size, size, seed=size)
        masks = torch.rand(3, g * g, generator=_gen(size + 1)) < 0.4
        with torch.no_grad():
            for m in (None, masks):
                out = ours.forward_features(x, masks=m)
                ref = hf(pixel_values=x, bool_masked_pos=m).last_hidden_state
                torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-5, rtol=0)
                torch.testing.assert_close(out.patch, ref[:, 1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Mask token, registers, intermediate layers
# ---------------------------------------------------------------------------------------------------------------


def test_mask_token_replaces_patch_embedding_before_position() -> None:
    model = build_backbone(arch="tiny", img_size=42, num_registers=2, generator=_gen(0)).eval()
    _randomise_special_tokens(model)
    x = _images(2, 56, 42)  # non-square: 4 x 3 grid, interpolated pos-embed
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [0, 5, 11]] = True
    masks[1, [3]] = True
    with torch.no_grad():
        plain = model.prepare_tokens(x)
        masked = model.prepare_tokens(x, masks)
        pos = model.interpolate_pos_embed(4, 3)[0, 1:]
    patches_plain, patches_masked = plain[:, 3:], masked[:, 3:]  # [CLS, 2 registers, patches]
    expected = model.mask_token.detach() + pos  # (N, D)
    for b in range(2):
        torch.testing.assert_close(patches_masked[b][masks[b]], expected[masks[b]])
        torch.testing.assert_close(patches_masked[b][~masks[b]], patches_plain[b][~masks[b]], atol=0, rtol=0)
    torch.testing.assert_close(masked[:, :3], plain[:, :3], atol=0, rtol=0)
    with torch.no_grad():
        none = model.forward_features(x, masks=None)
        all_false = model.forward_features(x, masks=torch.zeros(2, 12, dtype=torch.bool))
    torch.testing.assert_close(none.cls, all_false.cls, atol=0, rtol=0)
    torch.testing.assert_close(none.patch, all_false.patch, atol=0, rtol=0)


def test_registers_have_no_position_and_shapes() -> None:
    model = build_backbone(arch="tiny", img_size=28, num_registers=4, generator=_gen(0)).eval()
    _randomise_special_tokens(model)
    x = _images(3, 42, 28)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        out = model.forward_features(x)
        pos = model.interpolate_pos_embed(3, 2)
    assert tokens.shape == (3, 1 + 4 + 6, 192)
    torch.testing.assert_close(tokens[:, 1:5], model.reg_token.detach().expand(3, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + pos[:, 0]).detach().expand(3, -1, -1)[:, 0])
    assert out.cls.shape == (3, 192) and out.registers.shape == (3, 4, 192) and out.patch.shape == (3, 6, 192)
    assert model.grid_size(42, 28) == (3, 2)


def test_intermediate_layers_match_timm_forward_intermediates() -> None:
    ours = build_backbone(arch="tiny", img_size=42, generator=_gen(0)).eval()
    _randomise_special_tokens(ours)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=42, num_classes=0, **TIMM_TINY)
    ref = ref.eval()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "mask_token"}, strict=True)
    x = _images(2, 42, 42)
    with torch.no_grad():
        outs = ours.get_intermediate_layers(x, 4)
        patches, prefixes = zip(
            *ref.forward_intermediates(
                x, indices=4, norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
            ),
            strict=True,
        )
        final = ours.forward_features(x)
    assert len(outs) == 4
    for out, patch, prefix in zip(outs, patches, prefixes, strict=True):
        torch.testing.assert_close(out.patch, patch, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cls, prefix[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[-1].cls, final.cls, atol=0, rtol=0)
    with pytest.raises(ValueError, match="depth"):  # a caller's bug, not a user error
        ours.get_intermediate_layers(x, 13)


# ---------------------------------------------------------------------------------------------------------------
# Training contract
# ---------------------------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient() -> None:
    model = build_backbone(arch="tiny", img_size=28, num_registers=2, drop_path_rate=0.1, generator=_gen(0)).train()
    x = _images(2, 28, 28)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[:, 1] = True
    for m in (None, masks):
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng():  # DropPath draws from the default generator
            torch.manual_seed(0)
            out = model.forward_features(x, masks=m)
        assert torch.isfinite(out.cls).all() and torch.isfinite(out.patch).all()
        (out.cls.square().mean() + out.patch.square().mean()).backward()
        for name, p in model.named_parameters():
            if name == "mask_token" and m is None:
                assert p.grad is None
                continue
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_drop_path_only_in_train_mode() -> None:
    model = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.5, generator=_gen(0))
    _randomise_special_tokens(model)
    assert [b.drop_path1.drop_prob for b in model.blocks] == [0.5] * 12  # uniform, like DINOv2
    linear = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.5, drop_path_uniform=False)
    assert [b.drop_path1.drop_prob for b in linear.blocks[1:]] == pytest.approx(list(np.linspace(0, 0.5, 12)[1:]))
    plain = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.0)
    plain.load_state_dict(model.state_dict())
    x = _images(8, 28, 28)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        model.train()
        a, b = model(x), model(x)
        assert (a - b).abs().max() > 1e-3  # different paths dropped on each call
        model.eval()
        plain.eval()
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def test_subset_residual_runs_the_branch_on_the_kept_samples_only() -> None:
    from raddino.models.vit import subset_residual

    x = torch.randn(10, 3, 4, generator=_gen(1))
    seen: list[int] = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0])
        return 2.0 * t + 1.0

    with torch.random.fork_rng():
        torch.manual_seed(3)
        out = subset_residual(x, branch, 0.3)
        torch.manual_seed(3)
        kept = torch.randperm(10)[:7]  # the same draw: int(10 * 0.7) samples keep the branch
    assert seen == [7]  # the branch computed 7 of 10 samples, not 10
    expected = x.clone()
    expected[kept] += (10 / 7) * (2.0 * x[kept] + 1.0)
    torch.testing.assert_close(out, expected)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(out[dropped], x[dropped])  # the others pass through untouched
    # unbiased: the mean over draws is x + branch(x), as with per-sample drop path
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mean = torch.stack([subset_residual(x, lambda t: 2.0 * t + 1.0, 0.3) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, x + 2.0 * x + 1.0, atol=0.15, rtol=0.05)
    assert subset_residual(x[:1], branch, 0.9).shape == (1, 3, 4) and seen[-1] == 1  # at least one sample runs


def test_subset_drop_path_blocks_equal_timm_blocks_in_eval_and_train_gradients() -> None:
    sample = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.4, generator=_gen(0))
    subset = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.4, drop_path_mode="subset")
    _randomise_special_tokens(sample)
    assert list(subset.state_dict()) == list(sample.state_dict())  # checkpoints move between the modes
    subset.load_state_dict(sample.state_dict())
    x = _images(8, 28, 28)
    sample.eval(), subset.eval()
    with torch.no_grad():
        torch.testing.assert_close(subset(x), sample(x), atol=0, rtol=0)  # eval: no drop path in either
    subset.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = subset(x)
        a.sum().backward()
        b = subset(x)
    assert all(p.grad is not None for n, p in subset.named_parameters() if n.startswith("blocks."))
    assert (b - a).abs().max() > 1e-3  # other subsets dropped on the next call
    teacher = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.4, drop_path_mode="subset")
    teacher.load_state_dict(sample.state_dict())
    teacher.set_drop_path_rate(0.0)
    teacher.train()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), sample.eval()(x), atol=1e-6, rtol=1e-6)  # rate 0: the plain block
    with pytest.raises(RaddinoError, match="drop_path_mode"):
        build_backbone(arch="tiny", img_size=28, drop_path_mode="batch")


@pytest.mark.parametrize("packed", [False, True], ids=["per-size", "packed"])
def test_subset_drop_path_under_activation_checkpointing_recomputes_the_same_subsets(packed: bool) -> None:
    """Checkpointed blocks rerun their forward in backward; the recomputed subsets must be the drawn ones (also for
    packed crops of two sizes)."""
    grads = []
    for every in (0, 1):
        model = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.4, drop_path_mode="subset")
        model.load_state_dict(build_backbone(arch="tiny", img_size=28, generator=_gen(0)).state_dict())
        model.set_grad_checkpointing(every=every)
        model.train()
        with torch.random.fork_rng():
            torch.manual_seed(5)
            if packed:
                outs = model.forward_features_packed([_images(8, 28, 28), _images(8, 14, 14, seed=1)], [None, None])
                sum(o.cls.sum() + o.patch.sum() for o in outs).backward()
            else:
                model(_images(8, 28, 28)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def _packed_pair(mode: str, rate: float) -> VisionTransformer:
    model = build_backbone(arch="tiny", img_size=56, num_registers=2, drop_path_rate=rate, drop_path_mode=mode)
    model.load_state_dict(build_backbone(arch="tiny", img_size=56, num_registers=2, generator=_gen(0)).state_dict())
    _randomise_special_tokens(model)
    return model


@pytest.mark.parametrize("mode", ["sample", "subset"])
def test_packed_forward_equals_one_forward_per_crop_size(mode: str) -> None:
    """Global crops (masked, 4 x 4 grid) and local crops (2 x 2 grid) through the blocks in one packed pass give the
    outputs and the gradients of one forward_features call per crop size; attention stays within each image."""
    globs, locs = _images(6, 56, 56, seed=1), _images(12, 28, 28, seed=2)
    masks = torch.rand(6, 16, generator=_gen(3)) < 0.4
    runs = []
    for packed in (False, True):
        model = _packed_pair(mode, 0.0)
        model.train()
        if packed:
            outs = model.forward_features_packed([globs, locs], [masks, None])
        else:
            outs = [model.forward_features(globs, masks), model.forward_features(locs)]
        loss = sum((o.cls.pow(2).sum() + o.patch.sin().sum() + o.registers.mean()) * k for k, o in enumerate(outs, 1))
        loss.backward()
        runs.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (packed, packed_grads) = runs
    assert [tuple(o.patch.shape) for o in packed] == [(6, 16, 192), (12, 4, 192)]
    for a, b in zip(plain, packed, strict=True):
        for name in a._fields:
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == packed_grads.keys()
    for name, grad in plain_grads.items():
        assert grad is not None, name
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # a local crop's output depends on its own image only: change one, the others and the globals stay
    model = _packed_pair(mode, 0.0).eval()
    with torch.no_grad():
        before = model.forward_features_packed([globs, locs], [masks, None])
        locs2 = locs.clone()
        locs2[3] += 1.0
        after = model.forward_features_packed([globs, locs2], [masks, None])
    changed = (after[1].cls - before[1].cls).abs().amax(-1) > 1e-4
    assert changed.tolist() == [i == 3 for i in range(12)]
    torch.testing.assert_close(after[0].cls, before[0].cls, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one mask"):
        model.forward_features_packed([globs, locs], [masks])


@pytest.mark.parametrize("mode", ["sample", "subset"])
def test_packed_drop_path_draws_per_sample_like_the_unpacked_block(mode: str) -> None:
    """With stochastic depth, one packed group draws exactly what the unpacked forward draws (same seed, same
    outputs); with two groups, subset mode runs the branch on exactly int(B * (1 - rate)) samples of every group
    (sample mode on all of them), and train mode differs from eval mode (something was dropped)."""
    model = _packed_pair(mode, 0.5).train()
    x = _images(8, 56, 56, seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        plain = model.forward_features(x)
        torch.manual_seed(7)
        (packed,) = model.forward_features_packed([x], [None])
    for name in plain._fields:
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), atol=1e-5, rtol=1e-5)

    block = model.blocks[0]
    kept_rows: list[list[int]] = []
    block.mlp.register_forward_hook(lambda _m, args, _o: kept_rows.append(args[0].shape[0]))
    tokens = [torch.randn(8, 5, 192, generator=_gen(5)), torch.randn(6, 3, 192, generator=_gen(6))]
    flat = torch.cat([t.reshape(-1, 192) for t in tokens])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = block(flat, ((8, 5), (6, 3)))
    assert out.shape == flat.shape
    eval_out = block.eval()(flat, ((8, 5), (6, 3)))
    if mode == "subset":  # 4 of 8 and 3 of 6 samples ran the MLP branch: 4 * 5 + 3 * 3 token rows
        assert kept_rows == [4 * 5 + 3 * 3, 8 * 5 + 6 * 3]
    else:
        assert kept_rows == [8 * 5 + 6 * 3] * 2
    assert not torch.allclose(out, eval_out, atol=1e-4)  # something was dropped


def test_set_drop_path_rate_matches_the_constructor_and_keeps_the_state_dict() -> None:
    model = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.2, generator=_gen(0))
    keys = list(model.state_dict())
    model.set_drop_path_rate(0.5, uniform=False)
    built = build_backbone(arch="tiny", img_size=28, drop_path_rate=0.5, drop_path_uniform=False)
    assert model.drop_path_rates == built.drop_path_rates == pytest.approx(list(np.linspace(0, 0.5, 12)))
    model.set_drop_path_rate(0.0)
    assert model.drop_path_rates == [0.0] * 12 and list(model.state_dict()) == keys
    x = _images(4, 28, 28)
    with torch.no_grad():
        model.train()
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)  # nothing left to drop in train mode
    with pytest.raises(RaddinoError, match="drop_path_rate"):
        model.set_drop_path_rate(1.0)


def test_bad_arguments_raise_user_errors() -> None:
    with pytest.raises(RaddinoError, match="arch"):
        build_backbone(arch="huge", img_size=28)
    with pytest.raises(RaddinoError, match="patch_size"):
        build_backbone(arch="tiny", img_size=30)
    with pytest.raises(RaddinoError, match="pos_embed_interp"):
        build_backbone(arch="tiny", img_size=28, pos_embed_interp="bilinear")  # type: ignore[arg-type]
    model = build_backbone(arch="tiny", img_size=28)
    with pytest.raises(RaddinoError, match="patch size"):
        model(_images(1, 30, 28))
    with pytest.raises(ValueError, match="masks"):
        model.forward_features(_images(1, 28, 28), masks=torch.zeros(1, 5, dtype=torch.bool))


def test_layerscale_none_disables_layerscale() -> None:
    model = build_backbone(arch="tiny", img_size=28, layerscale=None)
    assert not any(".ls1." in n or ".ls2." in n for n, _ in model.named_parameters())
    assert torch.isfinite(model(_images(1, 28, 28))).all()


# ---------------------------------------------------------------------------------------------------------------
# DINOHead
# ---------------------------------------------------------------------------------------------------------------


def test_dino_head_matches_explicit_recomputation_and_weight_norm() -> None:
    head = DINOHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=8, nlayers=3, generator=_gen(0))
    names = [n for n, _ in head.named_parameters()]
    assert names == [
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight",
    ]
    x = torch.randn(5, 24, generator=_gen(1))
    logits = head(x)
    assert logits.shape == (5, 40) and (head.in_dim, head.out_dim, head.bottleneck_dim) == (24, 40, 8)

    # Explicit recomputation with plain tensor ops.
    p = dict(head.named_parameters())
    h = x
    for i in (0, 2, 4):
        h = h @ p[f"mlp.{i}.weight"].T + p[f"mlp.{i}.bias"]
        if i != 4:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    h = h / h.square().sum(-1, keepdim=True).sqrt()
    v = p["last_layer.weight"]
    protos = v / v.square().sum(1, keepdim=True).sqrt()
    torch.testing.assert_close(logits, h @ protos.T)
    torch.testing.assert_close(head.prototypes().norm(dim=1), torch.ones(40))

    # Same as torch's weight_norm parametrisation with g == 1 and v == last_layer.weight (DINOv2's head).
    wn = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 40, bias=False))
    with torch.no_grad():
        wn.parametrizations.weight.original0.fill_(1.0)
        wn.parametrizations.weight.original1.copy_(v)
    torch.testing.assert_close(logits, wn(h))

    logits.sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in head.parameters())


def test_dino_head_init_and_single_layer() -> None:
    head = DINOHead(in_dim=64, out_dim=16, hidden_dim=512, bottleneck_dim=256, nlayers=2, generator=_gen(0))
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and head.mlp[0].bias.abs().max() == 0
    one = DINOHead(in_dim=12, out_dim=7, bottleneck_dim=5, nlayers=1, generator=_gen(0))
    assert [n for n, _ in one.named_parameters()] == ["mlp.0.weight", "mlp.0.bias", "last_layer.weight"]
    assert one(torch.randn(3, 12, generator=_gen(2))).shape == (3, 7)
    with pytest.raises(ValueError, match="nlayers"):  # a bug in the caller; config validation names the key
        DINOHead(in_dim=12, nlayers=0)
