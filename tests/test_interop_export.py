"""Export round trips: a run's teacher -> safetensors / timm / HF transformers / DINOv2 hub -> loaded by raddino's
``ours:`` adapter, timm and transformers -> the same features (<= 1e-4, fp32); exactness at the declared input size
and the card's measured numbers elsewhere, checked with the target library; ``raddino convert``."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import raddino  # noqa: F401  (torchvision shim before timm)
from raddino.build import head_from_config, meta_arch_from_config
from raddino.cli import main as cli_main
from raddino.commands import convert as convert_command
from raddino.commands import export as export_command
from raddino.config import load_config
from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Preprocess
from raddino.eval.adapters.registry import build_backbone_adapter
from raddino.interop.export import (
    BackboneSpec,
    InputSpec,
    deviation_input,
    export_backbone,
    restore_grid,
    write_export,
)
from raddino.interop.load import init_meta_arch
from raddino.interop.modelcard import data_summary
from raddino.interop.runs import read_run_teacher
from raddino.interop.source import read_source
from raddino.models.vit import VisionTransformer
from raddino.train import build_training, fit

TOL = 1e-4
SMALL = [
    "model.img_size=28",
    "crops.global_size=28",
    "crops.local_size=14",
    "crops.n_local=2",
    "crops.mean=[0.5,0.5,0.5]",
    "crops.std=[0.25,0.25,0.25]",
    "head.out_dim=256",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "data.synthetic_count=32",
    "data.synthetic_size=56",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.steps_per_epoch=4",
    "train.epochs=4",
    "optim.warmup_epochs=1",
    "teacher.temp_warmup_epochs=1",
    "train.progress=false",
    "train.max_steps=2",
    "train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step ViT-Ti/14 run at 28 px (the teacher differs from its initialisation after the EMA updates)."""
    out = tmp_path_factory.mktemp("interop") / "run"
    fit(build_training(load_config("tiny_cpu", [*SMALL, f"train.output_dir={out}"])))
    return out


@pytest.fixture(scope="module")
def teacher(run_dir) -> VisionTransformer:
    """The run's teacher backbone as the eval ``ours:RUN_DIR`` adapter reads it (its own DCP loader)."""
    return build_backbone_adapter(f"ours:{run_dir}").model.eval()


