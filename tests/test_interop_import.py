"""Import of DINOv2 hub / timm / HF transformers weights: features equal the source model's at 518, 224 and 98 px.

Sources are built locally with random weights (no downloads): timm ``vit_small_patch14[_reg4]_dinov2`` and
``vit_giant_patch14_dinov2`` at a tiny width/depth, transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``
from small configs, and Meta's hub layout by renaming. Meta's own ``interpolate_pos_encoding`` is transcribed below
as the reference for the hub layout (the ``dinov2`` package is not installed).
"""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import raddino  # noqa: F401  (torchvision shim before timm)
from raddino.errors import RaddinoError
from raddino.interop import formats
from raddino.interop.load import check_model_config, init_meta_arch, load_backbone, resolve_pos_embed_interp
from raddino.interop.source import SourceInfo, inspect_source, read_source
from raddino.models.heads import DINOHead
from raddino.models.vit import VisionTransformer
from raddino.ssl import SSLMetaArch

DIM, DEPTH, HEADS, PATCH = 64, 2, 2, 14
SIZES = (518, 224, 98)
TOL = 1e-4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=_gen(seed))


@torch.no_grad()
def _perturb(module: nn.Module, seed: int) -> None:
    """O(1) tokens and LayerScale, noise on every weight: comparisons must not pass by near-zero contributions."""
    g = _gen(seed)
    for name, p in module.named_parameters():
        if name.endswith(("gamma", "lambda1")):
            p.fill_(0.5)
        elif name.endswith(("cls_token", "reg_token", "register_tokens", "mask_token")):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _timm_model(name: str, *, img_size: int = 518, dynamic: bool = True, seed: int = 0, **kw) -> nn.Module:
    args = {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS} | kw
    model = timm.create_model(
        name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=dynamic, **args
    )
    _perturb(model, seed)
    return model.eval()


def _timm_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(x)
    return out[:, 0], out[:, model.num_prefix_tokens :]


