"""``raddino viz``: the explicit last-block CLS attention against a reference, a planted case, and the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raddino.cli import main
from raddino.models.attention import last_block_cls_attention
from raddino.models.vit import VisionTransformer

RUN_OVERRIDES = [  # on top of configs/micro_cpu.yaml
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
]


def _reference_attention(block, tokens: torch.Tensor) -> torch.Tensor:
    """Full softmax attention ``(B, H, T, T)`` of a timm block from its weights, written out with einsum."""
    attn = block.attn
    heads, dim = attn.num_heads, tokens.shape[-1]
    hd = dim // heads
    x = F.layer_norm(tokens, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = torch.einsum("btc,ec->bte", x, w[:dim]) + b[:dim]
    k = torch.einsum("btc,ec->bte", x, w[dim : 2 * dim]) + b[dim : 2 * dim]
    q, k = q.unflatten(-1, (heads, hd)), k.unflatten(-1, (heads, hd))  # (B, T, H, hd)
    return torch.einsum("bshd,bthd->bhst", q, k).mul(hd**-0.5).softmax(-1)


def test_cls_attention_matches_a_reference_that_reproduces_the_block():
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=28, patch_size=7, embed_dim=48, depth=3, num_heads=3, num_registers=2, layerscale=1.0
    ).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        last = model.blocks[-1]
        full = _reference_attention(last, tokens)  # (B, H, T, T)
        # the reference is the block's own attention: weights @ v through proj give timm's output
        dim = tokens.shape[-1]
        normed = last.norm1(tokens)
        v = (normed @ last.attn.qkv.weight[2 * dim :].T + last.attn.qkv.bias[2 * dim :]).unflatten(-1, (3, 16))
        mixed = torch.einsum("bhst,bthd->bshd", full, v).flatten(2)
        torch.testing.assert_close(last.attn.proj(mixed), last.attn(normed), rtol=1e-4, atol=1e-5)
    out = last_block_cls_attention(model, x)
    assert out.weights.shape == (2, 3, 1 + 2 + 16) and out.num_prefix == 3 and out.grid == (4, 4)
    torch.testing.assert_close(out.weights, full[:, :, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 3))
    maps = out.patch_maps
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.flatten(2), full[:, :, 0, 3:])


def test_planted_patch_dominates_every_head():
    """One block whose keys are zero except at patch (1, 3), which aligns with the CLS query: all its heads must
    put (almost) all their weight on that patch, at that grid position."""
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=16, depth=1, num_heads=2, layerscale=None).eval()
    row, col = 1, 3
    with torch.no_grad():
        for p in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token, model.pos_embed):
            p.zero_()
        model.pos_embed[0, 1 + row * 4 + col, 0] = 5.0  # the only non-zero token: LayerNorm keeps the rest at 0
        block = model.blocks[0]
        u = block.norm1(model.pos_embed[:, 1 + row * 4 + col])[0]  # its normed value, |u|^2 = 16
        block.attn.qkv.weight.zero_()
        block.attn.qkv.bias.zero_()
        block.attn.qkv.bias[:16] = 1.0  # q = 1 for every token
        block.attn.qkv.weight[16:32] = torch.outer(torch.ones(16), u)  # k = |u|^2 at the planted patch, else 0
    out = last_block_cls_attention(model, torch.zeros(1, 3, 28, 28))
    maps = out.patch_maps[0]  # (H, 4, 4)
    for head in maps:
        assert head[row, col] > 0.99
        assert divmod(int(head.argmax()), 4) == (row, col)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(1, 2))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from raddino.config import load_config
    from raddino.train import build_training, fit

    run = tmp_path_factory.mktemp("viz") / "run"
    fit(build_training(load_config("micro_cpu", [*RUN_OVERRIDES, f"train.output_dir={run}"])))
    return run


def _cxr_images(shared_data: Path) -> Path:
    images = shared_data / "cxr-covid-sample" / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not found")
    return images


def test_viz_renders_real_radiographs_from_a_run(tiny_run: Path, shared_data: Path, tmp_path: Path, capsys):
    images = _cxr_images(shared_data)
    out = tmp_path / "viz"
    argv = ["viz", str(tiny_run), "--images", str(images), "--max-images", "3", "--size", "56", "--out", str(out)]
    assert main([*argv, "--checkpoint", "2"]) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert len(files) == 4 and "overview.png" in files
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:3]
    assert [f.split("-", 1)[1] for f in files if f != "overview.png"] == sorted(f"{Path(n).stem}.png" for n in names)
    for name in files:
        with Image.open(out / name) as png:
            pixels = np.asarray(png.convert("L"), dtype=np.float32)
        assert png.size[0] > 300 and pixels.std() > 10  # a drawn figure, not a blank canvas
    assert "3 images" in capsys.readouterr().out


def test_viz_reads_an_export_like_the_run(tiny_run: Path, tmp_path: Path):
    from safetensors.torch import save_file

    from raddino.interop.runs import read_run_teacher
    from raddino.viz import load_teacher

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    save_file({k: v.contiguous() for k, v in read_run_teacher(tiny_run).backbone.items()}, export / "w.safetensors")
    from_run, _, step = load_teacher(tiny_run, size=56)
    from_export, _, no_step = load_teacher(export, size=56)
    assert (step, no_step) == (2, None)
    x = torch.randn(1, 3, 56, 56)
    a = last_block_cls_attention(from_run.model, x).weights
    torch.testing.assert_close(last_block_cls_attention(from_export.model, x).weights, a)
    img = tmp_path / "one.png"
    Image.fromarray((np.random.default_rng(0).random((90, 70)) * 255).astype(np.uint8)).save(img)
    assert main(["viz", str(export), "--images", str(img), "--size", "56", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "0000-one.png").is_file() and (tmp_path / "o" / "overview.png").is_file()


def test_viz_bad_inputs_are_one_line_user_errors(tiny_run: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cases = [
        (["viz", str(tiny_run), "--images", str(empty)], "no PNG / JPEG images"),
        (["viz", str(tiny_run), "--images", str(bad), "--size", "56"], "cannot read the image"),
        (["viz", str(tmp_path), "--images", str(bad)], "not a raddino run directory"),
        (["viz", str(tiny_run), "--images", str(tmp_path / "missing.png")], "no such file"),
        (["viz", str(tiny_run), "--images", str(bad), "--size", "50"], "multiple of the patch size"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