def _command(module, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def _export(run_dir, out, fmt: str, *extra: str) -> int:
    return _command(export_command, "export", str(run_dir), "--format", fmt, "--out", str(out), *extra)


def _convert(source, out, fmt: str, *extra: str) -> int:
    return _command(convert_command, "convert", str(source), "--format", fmt, "--out", str(out), *extra)


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ours(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(x)
    return out.cls, out.patch


def _timm(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(x)
    return out[:, 0], out[:, model.num_prefix_tokens :]


def _hf(model: nn.Module, x: torch.Tensor, registers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    return hidden[:, 0], hidden[:, 1 + registers :]


def _library(fmt: str, out) -> callable:
    """The exported directory run by the library its format is for: images -> (CLS, patch tokens)."""
    if fmt == "timm":
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        return lambda x: _timm(model, x)
    if fmt == "hf":
        transformers = pytest.importorskip("transformers")
        model = transformers.AutoModel.from_pretrained(str(out)).eval()
        return lambda x: _hf(model, x, getattr(model.config, "num_register_tokens", 0))
    if fmt == "safetensors":  # raddino is the library of its own format
        model = build_backbone_adapter(f"ours:{out}").model.eval()
        return lambda x: _ours(model, x)
    raise ValueError(fmt)


def _card_table(text: str) -> dict[int, tuple[float, float]]:
    """The card's measured deviations: input size -> (CLS, patch tokens)."""
    rows = re.findall(r"^\| (\d+) px \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$", text, flags=re.M)
    return {int(size): (float(cls), float(patch)) for size, cls, patch in rows}


def _max_diff(ref, got) -> tuple[float, float]:
    assert ref[1].shape == got[1].shape
    return (ref[0] - got[0]).abs().max().item(), (ref[1] - got[1]).abs().max().item()


def _assert_card_measures(card: str, reference, library, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """The card's numbers at ``sizes`` are the library's max |difference| from the reference on the card's input
    (up to the card's 4 digits and the library's own float error)."""
    table = _card_table(card)
    measured = {}
    for size in sizes:
        x = deviation_input(size)
        measured[size] = _max_diff(reference(x), library(x))
        for what, stated, got in zip(("CLS", "patch"), table[size], measured[size], strict=True):
            assert abs(stated - got) <= TOL + 1e-3 * got, f"{what} at {size} px: card {stated}, measured {got}"
    return measured


def _assert_close(ref, got, what: str) -> None:
    assert ref[1].shape == got[1].shape, what
    assert (ref[0] - got[0]).abs().max().item() <= TOL, f"{what}: CLS differs"
    assert (ref[1] - got[1]).abs().max().item() <= TOL, f"{what}: patch tokens differ"
    assert ref[1].abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# exports of a real run
# ---------------------------------------------------------------------------------------------------------------


def test_safetensors_export_loads_with_ours_adapter_and_as_init(run_dir, teacher, tmp_path, capsys) -> None:
    out = tmp_path / "cxr-safetensors"
    assert _export(run_dir, out, "safetensors", "--heads") == 0
    assert "exported step 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["backbone.safetensors"]  # ours: wants exactly one
    exported = build_backbone_adapter(f"ours:{out}")
    assert exported.preprocess == Preprocess(size=28, mean=(0.5,) * 3, std=(0.25,) * 3, gray=True)
    for size in (28, 56):
        x = _images(size, seed=size)
        _assert_close(_ours(teacher, x), _ours(exported.model.eval(), x), f"ours export at {size}")
    # continue pretraining from the export (backbone + heads) and from the run directory itself
    cfg = load_config(out / "config.yaml")
    for init_from in (out, run_dir):
        model = meta_arch_from_config(cfg)
        report = init_meta_arch(model, init_from=init_from)
        assert report.heads["dino_head"].startswith("imported") and not report.missing
        x = _images(42, seed=3)
        _assert_close(_ours(teacher, x), _ours(model.student["backbone"].eval(), x), f"init from {init_from.name}")


def test_timm_export_loads_with_timm(run_dir, teacher, tmp_path) -> None:
    out = tmp_path / "cxr-timm"
    _export(run_dir, out, "timm")
    x = _images(28, seed=1)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    _assert_close(_ours(teacher, x), _timm(model, x), "timm local-dir")
    config = json.loads((out / "config.json").read_text())
    named = timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors")},
        **config["model_args"],
    ).eval()
    _assert_close(_ours(teacher, x), _timm(named, x), "timm pretrained_cfg_overlay")
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and config["pretrained_cfg"]["input_size"] == [3, 28, 28]


def test_hf_export_loads_with_transformers(run_dir, teacher, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "cxr-hf"
    _export(run_dir, out, "hf")
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "Dinov2Model"
    x = _images(28, seed=2)
    _assert_close(_ours(teacher, x), _hf(model, x), "hf")
    # the image processor reproduces raddino's evaluation preprocessing (up to uint8 rounding inside PIL)
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    image = np.random.default_rng(0).integers(0, 256, size=(56, 56), dtype=np.uint8)
    ours = build_backbone_adapter(f"ours:{run_dir}").preprocess(image)
    theirs = processor(np.stack([image] * 3, axis=-1), return_tensors="pt")["pixel_values"][0]
    assert theirs.shape == ours.shape == (3, 28, 28)
    assert (theirs - ours).abs().max().item() < 0.03  # 1/255 / std 0.25 ~ 0.016 per rounding step


def test_dinov2_export_is_the_hub_layout(run_dir, teacher, tmp_path) -> None:
    out = tmp_path / "cxr-dinov2"
    _export(run_dir, out, "dinov2")
    state = torch.load(out / "backbone.pth", map_location="cpu", weights_only=True)
    assert {"cls_token", "pos_embed", "mask_token", "blocks.11.ls2.gamma", "norm.weight"} <= set(state)
    assert "reg_token" not in state and "register_tokens" not in state
    config = json.loads((out / "config.json").read_text())
    assert config["hub_entry"] is None and config["model_kwargs"]["interpolate_offset"] == 0.1  # tiny: no hub entry
    # timm's own DINOv2 converter (triggered by the mask token) reads Meta's layout
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        num_classes=0,
        img_size=28,
        embed_dim=192,
        num_heads=3,
        pretrained_cfg_overlay={"file": str(out / "backbone.pth")},
    ).eval()
    x = _images(28, seed=4)
    _assert_close(_ours(teacher, x), _timm(model, x), "dinov2 layout via timm")
    source = read_source(out / "backbone.safetensors")
    assert source.info.format == "dinov2" and source.info.arch == "tiny"
    assert all(torch.equal(source.backbone[k], v) for k, v in teacher.state_dict().items())


class MetaDINOHead(nn.Module):
    """Transcribed from facebookresearch/dinov2 ``dinov2/layers/dino_head.py`` (use_bn=False, mlp_bias=True)."""

    def __init__(self, in_dim: int, out_dim: int, nlayers: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


def test_exported_head_gives_the_teachers_logits_in_metas_head(run_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "cxr-heads"
    _export(run_dir, out, "hf", "--heads")
    state = load_file(str(out / "heads" / "dino_head.safetensors"))
    cfg = load_config(run_dir / "config.yaml")
    meta = MetaDINOHead(192, cfg.head.out_dim, cfg.head.nlayers, cfg.head.hidden_dim, cfg.head.bottleneck_dim)
    state["last_layer.parametrizations.weight.original0"] = state.pop("last_layer.weight_g")
    state["last_layer.parametrizations.weight.original1"] = state.pop("last_layer.weight_v")
    meta.load_state_dict(state)
    ours = head_from_config(cfg.head, in_dim=192)
    ours.load_state_dict(read_run_teacher(run_dir).heads["dino_head"])
    feats = torch.randn(6, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(meta(feats), ours(feats), atol=1e-5, rtol=0)


def test_model_card(run_dir, tmp_path) -> None:
    results = tmp_path / "eval-run"
    results.mkdir()
    (results / "results.md").write_text("| backbone | AUROC |\n|---|---|\n| ours | 0.912 |\n")
    out = tmp_path / "card"
    _export(run_dir, out, "timm", "--eval", str(results))
    card = (out / "README.md").read_text()
    assert "ViT-tiny/14" in card and "optimizer steps: 2" in card and "step_0000002" in card
    assert "| ours | 0.912 |" in card
    assert 'timm.create_model("local-dir:card", pretrained=True)' in card
    assert "arch: tiny" in card  # the training config
    assert "64 synthetic" not in card and "32 synthetic radiographs of 56 px" in card
    # dinov2 rule vs timm's antialiased rule; trained at 28 = the declared size: exact there, measured elsewhere
    assert (
        "raddino's model: 'dinov2'" in card and "exactly at 28 px (the input size the preprocessing declares)" in card
    )
    assert sorted(_card_table(card)) == [28, 98]


def test_data_summary_reads_shard_manifests(tmp_path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {
        "counts": {"written": 310, "skipped": 2},
        "image_size": {"height": [512, 2048], "width": [480, 2048]},
        "total_bytes": 12345,
        "shards": [{"name": "shard-000000.tar"}, {"name": "shard-000001.tar"}],
        "keys": {"salt_fingerprint": "ab12"},
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = OmegaConf.create({"data": {"source": "shards", "shards": [f"{shards}/shard-{{000000..000001}}.tar"]}})
    lines = data_summary(cfg)
    assert any("310 images written, 2 skipped, 2 shards, 12345 bytes" in line and "ab12" in line for line in lines)


def test_export_errors(run_dir, tmp_path) -> None:
    with pytest.raises(RaddinoError, match="run directory not found"):
        _export(tmp_path / "nope", tmp_path / "x", "hf")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(RaddinoError, match="not empty"):
        _export(run_dir, busy, "hf")
    assert (busy / "keep.txt").exists()
    _export(run_dir, busy, "hf", "--overwrite")
    assert not (busy / "keep.txt").exists() and (busy / "config.json").is_file()
    with pytest.raises(RaddinoError, match="would overwrite a run directory"):
        _export(run_dir, run_dir, "hf", "--overwrite")
    with pytest.raises(RaddinoError, match="step_0000005"):
        _export(run_dir, tmp_path / "y", "hf", "--checkpoint", "5")
    assert not list(tmp_path.glob(".tmp-export-*"))


# ---------------------------------------------------------------------------------------------------------------
# other sizes: the target library interpolates with the exported model's rule
# ---------------------------------------------------------------------------------------------------------------


def _backbone(*, registers: int, rule: str, seed: int) -> tuple[VisionTransformer, BackboneSpec]:
    g = torch.Generator().manual_seed(seed)
    model = VisionTransformer(
        img_size=518, embed_dim=64, depth=2, num_heads=2, num_registers=registers, pos_embed_interp=rule, generator=g
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gamma" not in name else 0.1) + ("gamma" in name))
    spec = BackboneSpec(
        arch="small",
        embed_dim=64,
        depth=2,
        num_heads=2,
        patch_size=14,
        img_size=518,
        num_registers=registers,
        swiglu=False,
        layerscale=True,
        pos_embed_interp=rule,
    )
    return model.eval(), spec


_INPUTS = InputSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_timm_export_exact_at_all_sizes_for_the_timm_rule(tmp_path) -> None:
    model, spec = _backbone(registers=4, rule="dinov2_reg", seed=0)
    write_export(tmp_path, fmt="timm", state=model.state_dict(), spec=spec, inputs=_INPUTS, config=load_config())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    for size in (518, 224, 98):
        x = _images(size, seed=size)
        _assert_close(_ours(model, x), _timm(loaded, x), f"timm reg4 at {size}")


@pytest.mark.parametrize(("registers", "rule"), [(0, "hf"), (4, "dinov2_reg")])
def test_hf_export_exact_at_all_sizes_for_the_hf_rule(tmp_path, registers, rule) -> None:
    transformers = pytest.importorskip("transformers")
    model, spec = _backbone(registers=registers, rule=rule, seed=1)
    write_export(tmp_path, fmt="hf", state=model.state_dict(), spec=spec, inputs=_INPUTS, config=load_config())
    loaded = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
    for size in (518, 224, 98):
        x = _images(size, seed=size + 1)
        _assert_close(_ours(model, x), _hf(loaded, x, registers), f"hf {rule} at {size}")


def test_restored_grid_makes_timm_exact_at_that_size(tmp_path) -> None:
    """A Meta-rule model re-stored for 224 px: timm at 224 equals raddino at 224 (no interpolation in timm)."""
    model, spec = _backbone(registers=0, rule="dinov2", seed=2)
    state, spec224 = restore_grid(model.state_dict(), spec, 224)
    assert spec224.img_size == 224 and state["pos_embed"].shape == (1, 1 + 16 * 16, 64)
    write_export(tmp_path, fmt="timm", state=state, spec=spec224, inputs=_INPUTS, config=load_config())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = _images(224, seed=5)
    _assert_close(_ours(model, x), _timm(loaded, x), "re-stored grid at 224")


@pytest.mark.parametrize(("fmt", "img_size"), [("timm", None), ("hf", None), ("timm", 518)])
def test_default_export_is_exact_at_the_declared_size(tmp_path, fmt, img_size) -> None:
    """Issue #12: a Meta-rule model stored at 518 px, declared (preprocessing) 224 px. By default timm and transformers
    get the grid at 224 and match raddino there; the card's numbers at 518 / 98 px are what the library gives."""
    model, spec = _backbone(registers=0, rule="dinov2", seed=3)
    written = export_backbone(
        tmp_path, fmt=fmt, state=model.state_dict(), spec=spec, inputs=_INPUTS, config=load_config(), img_size=img_size
    )
    config = json.loads((tmp_path / "config.json").read_text())
    stored = config["model_args"]["img_size"] if fmt == "timm" else config["image_size"]
    assert stored == (img_size or 224)
    library = _library(fmt, tmp_path)
    measured = _assert_card_measures(written.interpolation, lambda x: _ours(model, x), library, [98, 224, 518])
    if img_size is None:
        _assert_close(_ours(model, deviation_input(224)), library(deviation_input(224)), f"{fmt} at 224")
        assert "exactly at 224 px (the input size the preprocessing declares)" in written.interpolation
        off = (98, 518)
    else:  # the explicit override: exact at the stored 518, off at the declared 224 (what the default avoids)
        assert measured[518][1] <= TOL and "exactly at 518 px." in written.interpolation
        off = (98, 224)
    assert all(measured[size][1] > 1e-3 for size in off)  # the rules differ: the card's numbers are not zeros


@pytest.mark.parametrize("fmt", ["timm", "hf", "safetensors", "dinov2"])
def test_convert_run_to_every_format(run_dir, teacher, tmp_path, fmt, capsys) -> None:
    """``raddino convert RUN_DIR`` (the 28-px Meta-rule teacher) declaring 42 px: exact at 42 px in the target library
    (timm / transformers store the grid there), the card's numbers at 28 / 98 px measured by the library."""
    out = tmp_path / f"conv-{fmt}"
    extra = () if fmt == "dinov2" else ("--input-size", "42")
    assert _convert(run_dir, out, fmt, *extra) == 0
    assert f"as {fmt} to {out}" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "converted by `raddino convert`" in card and "without training" in card and "optimizer steps" not in card
    reference = lambda x: _ours(teacher, x)  # noqa: E731
    if fmt == "dinov2":  # Meta's code is not installed: timm's DINOv2 loader runs it at the stored (= declared) size
        model = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=True,
            num_classes=0,
            img_size=28,
            embed_dim=192,
            num_heads=3,
            pretrained_cfg_overlay={"file": str(out / "backbone.pth")},
        ).eval()
        _assert_close(reference(_images(28)), _timm(model, _images(28)), "dinov2 at 28")
        assert "exactly at every input size" in card  # Meta's constructor arguments give raddino's rule
        assert all(max(v) <= 1e-6 for v in _card_table(card).values()) and sorted(_card_table(card)) == [28, 98]
        return
    library = _library(fmt, out)
    _assert_close(reference(deviation_input(42)), library(deviation_input(42)), f"{fmt} at the declared 42 px")
    measured = _assert_card_measures(card, reference, library, [28, 42, 98])
    if fmt == "safetensors":
        assert build_backbone_adapter(f"ours:{out}").preprocess.size == 42
        assert "exactly at every input size" in card and all(max(v) <= TOL for v in measured.values())
    else:
        assert "exactly at 42 px (the input size the preprocessing declares)" in card
        assert measured[28][1] > 1e-3 and measured[98][1] > 1e-3
        if fmt == "hf":
            processor = json.loads((out / "preprocessor_config.json").read_text())
            assert processor["crop_size"] == {"height": 42, "width": 42}
        else:
            assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 42, 42]


def test_convert_hf_directory_to_timm_matches_transformers(tmp_path) -> None:
    """transformers' own Dinov2Model ('hf' rule, 518-px grid) converted for timm declaring 224 px: timm at 224 equals
    transformers at 224; the card's numbers at 518 / 98 px are timm's distance from transformers."""
    transformers = pytest.importorskip("transformers")
    model, spec = _backbone(registers=0, rule="hf", seed=4)
    source = tmp_path / "src-hf"
    source.mkdir()
    write_export(source, fmt="hf", state=model.state_dict(), spec=spec, inputs=_INPUTS, config=load_config())
    hf = transformers.AutoModel.from_pretrained(str(source)).eval()
    out = tmp_path / "conv-timm"
    _convert(source, out, "timm", "--input-size", "224")
    library = _library("timm", out)
    x = deviation_input(224)
    _assert_close(_hf(hf, x), library(x), "timm vs transformers at 224")
    measured = _assert_card_measures((out / "README.md").read_text(), lambda x: _hf(hf, x), library, [98, 224, 518])
    assert measured[518][1] > 1e-3


def test_convert_errors(run_dir, tmp_path, capsys) -> None:
    assert cli_main(["convert", str(tmp_path / "nope.pth"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raddino convert: error: pretrained weights not found") and "\n" not in err
    model, spec = _backbone(registers=0, rule="hf", seed=5)
    source = tmp_path / "src"
    source.mkdir()
    write_export(source, fmt="hf", state=model.state_dict(), spec=spec, inputs=_INPUTS, config=load_config())
    with pytest.raises(RaddinoError, match="no raddino model.arch"):  # width 64 / depth 2
        _convert(source, tmp_path / "o", "safetensors")
    with pytest.raises(RaddinoError, match="would overwrite the source"):
        _convert(source, source, "timm", "--overwrite")
    with pytest.raises(RaddinoError, match="not a positive multiple"):
        _convert(run_dir, tmp_path / "o", "timm", "--img-size", "30")
    assert not list(tmp_path.glob(".tmp-export-*"))
