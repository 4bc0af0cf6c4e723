"""Backbone adapters build offline with random weights, preprocess as declared and yield their declared dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import FEATURE_PROTOCOLS, GRIDS, Preprocess, layer_index
from raddino.eval.adapters.registry import build_backbone_adapter, parse_spec


def _batch(backbone, n: int = 2) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.stack([backbone.preprocess(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)])


def _check_dims(backbone) -> dict[str, torch.Tensor]:
    protocols = [p for p in FEATURE_PROTOCOLS if p != "dinov2_linear" or backbone.has_cls]
    if not backbone.patch_dim:
        protocols = ["cls"]
    with torch.no_grad():
        if backbone.patch_dim:  # grid protocols finer than the backbone's token grid do not apply (tested apart)
            side = round(backbone.tokens(_batch(backbone), 1)[-1].patch.shape[1] ** 0.5)
            protocols = [p for p in protocols if GRIDS.get(p, 0) <= side]
        feats = backbone.features(_batch(backbone), protocols)
    for protocol, value in feats.items():
        assert value.shape == (2, backbone.feature_dim(protocol)), protocol
        assert torch.isfinite(value).all()
    return feats


# SAM's encoder is natively 1024 px (too slow on a CPU): timm's img_size override builds it at 64 px.
TIMM_CASES = [
    ("timm:vit_small_patch14_dinov2", 28, 384, True),
    ("timm:vit_small_patch14_reg4_dinov2", 28, 384, True),
    ("timm:vit_base_patch16_224", 32, 768, True),
    ("timm:samvit_base_patch16", 64, 256, False),
    ("timm:focalnet_tiny_srf", 64, 768, False),
    ("timm:resnet50", 64, 2048, False),
]


@pytest.mark.parametrize(("spec", "size", "dim", "has_cls"), TIMM_CASES)
def test_timm_adapters_build_offline_and_yield_declared_dims(spec, size, dim, has_cls):
    backbone = build_backbone_adapter(spec, random_init=True, img_size=size)
    assert backbone.preprocess.size == size and backbone.has_cls == has_cls and backbone.cls_dim == dim
    feats = _check_dims(backbone)
    if has_cls:  # the last of the 4 CLS tokens of dinov2_linear is the final CLS token
        d = backbone.cls_dim
        torch.testing.assert_close(feats["dinov2_linear"][:, 3 * d : 4 * d], feats["cls"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats["dinov2_linear"][:, 4 * d :], feats["mean"], atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(RaddinoError, match="no CLS token"):
            backbone.feature_dim("dinov2_linear")


# (protocol, cells a side, input px giving 2 x 2 tokens a cell at patch 14, input px with too few tokens)
GRID_CASES = [("cls_grid", 2, 56, 14), ("cls_grid4", 4, 112, 42)]


@pytest.mark.parametrize(("protocol", "cells", "size", "too_small"), GRID_CASES)
def test_cls_grid_is_the_cls_token_and_row_major_cell_means_of_the_patch_grid(protocol, cells, size, too_small):
    backbone = build_backbone_adapter("timm:vit_small_patch14_dinov2", random_init=True, img_size=size)
    side = 2 * cells  # tokens a side
    x = _batch(backbone)
    with torch.no_grad():
        feats = backbone.features(x, ["cls", protocol])
        patch = backbone.tokens(x, 1)[-1].patch.reshape(2, side, side, -1)  # (B, row, col, D)
    d = backbone.patch_dim
    means = [patch[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in range(0, side, 2) for c in range(0, side, 2)]
    torch.testing.assert_close(feats[protocol][:, :d], feats["cls"])
    torch.testing.assert_close(feats[protocol][:, d:], torch.cat(means, dim=1), atol=1e-5, rtol=1e-5)
    assert backbone.feature_dim(protocol) == (1 + cells * cells) * d
    small = build_backbone_adapter("timm:vit_small_patch14_dinov2", random_init=True, img_size=too_small)
    n = (too_small // 14) ** 2
    match = f"the {protocol} protocol needs a square grid of at least {cells} x {cells} patch tokens, got {n} tokens"
    with pytest.raises(RaddinoError, match=match):
        small.features(_batch(small), [protocol])


def test_timm_dinov2_registers_are_not_patches():
    backbone = build_backbone_adapter("timm:vit_small_patch14_reg4_dinov2", random_init=True, img_size=28)
    with torch.no_grad():
        tokens = backbone.tokens(_batch(backbone), 1)[0]
    assert tokens.patch.shape[1] == (28 // 14) ** 2  # 4 patches; the 4 registers and CLS are excluded


def _hf_configs():
    import transformers

    small = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8)
    return {
        "dinov2": transformers.Dinov2Config(image_size=32, **small),
        "dinov2_reg": transformers.Dinov2WithRegistersConfig(image_size=32, num_register_tokens=4, **small),
        "blip_vision": transformers.BlipVisionConfig(image_size=32, **small),
    }


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg", "blip_vision"])
def test_hf_adapters_build_offline_and_yield_declared_dims(tmp_path: Path, name: str):
    _hf_configs()[name].save_pretrained(tmp_path / name)
    backbone = build_backbone_adapter(f"hf:{tmp_path / name}", random_init=True)
    assert backbone.cls_dim == 32 and backbone.preprocess.size == 32
    assert backbone.n_prefix == (5 if name == "dinov2_reg" else 1)
    if name == "blip_vision":
        assert backbone.preprocess.mean[0] == pytest.approx(0.48145466)  # CLIP statistics
    feats = _check_dims(backbone)
    torch.testing.assert_close(feats["dinov2_linear"][:, 96:128], feats["cls"], atol=1e-5, rtol=1e-5)


def test_hf_reads_the_preprocessor_config(tmp_path: Path):
    _hf_configs()["dinov2"].save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.53, 0.53, 0.53], "image_std": [0.26, 0.26, 0.26], "crop_size": {"height": 40}}'
    )
    backbone = build_backbone_adapter(f"hf:{tmp_path}", random_init=True)
    assert backbone.preprocess == Preprocess(size=40, mean=(0.53,) * 3, std=(0.26,) * 3)


def test_open_clip_adapter_or_clear_message():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(RaddinoError, match="pip install 'raddino\\[open_clip\\]'"):
            build_backbone_adapter("open_clip:ViT-B-32/openai", random_init=True)
        return
    backbone = build_backbone_adapter("open_clip:ViT-B-32", random_init=True, img_size=64)
    assert backbone.cls_dim == 512 and backbone.patch_dim == 768
    _check_dims(backbone)


def test_weights_file_and_seeded_random_init(tmp_path: Path):
    state = torch.get_rng_state()
    a = build_backbone_adapter("timm:vit_tiny_patch16_224", random_init=True, img_size=32, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    b = build_backbone_adapter("timm:vit_tiny_patch16_224", random_init=True, img_size=32, seed=1)
    c = build_backbone_adapter("timm:vit_tiny_patch16_224", random_init=True, img_size=32, seed=2)
    assert a.weights_digest() == b.weights_digest() != c.weights_digest()
    torch.save(c.model.state_dict(), tmp_path / "c.pth")
    loaded = build_backbone_adapter("timm:vit_tiny_patch16_224", weights=tmp_path / "c.pth", img_size=32)
    assert loaded.weights_digest() == c.weights_digest()
    with pytest.raises(RaddinoError, match="weights file not found"):
        build_backbone_adapter("timm:vit_tiny_patch16_224", weights=tmp_path / "nope.pth")


def test_unknown_backbones_are_user_errors():
    with pytest.raises(RaddinoError, match="unknown backbone 'dinov2'"):
        build_backbone_adapter("dinov2", random_init=True)
    with pytest.raises(RaddinoError, match="unknown timm model 'vit_imaginary'"):
        build_backbone_adapter("timm:vit_imaginary", random_init=True)


def test_preprocess_gray_colour_resize_and_pad():
    pre = Preprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    gray = np.full((8, 8), 255, dtype=np.uint8)
    resized = pre(gray)
    assert resized.shape == (3, 16, 16)
    torch.testing.assert_close(resized, torch.ones(3, 16, 16))  # (1 - 0.5) / 0.5, all channels equal
    padded = pre(gray, resize="pad")
    assert padded[:, 4:12, 4:12].eq(1.0).all() and padded[:, :4].eq(-1.0).all()  # centred on black
    colour = np.zeros((20, 30, 3), dtype=np.uint8)
    colour[..., 0] = 255
    rgb = pre(colour)
    assert rgb[0].eq(1.0).all() and rgb[1].eq(-1.0).all()  # colour kept, central square of the wide image
    gray_model = Preprocess(size=16, mean=(0.0,) * 3, std=(1.0,) * 3, gray=True)
    torch.testing.assert_close(gray_model(colour), torch.full((3, 16, 16), 0.299))  # BT.601 luma of pure red
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    torch.testing.assert_close(pre(sixteen), torch.ones(3, 16, 16))


def test_layer_index_names():
    assert layer_index("blocks.3.attn.qkv.weight") == 4
    assert layer_index("encoder.layer.0.mlp.fc1.weight") == 1
    assert layer_index("layer2.0.conv1.weight") == 2
    assert layer_index("patch_embed.proj.weight") == 0
    assert layer_index("embeddings.cls_token") == 0
    assert layer_index("norm.weight") is None


def test_ours_from_a_run_directory_and_an_export(tmp_path: Path):
    """Two real pretraining steps -> the adapter reads the checkpoint's teacher backbone; an export (config.yaml +
    safetensors) gives the same features; random_init gives different ones."""
    from safetensors.torch import save_file

    from raddino.config import load_config
    from raddino.train import build_training, fit

    overrides = [  # on top of configs/micro_cpu.yaml
        "head.out_dim=128",
        "head.hidden_dim=32",
        "head.bottleneck_dim=16",
        "data.synthetic_count=32",
        "data.batch_size=4",
        "train.steps_per_epoch=2",
        "train.epochs=1",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "optim.warmup_epochs=0",
        "teacher.temp_warmup_epochs=0",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    training = build_training(load_config("micro_cpu", overrides))
    fit(training)
    teacher = training.model.teacher["backbone"].eval()
    ours = build_backbone_adapter(f"ours:{tmp_path / 'run'}")
    assert ours.preprocess.size == 28 and ours.preprocess.gray and ours.cls_dim == 192
    feats = _check_dims(ours)
    with torch.no_grad():
        expected = teacher.forward_features(_batch(ours)).cls
    torch.testing.assert_close(feats["cls"], expected)

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, export / "backbone.safetensors")
    exported = build_backbone_adapter(f"ours:{export}")
    assert exported.weights_digest() == ours.weights_digest()
    random = build_backbone_adapter(f"ours:{tmp_path / 'run'}", random_init=True)
    assert random.weights_digest() != ours.weights_digest()
    with pytest.raises(RaddinoError, match="config.yaml"):
        build_backbone_adapter(f"ours:{tmp_path}")


def test_pixels_baseline_features_are_the_preprocessed_pixels():
    assert parse_spec("pixels") == ("pixels", "") and parse_spec("pixels:28") == ("pixels", "28")
    default = build_backbone_adapter("pixels")
    assert default.spec == "pixels:28" and default.feature_dim("cls") == 28 * 28
    pixels = build_backbone_adapter("pixels:8")
    assert pixels.preprocess.size == 8 and pixels.preprocess.gray and pixels.feature_dim("cls") == 64
    assert build_backbone_adapter("pixels:8", img_size=12).feature_dim("cls") == 144  # the override wins
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)  # colour -> gray
    x = pixels.preprocess(image).unsqueeze(0)
    feats = pixels.features(x, ["cls"])["cls"]
    assert feats.shape == (1, 64)
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255
    expected = np.asarray(Image.fromarray(gray, mode="F").resize((8, 8), Image.Resampling.BICUBIC, box=(0, 5, 30, 35)))
    np.testing.assert_allclose(feats[0].numpy(), np.clip(expected, 0, 1).ravel(), atol=1e-5)
    again = build_backbone_adapter("pixels:8", random_init=True, seed=3)  # nothing random: same features, same key
    torch.testing.assert_close(again.features(x, ["cls"])["cls"], feats)
    assert again.identity() == pixels.identity() != default.identity()
    with pytest.raises(RaddinoError, match="only the cls protocol"):
        pixels.features(x, ["cls_mean"])
    for bad in ("pixels:0", "pixels:x"):
        with pytest.raises(RaddinoError, match="pixels:SIZE"):
            build_backbone_adapter(bad)
    with pytest.raises(RaddinoError, match="no weights"):
        build_backbone_adapter("pixels", weights="w.safetensors")


def test_pixels_baseline_linear_probe_beats_chance_on_a_planted_signal(tmp_path: Path):
    """A faint 4x4 bright square in the positives, under noise: the raw-pixel probe must find it."""
    import json

    from raddino.cli import main

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 200), ("val", 60), ("test", 200)):
        labels = rng.integers(0, 2, n)
        images = rng.normal(110, 30, (n, 16, 16))
        images[labels == 1, 2:6, 9:13] += 25
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(tmp_path / "planted.npz", **arrays)
    out = tmp_path / "eval"
    argv = ["eval", "--dataset", str(tmp_path / "planted.npz"), "--backbone", "pixels:16", "--protocol", "linear"]
    assert main([*argv, "--bootstrap", "50", "--no-cache", "--no-plots", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["backbone"] == "pixels:16" and record["features"] == "cls"
    assert record["metrics"]["auroc"] > 0.9 and record["ci"]["auroc"][0] > 0.75


def test_one_weights_reader_unwraps_training_wrappers(tmp_path: Path):
    # The adapters read weights through interop.files (the one reader): a torch file's state_dict / model / teacher
    # wrapper is unwrapped as the adapters' former reader did; safetensors names are kept as written.
    from safetensors.torch import save_file

    from raddino.interop.files import read_state_dict

    weight = torch.arange(6.0).reshape(2, 3)
    torch.save({"model": {"fc.weight": weight}, "epoch": 3}, tmp_path / "wrapped.pth")
    assert set(read_state_dict(tmp_path / "wrapped.pth")) == {"fc.weight"}
    torch.save({"state_dict": {"teacher": {"fc.weight": weight}}}, tmp_path / "nested.pt")
    assert torch.equal(read_state_dict(tmp_path / "nested.pt")["fc.weight"], weight)
    save_file({"model.fc.weight": weight}, str(tmp_path / "plain.safetensors"))
    assert set(read_state_dict(tmp_path / "plain.safetensors")) == {"model.fc.weight"}