def _ours_tokens(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(x)
    return out.cls, out.patch


def _assert_close(ref: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    assert ref[1].shape == got[1].shape, what
    assert (ref[0] - got[0]).abs().max().item() <= TOL, f"{what}: CLS differs"
    assert (ref[1] - got[1]).abs().max().item() <= TOL, f"{what}: patch tokens differ"
    assert ref[1].abs().mean() > 0.1  # not vacuous


def _import(path, *, fmt: str = "auto", img_size: int = 518, **kw) -> VisionTransformer:
    source = read_source(path, fmt=fmt)
    info = source.info
    model = VisionTransformer(
        img_size=img_size,
        embed_dim=info.embed_dim,
        depth=info.depth,
        num_heads=HEADS,
        num_registers=info.num_registers,
        pos_embed_interp=info.pos_embed_interp,
        **kw,
    )
    load_backbone(model, source)
    return model.eval()


def meta_interpolate_pos_encoding(pos_embed, w, h, *, patch_size, interpolate_offset, interpolate_antialias):
    """Transcribed from facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding`` (``x`` replaced by
    the image side lengths ``w, h``)."""
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _meta_reference(hub: dict, name: str, size: int, *, registers: bool, **kw) -> nn.Module:
    """timm model built at ``size`` whose weights are the hub state with Meta's interpolated position embedding
    (offset 0.1 / no antialias; registers: no offset, antialias): Meta's forward at ``size``."""
    offset, antialias = (0.0, True) if registers else (0.1, False)
    pos = meta_interpolate_pos_encoding(
        hub["pos_embed"], size, size, patch_size=PATCH, interpolate_offset=offset, interpolate_antialias=antialias
    )
    state = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
    state = {k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): v for k, v in state.items()}
    if registers:  # timm's register layout: no CLS position (folded into cls_token)
        state["reg_token"] = hub["register_tokens"]
        state["cls_token"] = hub["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    else:
        state["pos_embed"] = pos
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kw).eval()
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_import_matches_timm_at_all_sizes(tmp_path, name) -> None:
    source = _timm_model(name)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    info = inspect_source(path)
    assert (info.format, info.img_size, info.pos_embed_interp) == ("timm", 518, "dinov2_reg")
    assert info.num_registers == (4 if "reg4" in name else 0)
    ours = _import(path)
    for size in SIZES:
        x = _images(size, seed=size)
        _assert_close(_timm_tokens(source, x), _ours_tokens(ours, x), f"{name} at {size}")


def test_timm_state_dict_in_torch_file(tmp_path) -> None:
    source = _timm_model("vit_small_patch14_reg4_dinov2", seed=3)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as many training scripts save
    ours = _import(path)
    x = _images(224)
    _assert_close(_timm_tokens(source, x), _ours_tokens(ours, x), "torch file")


# ---------------------------------------------------------------------------------------------------------------
# Meta's hub layout
# ---------------------------------------------------------------------------------------------------------------


def _hub_state(name: str, *, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A hub-layout state dict (as dinov2_vit*14[_reg4]_pretrain.pth) renamed from a random timm model."""
    timm_state = _timm_model(name, seed=seed, **kw).state_dict()
    g = _gen(seed + 100)
    hub = {k: v.clone() for k, v in timm_state.items() if k != "reg_token"}
    hub["mask_token"] = torch.randn(1, hub["cls_token"].shape[-1], generator=g)
    if "reg_token" in timm_state:
        hub["register_tokens"] = timm_state["reg_token"].clone()
        cls_pos = torch.randn(1, 1, hub["cls_token"].shape[-1], generator=g)
        hub["pos_embed"] = torch.cat((cls_pos, timm_state["pos_embed"]), dim=1)
    if "giant" in name:
        hub = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in hub.items()}
    return hub


@pytest.mark.parametrize(
    ("name", "registers"), [("vit_small_patch14_dinov2", False), ("vit_small_patch14_reg4_dinov2", True)]
)
def test_dinov2_hub_import_matches_meta_interpolation(tmp_path, name, registers) -> None:
    hub = _hub_state(name, seed=5)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(hub, path)
    info = inspect_source(path)
    assert info.format == "dinov2" and info.pos_embed_interp == ("dinov2_reg" if registers else "dinov2")
    ours = _import(path)
    torch.testing.assert_close(ours.mask_token, hub["mask_token"])
    for size in SIZES:
        x = _images(size, seed=size + 1)
        reference = _meta_reference(hub, name, size, registers=registers, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
        _assert_close(_timm_tokens(reference, x), _ours_tokens(ours, x), f"hub {name} at {size}")


def test_dinov2_giant_swiglu_and_chunked_teacher_checkpoint(tmp_path) -> None:
    """ViT-g's SwiGLU (mlp.w12 / w3) from a Meta training checkpoint: teacher backbone, block_chunks names."""
    dim = 48  # timm's packed SwiGLU width int(48 * 5.33334) = 256 = 2 * Meta's (int(192 * 2 / 3) + 7) // 8 * 8
    hub = _hub_state("vit_giant_patch14_dinov2", seed=7, embed_dim=dim)
    # block_chunks=DEPTH: one block per chunk, named blocks.<chunk>.<global index>.
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in hub.items()}
    assert "blocks.1.1.mlp.w12.weight" in chunked
    student = {f"student.backbone.{k}": torch.zeros_like(v) for k, v in chunked.items()}
    teacher = {f"teacher.backbone.{k}": v for k, v in chunked.items()}
    path = tmp_path / "model_0001.rank_0.pth"
    torch.save({"model": student | teacher, "iteration": 10}, path)
    ours = _import(path, mlp_ratio=2.66667 * 2, swiglu=True)
    assert ours.embed_dim == dim
    for size in (518, 224):
        x = _images(size, seed=9)
        reference = _meta_reference(
            hub, "vit_giant_patch14_dinov2", size, registers=False, embed_dim=dim, depth=DEPTH, num_heads=HEADS
        )
        _assert_close(_timm_tokens(reference, x), _ours_tokens(ours, x), f"giant at {size}")


# ---------------------------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------------------------


def _hf_model(*, registers: int = 0, swiglu: bool = False, dim: int = DIM, seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=dim, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=518, patch_size=PATCH)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=swiglu, **common))
    _perturb(model, seed)
    return model.eval()


def _hf_tokens(model: nn.Module, x: torch.Tensor, registers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    return hidden[:, 0], hidden[:, 1 + registers :]


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_directory_import_matches_transformers_at_all_sizes(tmp_path, registers) -> None:
    source = _hf_model(registers=registers, seed=11)
    source.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors (RAD-DINO's format)
    info = inspect_source(tmp_path / "hf")
    assert info.format == "hf" and info.num_heads == HEADS and info.num_registers == registers
    assert info.pos_embed_interp == ("dinov2_reg" if registers else "hf")
    ours = _import(tmp_path / "hf")
    torch.testing.assert_close(ours.mask_token, source.embeddings.mask_token)
    for size in SIZES:
        x = _images(size, seed=size + 2)
        _assert_close(_hf_tokens(source, x, registers), _ours_tokens(ours, x), f"hf registers={registers} at {size}")


def test_hf_swiglu_with_in_memory_names(tmp_path) -> None:
    """transformers 5.x module names (q_proj / gate_proj / up_proj ...) written directly, plus SwiGLU."""
    source = _hf_model(swiglu=True, dim=48, seed=13)
    directory = tmp_path / "hf5"
    directory.mkdir()
    source.config.to_json_file(str(directory / "config.json"))
    state = {f"dinov2.{k}": v.contiguous() for k, v in source.state_dict().items()}  # as in ForImageClassification
    assert any("gate_proj" in k for k in state)
    save_file(state, str(directory / "model.safetensors"))
    ours = _import(directory, mlp_ratio=2.66667 * 2, swiglu=True)
    for size in (518, 98):
        x = _images(size, seed=4)
        _assert_close(_hf_tokens(source, x), _ours_tokens(ours, x), f"hf swiglu at {size}")


def test_other_stored_grid_resamples_once_with_the_source_rule(tmp_path) -> None:
    """model.img_size=224 with a 518-px source: exact at 224 (the grid is resampled with the source's rule)."""
    source = _hf_model(seed=17)
    source.save_pretrained(tmp_path / "hf")
    src = read_source(tmp_path / "hf")
    ours = VisionTransformer(img_size=224, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pos_embed_interp="hf")
    report = load_backbone(ours, src)
    assert any("resampled" in note for note in report.notes)
    x = _images(224, seed=5)
    _assert_close(_hf_tokens(source, x), _ours_tokens(ours.eval(), x), "resampled grid at 224")


# ---------------------------------------------------------------------------------------------------------------
# the meta-architecture and heads
# ---------------------------------------------------------------------------------------------------------------


class MetaDINOHead(nn.Module):
    """Transcribed from facebookresearch/dinov2 ``dinov2/layers/dino_head.py`` (use_bn=False, mlp_bias=True), with the
    current weight-norm parametrization."""

    def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


def _meta_arch(*, depth: int = DEPTH, dim: int = DIM, registers: int = 0, rule: str = "hf", ibot: bool = False):
    def head() -> DINOHead:
        return DINOHead(in_dim=dim, out_dim=96, hidden_dim=32, bottleneck_dim=16, nlayers=3, generator=_gen(1))

    backbone = VisionTransformer(
        img_size=518,
        embed_dim=dim,
        depth=depth,
        num_heads=HEADS,
        num_registers=registers,
        pos_embed_interp=rule,
        generator=_gen(0),
    )
    return SSLMetaArch(
        backbone=backbone,
        dino_head=head(),
        ibot_head=head() if ibot else None,
        n_global=2,
        n_local=2,
        student_temp=0.1,
        centering="sinkhorn_knopp",
        sinkhorn_iterations=3,
        center_momentum=0.9,
        dino_weight=1.0,
        ibot_weight=1.0,
        koleo_weight=0.1,
    )


def _meta_head(seed: int) -> MetaDINOHead:
    torch.manual_seed(seed)
    head = MetaDINOHead(DIM, 96, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    _perturb(head.mlp, seed)
    return head.eval()


@pytest.mark.parametrize("legacy_names", [True, False])
def test_init_meta_arch_loads_student_teacher_and_meta_head(tmp_path, legacy_names) -> None:
    source = _hf_model(seed=19)
    source.save_pretrained(tmp_path / "rad-dino")
    meta_head = _meta_head(seed=23)
    state = meta_head.state_dict()
    if legacy_names:  # torch.nn.utils.weight_norm names, as Meta's released code writes them
        state["last_layer.weight_g"] = state.pop("last_layer.parametrizations.weight.original0")
        state["last_layer.weight_v"] = state.pop("last_layer.parametrizations.weight.original1")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dino_head.safetensors"))
    model = _meta_arch(ibot=True)
    report = init_meta_arch(model, init_from=tmp_path / "rad-dino", init_head=tmp_path / "dino_head.safetensors")
    assert report.loaded == len(model.student["backbone"].state_dict())
    assert report.heads["dino_head"].startswith("imported") and report.heads["ibot_head"].startswith("fresh")
    x = _images(98, seed=6)
    ref = _hf_tokens(source, x)
    for tower in (model.student, model.teacher):
        _assert_close(ref, _ours_tokens(tower["backbone"].eval(), x), "meta-arch backbone")
        feats = torch.randn(5, DIM, generator=_gen(2))
        with torch.no_grad():
            torch.testing.assert_close(tower["dino_head"](feats), meta_head(feats), atol=1e-5, rtol=0)
    for (name, p), q in zip(model.student.named_parameters(), model.teacher.parameters(), strict=True):
        if "ibot_head" not in name:
            assert torch.equal(p, q), name


def test_fresh_heads_are_kept_and_reported(tmp_path) -> None:
    source = _hf_model(seed=29)
    source.save_pretrained(tmp_path / "hf")
    model = _meta_arch()
    before = {k: v.clone() for k, v in model.student["dino_head"].state_dict().items()}
    report = init_meta_arch(model, init_from=tmp_path / "hf")
    assert report.heads == {"dino_head": "fresh (random init)"}
    assert any("fresh on a pretrained backbone" in note for note in report.notes)
    for k, v in model.student["dino_head"].state_dict().items():
        assert torch.equal(v, before[k])


def test_head_with_weight_norm_gains_is_refused_unless_not_strict(tmp_path) -> None:
    source = _hf_model(seed=31)
    source.save_pretrained(tmp_path / "hf")
    head = _meta_head(seed=37)
    state = head.state_dict()
    state["last_layer.parametrizations.weight.original0"][:3] = 1.5
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "head.safetensors"))
    with pytest.raises(RaddinoError, match="weight_g"):
        init_meta_arch(_meta_arch(), init_from=tmp_path / "hf", init_head=tmp_path / "head.safetensors")
    model = _meta_arch()
    report = init_meta_arch(model, init_from=tmp_path / "hf", init_head=tmp_path / "head.safetensors", strict=False)
    assert any("max |g - 1| = 0.5" in note for note in report.notes)
    v = state["last_layer.parametrizations.weight.original1"]
    torch.testing.assert_close(model.teacher["dino_head"].prototypes(), F.normalize(v, dim=1))


def test_mismatches_are_listed_key_by_key(tmp_path) -> None:
    source = _timm_model("vit_small_patch14_reg4_dinov2", seed=41)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    deeper = _meta_arch(depth=3, registers=0, rule="dinov2_reg")
    with pytest.raises(RaddinoError) as err:
        init_meta_arch(deeper, init_from=path)
    message = str(err.value)
    assert "missing in the source: blocks.2.attn.qkv.weight" in message
    assert "not in the model (unexpected): reg_token" in message
    assert "init_strict=false" in message
    report = init_meta_arch(deeper, init_from=path, strict=False)
    assert "blocks.2.mlp.fc1.weight" in report.missing and report.unexpected == ["reg_token"]
    torch.testing.assert_close(deeper.teacher["backbone"].blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    narrow = _meta_arch(dim=32, registers=4, rule="dinov2_reg")
    with pytest.raises(RaddinoError) as err:
        init_meta_arch(narrow, init_from=path)
    assert "shape mismatch: blocks.0.attn.qkv.weight: source (192, 64), model (96, 32)" in str(err.value)
    assert "... and 10 more" in str(err.value)  # 35 mismatches, 25 listed


def test_head_count_mismatch_is_an_error_even_when_not_strict(tmp_path) -> None:
    source = _hf_model(seed=43)
    source.save_pretrained(tmp_path / "hf")
    model = VisionTransformer(img_size=518, embed_dim=DIM, depth=DEPTH, num_heads=4, pos_embed_interp="hf")
    with pytest.raises(RaddinoError, match="2 attention heads, the model 4"):
        load_backbone(model, read_source(tmp_path / "hf"), strict=False)


# ---------------------------------------------------------------------------------------------------------------
# config checks
# ---------------------------------------------------------------------------------------------------------------


def test_inspect_detects_standard_arch_and_config_check(tmp_path) -> None:
    source = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56, embed_dim=192, num_heads=3
    )
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    info = inspect_source(path)
    assert (info.arch, info.num_heads, info.depth, info.img_size, info.num_registers) == ("tiny", 3, 12, 56, 4)
    with pytest.raises(RaddinoError) as err:
        check_model_config(info, arch="small", patch_size=14, num_registers=0, img_size=56, pos_embed_interp="auto")
    assert "set model.arch=tiny" in str(err.value) and "set model.num_registers=4" in str(err.value)
    notes = check_model_config(info, arch="tiny", patch_size=14, num_registers=4, img_size=224, pos_embed_interp="hf")
    assert any("model.img_size=56" in n for n in notes) and any("'dinov2_reg'" in n for n in notes)
    assert resolve_pos_embed_interp("auto", info) == "dinov2_reg"
    assert resolve_pos_embed_interp("auto", None) == "dinov2"
    assert resolve_pos_embed_interp("hf", info) == "hf"


def test_non_standard_source_size_is_named() -> None:
    info = SourceInfo(
        path="x",
        format="timm",
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=None,
        patch_size=14,
        img_size=518,
        num_registers=0,
        swiglu=False,
        layerscale=True,
        has_mask_token=False,
        pos_embed_interp="dinov2_reg",
        arch=None,
    )
    with pytest.raises(RaddinoError, match="non-standard size"):
        check_model_config(info, arch="base", patch_size=14, num_registers=0, img_size=518, pos_embed_interp="auto")


# ---------------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object would run code that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, writer) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"cls_token": torch.zeros(1, 1, 4), "evil": _Payload(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(RaddinoError, match="refused"):
        read_source(path)
    assert not marker.exists()
    # positive control: an unrestricted unpickler does run the payload
    if writer == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


def test_truncated_and_wrong_files_give_clear_errors(tmp_path) -> None:
    source = _timm_model("vit_small_patch14_dinov2", seed=47)
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RaddinoError, match="not a valid safetensors file"):
        read_source(tmp_path / "cut.safetensors")
    torch.save(source.state_dict(), tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(RaddinoError, match="cut.pth"):
        read_source(tmp_path / "cut.pth")
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    save_file(resnet, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(RaddinoError, match="not a ViT backbone checkpoint: no cls_token"):
        read_source(tmp_path / "resnet.safetensors")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(RaddinoError, match="not a DINOv2 model"):
        read_source(tmp_path / "bert")
    with pytest.raises(RaddinoError, match="huggingface-cli download microsoft/rad-dino"):
        read_source("microsoft/rad-dino")
    with pytest.raises(RaddinoError, match="holds hf names, not the timm layout"):
        hf = _hf_model(seed=53)
        hf.save_pretrained(tmp_path / "hf")
        read_source(tmp_path / "hf" / "model.safetensors", fmt="timm")


def test_head_maps_round_trip() -> None:
    head = DINOHead(in_dim=8, out_dim=12, hidden_dim=6, bottleneck_dim=4, nlayers=1, generator=_gen(0))
    meta = formats.head_to_meta(head.state_dict())
    assert set(meta) == {"mlp.0.weight", "mlp.0.bias", "last_layer.weight_g", "last_layer.weight_v"}
    meta_bare = {k.replace("mlp.0.", "mlp."): v for k, v in meta.items()}  # Meta's nlayers=1 bare Linear
    back, deviation = formats.head_from_meta(meta_bare)
    assert deviation == 0.0
    assert all(torch.equal(back[k], v) for k, v in head.state_dict().items())


def test_pretrain_continues_from_timm_reg4_weights(tmp_path) -> None:
    """`raddino pretrain model.init_from=FILE`: both towers start as the source (the `auto` rule follows it), the
    run trains, and the resolved rule is recorded for export / eval; a wrong model.* is an error naming the key.
    model.pos_embed_interp is left at its default (auto)."""
    from raddino.cli import main
    from raddino.config import load_config
    from raddino.train import build_training, fit

    source = _timm_model("vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=192, depth=12, num_heads=3, seed=41)
    path = tmp_path / "vit-tiny-reg4.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    overrides = [
        f"model.init_from={path}",
        "model.num_registers=4",
        "crops.n_local=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.synthetic_count=16",
        "head.out_dim=256",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    training = build_training(load_config("tiny_cpu", overrides))
    x = _images(98, seed=8)
    for tower in (training.model.student, training.model.teacher):
        assert tower["backbone"].pos_embed_interp == "dinov2_reg"
        _assert_close(_timm_tokens(source, x), _ours_tokens(tower["backbone"].eval(), x), "pretrain init_from")
    assert fit(training).steps == 2
    assert json.loads((tmp_path / "run" / "derived.json").read_text())["pos_embed_interp"] == "dinov2_reg"
    wrong = [o for o in overrides if not o.startswith("model.num_registers")]
    assert main(["pretrain", "--config", "tiny_cpu", *wrong]) == 2


def test_missing_weight_file_is_not_taken_for_a_hub_id(tmp_path):
    """``bad/nonexistent.pth`` is a missing file; ``owner/name`` without a suffix gets the hub-id hint."""
    with pytest.raises(RaddinoError, match="no such file or directory: bad/nonexistent.pth") as err:
        read_source("bad/nonexistent.pth")
    assert "hub" not in str(err.value)
    with pytest.raises(RaddinoError, match="hub ids are not downloaded"):
        read_source("microsoft/rad-dino-missing")


def test_non_strict_import_warns_once_and_teacher_equals_student(tmp_path, caplog) -> None:
    """init_strict=false: one warning for the model (not one per tower), and both towers hold the same weights --
    imported keys from the source, the rest from the shared initialisation."""
    source = _timm_model("vit_small_patch14_reg4_dinov2", seed=41)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    deeper = _meta_arch(depth=3, registers=0, rule="dinov2_reg")
    with caplog.at_level("WARNING", logger="raddino.interop.load"):
        init_meta_arch(deeper, init_from=path, strict=False)
    warnings = [r for r in caplog.records if "keys not loaded" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    student, teacher = deeper.student["backbone"].state_dict(), deeper.teacher["backbone"].state_dict()
    assert student.keys() == teacher.keys()
    for key in student:
        assert torch.equal(student[key], teacher[key]), key
    torch.testing.assert_close(student["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
