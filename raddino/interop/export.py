"""Export a run's teacher backbone (and optionally its heads) in the formats other tools load.

Formats (one directory each, with a model card ``README.md``):

* ``safetensors`` -- raddino's own: ``backbone.safetensors`` (raddino names; the header records the architecture and
  the interpolation rule) + the run's ``config.yaml`` + ``config.json``. Loads with the eval adapter ``ours:DIR``
  and as ``model.init_from=DIR``; identical features at every input size.
* ``timm`` -- ``model.safetensors`` in timm's ``vit_*_patch14[_reg4]_dinov2`` layout + a timm ``config.json``
  (``architecture`` / ``model_args`` / ``pretrained_cfg``): ``timm.create_model("local-dir:DIR", pretrained=True)``.
* ``hf`` -- a transformers ``Dinov2Model`` directory (``Dinov2WithRegistersModel`` with registers): ``config.json``,
  ``model.safetensors`` in the on-disk names that transformers 4.x and 5.x load, and a ``preprocessor_config.json``
  (``BitImageProcessor``: shorter side to the global crop size, bicubic, centre crop, the run's mean / std) that
  matches raddino's evaluation preprocessing.
* ``dinov2`` -- Meta's hub layout (``backbone.safetensors`` and ``backbone.pth``), which
  ``torch.hub.load('facebookresearch/dinov2', ...)`` models strict-load, + ``config.json`` with the constructor
  arguments (including the interpolation offset / antialias that reproduce raddino's rule).

At the stored position grid every format gives raddino's features exactly. At other input sizes each library
interpolates the position embeddings with its own rule (:func:`library_rule`; timm: ``dinov2_reg``; transformers
``Dinov2Model``: ``hf``, ``Dinov2WithRegistersModel``: ``dinov2_reg``; Meta's code: any rule, through its
constructor arguments). :func:`export_backbone` therefore stores the grid at the input size the export's
preprocessing declares whenever the library's rule is not the model's (resampled once with the model's rule), so the
library runs without interpolating exactly where its users run it; ``img_size`` overrides that size. The card
states where the export is exact and, measured at export time, how far it is elsewhere (:func:`measure_deviation`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from raddino.errors import RaddinoError
from raddino.interop import formats
from raddino.interop.files import write_safetensors, write_torch
from raddino.interop.modelcard import CardFacts, render
from raddino.interop.runs import is_run_dir, read_run_teacher
from raddino.interop.source import HF_MODEL_TYPES, RADDINO_FORMAT, transformers_interpolation_rule
from raddino.models.vit import ARCHS, POS_EMBED_INTERP, VisionTransformer, interpolate_patch_pos_embed

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("safetensors", "timm", "hf", "dinov2")
_TIMM_SIZE = {"small": "small", "base": "base", "large": "large", "giant": "giant"}  # raddino arch -> timm size
_HUB_SIZE = {"small": "s", "base": "b", "large": "l", "giant": "g"}  # raddino arch -> torch.hub entry letter
_META_ARCH = {"small": "vit_small", "base": "vit_base", "large": "vit_large", "giant": "vit_giant2"}


@dataclass(frozen=True)
class BackboneSpec:
    """The exported backbone's architecture (``img_size``: side of the stored position grid)."""

    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    num_registers: int
    swiglu: bool
    layerscale: bool
    pos_embed_interp: str

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class InputSpec:
    """Preprocessing the exported model expects: ``size`` px squares, per-channel ``mean`` / ``std`` of [0, 1]."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Written:
    """Files of one format writer plus what the card says about loading and interpolation."""

    files: list[str]
    usage: str
    library: str  # who runs the export, as the card names it
    rule: str  # the interpolation rule that library applies to the stored grid
    interpolation: str = ""
    model_lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    step: int
    checkpoint: Path
    files: list[str]


def spec_from_state(state: dict[str, Tensor], *, arch: str, pos_embed_interp: str) -> BackboneSpec:
    """The architecture of a raddino backbone state dict built as ``model.arch=arch``."""
    if arch not in ARCHS:
        raise RaddinoError(f"unknown arch {arch!r}")
    if pos_embed_interp not in POS_EMBED_INTERP:
        pos_embed_interp = "dinov2"  # an unresolved "auto" in an old config: what build_backbone used
    arch_spec = ARCHS[arch]
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    reg = state.get("reg_token")
    return BackboneSpec(
        arch=arch,
        embed_dim=int(state["cls_token"].shape[-1]),
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        num_heads=arch_spec.num_heads,
        patch_size=patch,
        img_size=grid * patch,
        num_registers=int(reg.shape[1]) if reg is not None else 0,
        swiglu=arch_spec.swiglu,
        layerscale="blocks.0.ls1.gamma" in state,
        pos_embed_interp=pos_embed_interp,
    )


def restore_grid(state: dict[str, Tensor], spec: BackboneSpec, img_size: int) -> tuple[dict[str, Tensor], BackboneSpec]:
    """Store the position grid for ``img_size`` px (resampled once with the model's own rule)."""
    if img_size % spec.patch_size or img_size <= 0:
        raise RaddinoError(f"--img-size {img_size} is not a positive multiple of the patch size {spec.patch_size}")
    if img_size == spec.img_size:
        return state, spec
    grid = img_size // spec.patch_size
    offset, antialias = POS_EMBED_INTERP[spec.pos_embed_interp]
    pos = state["pos_embed"]
    patch = interpolate_patch_pos_embed(pos[:, 1:], grid_h=grid, grid_w=grid, offset=offset, antialias=antialias)
    out = dict(state)
    out["pos_embed"] = torch.cat((pos[:, :1].float(), patch), dim=1)
    fields = spec.as_dict() | {"img_size": img_size}
    return out, BackboneSpec(**fields)


def _with_layerscale(state: dict[str, Tensor], spec: BackboneSpec) -> dict[str, Tensor]:
    """Formats whose ViT always has LayerScale (HF, Meta's hub constructor) get gammas of 1 when the model has none."""
    if spec.layerscale:
        return dict(state)
    out = dict(state)
    for i in range(spec.depth):
        out[f"blocks.{i}.ls1.gamma"] = torch.ones(spec.embed_dim)
        out[f"blocks.{i}.ls2.gamma"] = torch.ones(spec.embed_dim)
    return out


def library_rule(fmt: str, spec: BackboneSpec) -> str:
    """The rule the library that runs ``fmt`` interpolates the stored grid with (transformers: the installed
    release's, probed; timm: ``dinov2_reg`` for every ViT; raddino and Meta's code: the model's own)."""
    if fmt == "timm":
        return "dinov2_reg"
    if fmt == "hf":
        model_type = "dinov2_with_registers" if spec.num_registers else "dinov2"
        return transformers_interpolation_rule(model_type) or HF_MODEL_TYPES[model_type]
    return spec.pos_embed_interp


@dataclass(frozen=True)
class Deviation:
    """Max |difference| of the CLS and patch tokens at one input size (``size`` px squares)."""

    size: int
    cls: float
    patch: float


def deviation_input(size: int) -> Tensor:
    """The input the card's numbers are measured on: one ``3 x size x size`` N(0, 1) image seeded with ``size``."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def _vit(state: dict[str, Tensor], spec: BackboneSpec, rule: str) -> VisionTransformer:
    """raddino's ViT holding ``state`` with its grid interpolated by ``rule`` (a target library's, or the model's)."""
    with torch.random.fork_rng(devices=[]):  # initialisation draws from the default generator: leave it as it was
        model = VisionTransformer(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=ARCHS[spec.arch].mlp_ratio if spec.arch in ARCHS else 4.0,
            swiglu=spec.swiglu,
            num_registers=spec.num_registers,
            layerscale=1.0 if spec.layerscale else None,
            pos_embed_interp=rule,
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"mask_token"} or unexpected:  # the mask token only enters masked (training) forwards
        raise ValueError(f"backbone state does not fit its spec: missing {missing}, unexpected {unexpected}")
    return model.eval()


def deviation_sizes(*, spec: BackboneSpec, stored: BackboneSpec, inputs: InputSpec) -> list[int]:
    """Sizes the card reports: the declared input size, the model's and the stored grid's sizes, and 7 patches (98 px
    at patch 14, a local-crop size)."""
    sizes = {spec.img_size, stored.img_size, 7 * spec.patch_size}
    if inputs.size % spec.patch_size == 0:
        sizes.add(inputs.size)
    return sorted(sizes)


def measure_deviation(
    *,
    state: dict[str, Tensor],
    spec: BackboneSpec,
    stored_state: dict[str, Tensor],
    stored: BackboneSpec,
    rule: str,
    sizes: list[int],
) -> list[Deviation]:
    """Tokens of the model as raddino runs it (``state`` on its own grid, its own rule) against the exported weights
    (``stored_state``) interpolated with the target library's ``rule``, on :func:`deviation_input` at each size.
    Computed in raddino: the libraries' forwards equal raddino's ViT under their rule (checked in the tests)."""
    reference, exported = _vit(state, spec, spec.pos_embed_interp), _vit(stored_state, stored, rule)
    out = []
    with torch.no_grad():
        for size in sizes:
            x = deviation_input(size)
            ref, got = reference.forward_features(x), exported.forward_features(x)
            out.append(
                Deviation(
                    size=size,
                    cls=(ref.cls - got.cls).abs().max().item(),
                    patch=(ref.patch - got.patch).abs().max().item(),
                )
            )
    return out


def _interp_sentence(
    spec: BackboneSpec,
    rule: str,
    library: str,
    *,
    model: BackboneSpec | None = None,
    declared: int | None = None,
    deviations: list[Deviation] | None = None,
) -> str:
    """The card's statement: ``spec`` is the stored grid, ``model`` the model's own (default: the same)."""
    model = model or spec
    stored = f"The position grid is stored at {spec.grid}x{spec.grid} ({spec.img_size} px)"
    if spec.img_size != model.img_size:
        stored += f", resampled once with the model's '{model.pos_embed_interp}' rule from its own {model.img_size} px"
    stored += f"; {library} interpolates it for other sizes with the '{rule}' rule"
    stored += (
        ", the model's own." if rule == model.pos_embed_interp else f" (raddino's model: '{model.pos_embed_interp}')."
    )
    if rule == model.pos_embed_interp and spec.img_size == model.img_size:
        where = "at every input size"
    else:
        where = f"at {spec.img_size} px"
        if declared == spec.img_size:
            where += " (the input size the preprocessing declares)"
    text = [f"{stored} The features are raddino's exactly {where}."]
    if where != "at every input size":
        text.append("Re-export with `--img-size N` for exact features at N px.")
    if deviations:
        text += [
            "",
            f"Measured at export time: max |difference| between raddino's ViT as trained ({model.img_size} px grid, "
            f"'{model.pos_embed_interp}' rule) and the exported weights under {library}'s '{rule}' rule, computed in "
            f"raddino with that rule (`raddino.models.vit.POS_EMBED_INTERP`; raddino's tests check it against the "
            f"library itself), on one seeded N(0, 1) image per size (`raddino.interop.export.deviation_input`):",
            "",
            "| input | CLS token | patch tokens |",
            "|---|---|---|",
        ]
        text += [f"| {d.size} px | {d.cls:.3e} | {d.patch:.3e} |" for d in deviations]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------------------------
# format writers
# ---------------------------------------------------------------------------------------------------------------


def _write_raddino(
    out: Path, state: dict[str, Tensor], spec: BackboneSpec, inputs: InputSpec, name: str, *, config: DictConfig
):
    meta = {"format": RADDINO_FORMAT} | {k: str(v) for k, v in spec.as_dict().items()}
    write_safetensors(out / "backbone.safetensors", state, metadata=meta)
    container = OmegaConf.to_container(config, resolve=True)
    container["model"]["img_size"] = spec.img_size
    container["model"]["pos_embed_interp"] = spec.pos_embed_interp
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
    descriptor = {"format": RADDINO_FORMAT, **spec.as_dict(), "input": inputs.__dict__}
    (out / "config.json").write_text(json.dumps(descriptor, indent=2) + "\n")
    usage = f"""
```python
import raddino
from raddino.eval.adapters.registry import build_backbone_adapter

backbone = build_backbone_adapter("ours:{name}")  # config.yaml + backbone.safetensors
```

Command line: `raddino eval --backbone ours:{name} ...`; continue pretraining with `model.init_from={name}`.
"""
    return Written(
        files=["backbone.safetensors", "config.yaml", "config.json"],
        usage=usage,
        library="raddino",
        rule=spec.pos_embed_interp,
    )


def timm_config(spec: BackboneSpec, inputs: InputSpec) -> dict:
    """timm's ``config.json`` (``architecture`` / ``model_args`` / ``pretrained_cfg``) for ``local-dir:`` loading."""
    size = _TIMM_SIZE.get(spec.arch, "small")  # other widths: the small entry point with explicit sizes
    reg = "_reg4" if spec.num_registers else ""
    args: dict[str, object] = {
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "init_values": 1e-5 if spec.layerscale else None,
        "reg_tokens": spec.num_registers,
        "no_embed_class": bool(spec.num_registers),
        "dynamic_img_size": True,
    }
    if spec.swiglu and spec.arch != "giant":
        raise RaddinoError("timm export of a SwiGLU backbone is only defined for arch=giant")
    return {
        "architecture": f"vit_{size}_patch14{reg}_dinov2",
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "tag": "raddino",
            "custom_load": False,
            "input_size": [3, inputs.size, inputs.size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(inputs.mean),
            "std": list(inputs.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _write_timm(out: Path, state: dict[str, Tensor], spec: BackboneSpec, inputs: InputSpec, name: str):
    tensors = formats.to_timm(state, no_embed_class=bool(spec.num_registers))
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = timm_config(spec, inputs)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    usage = f"""
```python
import timm

model = timm.create_model("local-dir:{name}", pretrained=True)  # config.json + model.safetensors
# or, naming the architecture:
model = timm.create_model(
    "{cfg["architecture"]}", pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file="{name}/model.safetensors"),
    {kwargs},
)
```

Inputs: {inputs.size} px, mean {list(inputs.mean)}, std {list(inputs.std)} (gray radiographs replicated to 3 channels).
"""
    return Written(
        files=["model.safetensors", "config.json"],
        usage=usage,
        library="timm (`dynamic_img_size`)",
        rule=library_rule("timm", spec),
    )


def hf_config(spec: BackboneSpec) -> dict:
    """transformers ``config.json`` of the exported ``Dinov2Model`` / ``Dinov2WithRegistersModel``."""
    if spec.swiglu:
        hidden = (int(spec.embed_dim * 4 * 2 / 3) + 7) // 8 * 8
        packed = int(ARCHS[spec.arch].mlp_ratio * spec.embed_dim)
        if 2 * hidden != packed:
            raise RaddinoError(f"the SwiGLU width {packed} has no transformers equivalent (needs {2 * hidden})")
    config: dict[str, object] = {
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": spec.swiglu,
    }
    if spec.num_registers:
        return (
            {"architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers"}
            | config
            | {"num_register_tokens": spec.num_registers}
        )
    return {"architectures": ["Dinov2Model"], "model_type": "dinov2"} | config | {"use_mask_token": True}


def hf_preprocessor_config(inputs: InputSpec) -> dict:
    """``BitImageProcessor`` settings equal to raddino's evaluation preprocessing (shorter side to ``size`` with
    bicubic resampling, centre crop, mean / std of [0, 1] pixels)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": inputs.size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": inputs.size, "width": inputs.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(inputs.mean),
        "image_std": list(inputs.std),
    }


def _write_hf(out: Path, state: dict[str, Tensor], spec: BackboneSpec, inputs: InputSpec, name: str):
    cfg = hf_config(spec)
    tensors = formats.to_hf(_with_layerscale(state, spec), swiglu=spec.swiglu)
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(inputs), indent=2) + "\n")
    model_class = cfg["architectures"][0]
    usage = f"""
```python
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{name}")
model = AutoModel.from_pretrained("{name}")  # {model_class}
outputs = model(**processor(images, return_tensors="pt"))
cls, patches = outputs.pooler_output, outputs.last_hidden_state[:, {1 + spec.num_registers}:]
```
"""
    return Written(
        files=["model.safetensors", "config.json", "preprocessor_config.json"],
        usage=usage,
        library=f"transformers' {model_class}",
        rule=library_rule("hf", spec),  # the installed release's (older Dinov2Model releases used Meta's rule)
    )


def dinov2_constructor(spec: BackboneSpec) -> tuple[str | None, dict[str, object], dict[str, object]]:
    """(torch.hub entry or None, its keyword arguments, ``DinoVisionTransformer`` keyword arguments) that rebuild
    the backbone with raddino's interpolation rule in Meta's code."""
    offset, antialias = POS_EMBED_INTERP[spec.pos_embed_interp]
    model_kwargs: dict[str, object] = {
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": 4,
        "init_values": 1.0,
        "ffn_layer": "swiglufused" if spec.swiglu else "mlp",
        "block_chunks": 0,
        "num_register_tokens": spec.num_registers,
        "interpolate_offset": offset,
        "interpolate_antialias": antialias,
    }
    entry, hub_kwargs = None, {}
    if spec.arch in _HUB_SIZE and spec.patch_size == 14 and spec.num_registers in (0, 4):
        entry = f"dinov2_vit{_HUB_SIZE[spec.arch]}14" + ("_reg" if spec.num_registers else "")
        hub_kwargs = {"pretrained": False, "img_size": spec.img_size}
        if spec.num_registers == 0:
            hub_kwargs |= {"interpolate_offset": offset, "interpolate_antialias": antialias}
        elif spec.pos_embed_interp != "dinov2_reg":
            entry = None  # the _reg entries fix offset 0 / antialias on; use the constructor instead
    return entry, hub_kwargs, model_kwargs


def _write_dinov2(out: Path, state: dict[str, Tensor], spec: BackboneSpec, inputs: InputSpec, name: str):
    tensors = formats.to_dinov2(_with_layerscale(state, spec), swiglu=spec.swiglu)
    write_safetensors(out / "backbone.safetensors", tensors, metadata={"format": "pt"})
    write_torch(out / "backbone.pth", tensors)
    entry, hub_kwargs, model_kwargs = dinov2_constructor(spec)
    descriptor = {
        "format": "dinov2-hub",
        "hub_entry": entry,
        "hub_kwargs": hub_kwargs,
        "model_kwargs": model_kwargs,
        "meta_arch": _META_ARCH.get(spec.arch),
        "input": inputs.__dict__,
    }
    (out / "config.json").write_text(json.dumps(descriptor, indent=2) + "\n")
    kw = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
    if entry:
        hub = ", ".join(f"{k}={v!r}" for k, v in hub_kwargs.items())
        build = f'model = torch.hub.load("facebookresearch/dinov2", "{entry}", {hub})'
    else:
        build = (
            f"from dinov2.models.vision_transformer import DinoVisionTransformer\n\nmodel = DinoVisionTransformer({kw})"
        )
    usage = f"""
```python
import torch

{build}
model.load_state_dict(torch.load("{name}/backbone.pth", weights_only=True))  # strict
# (or safetensors.torch.load_file("{name}/backbone.safetensors"))
```

Constructor arguments for `dinov2.models.vision_transformer.DinoVisionTransformer`: `{kw}`.
"""
    return Written(
        files=["backbone.safetensors", "backbone.pth", "config.json"],
        usage=usage,
        library="Meta's code (with the arguments above)",
        rule=spec.pos_embed_interp,
    )


_WRITERS = {"safetensors": _write_raddino, "timm": _write_timm, "hf": _write_hf, "dinov2": _write_dinov2}


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------


def write_export(
    out: Path,
    *,
    fmt: str,
    state: dict[str, Tensor],
    spec: BackboneSpec,
    inputs: InputSpec,
    config: DictConfig | None = None,
    heads: dict[str, dict[str, Tensor]] | None = None,
    name: str | None = None,
) -> Written:
    """Write ``state`` (raddino backbone names) in ``fmt`` into the existing directory ``out``; heads (raddino
    names) go to ``out/heads/<module>.safetensors`` in Meta's ``DINOHead`` names. ``name``: the directory name
    the usage examples show (default ``out.name``). ``config``: the run config that ``safetensors`` exports carry
    (``ours:DIR`` and ``model.init_from`` read it); the other formats do not use it."""
    if fmt not in _WRITERS:
        raise RaddinoError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    state = {k: v.float() for k, v in state.items()}
    if fmt == "safetensors":  # raddino's own format is the only one that carries the run's config.yaml
        assert config is not None, "a safetensors export needs the run config"
        written = _write_raddino(out, state, spec, inputs, name or out.name, config=config)
    else:
        written = _WRITERS[fmt](out, state, spec, inputs, name or out.name)
    written.interpolation = _interp_sentence(spec, written.rule, written.library, declared=inputs.size)
    for module, head in (heads or {}).items():
        (out / "heads").mkdir(exist_ok=True)
        write_safetensors(
            out / "heads" / f"{module}.safetensors", formats.head_to_meta(head), metadata={"format": "pt"}
        )
        written.files.append(f"heads/{module}.safetensors")
    if heads:
        written.usage += (
            "\nHeads (`heads/*.safetensors`) use Meta's `DINOHead` names (`mlp.N`, `last_layer.weight_g` = 1, "
            "`last_layer.weight_v`); continue pretraining with "
            f"`model.init_head={name or out.name}/heads/dino_head.safetensors`.\n"
        )
    written.model_lines = [
        f"architecture: ViT-{spec.arch}/{spec.patch_size}, width {spec.embed_dim}, {spec.depth} blocks, "
        f"{spec.num_heads} heads, {spec.num_registers} registers, "
        f"{'SwiGLU' if spec.swiglu else 'GELU MLP'}, LayerScale {'yes' if spec.layerscale else 'no'}",
        f"stored position grid: {spec.grid}x{spec.grid} ({spec.img_size} px); interpolation rule: "
        f"'{spec.pos_embed_interp}'",
        f"input: {inputs.size} px, mean {list(inputs.mean)}, std {list(inputs.std)}; gray radiographs replicated to "
        "3 channels",
        "outputs: CLS token and patch tokens after the final LayerNorm",
    ]
    return written


def export_backbone(
    out: Path,
    *,
    fmt: str,
    state: dict[str, Tensor],
    spec: BackboneSpec,
    inputs: InputSpec,
    config: DictConfig,
    heads: dict[str, dict[str, Tensor]] | None = None,
    name: str | None = None,
    img_size: int | None = None,
) -> Written:
    """:func:`write_export` with the grid stored where the target library is exact for its users, and the card's
    interpolation statement measured.

    ``img_size`` (None): the declared input size ``inputs.size`` when the library's rule is not the model's (so at
    that size the library does not interpolate; a size that is no multiple of the patch keeps the model's grid),
    otherwise the model's own grid. The deviation from the model as raddino runs it is measured at
    :func:`deviation_sizes`.
    """
    if fmt not in _WRITERS:
        raise RaddinoError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    state = {k: v.float() for k, v in state.items()}
    rule = library_rule(fmt, spec)
    if img_size is None:
        differs = rule != spec.pos_embed_interp and inputs.size % spec.patch_size == 0
        img_size = inputs.size if differs else spec.img_size
    stored_state, stored = restore_grid(state, spec, img_size)
    written = write_export(
        out, fmt=fmt, state=stored_state, spec=stored, inputs=inputs, config=config, heads=heads, name=name
    )
    deviations = measure_deviation(
        state=state,
        spec=spec,
        stored_state=stored_state,
        stored=stored,
        rule=written.rule,
        sizes=deviation_sizes(spec=spec, stored=stored, inputs=inputs),
    )
    written.interpolation = _interp_sentence(
        stored, written.rule, written.library, model=spec, declared=inputs.size, deviations=deviations
    )
    return written


def _last_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _eval_sections(run_dir: Path, eval_dirs: list[Path]) -> list[tuple[str, str]]:
    candidates = list(eval_dirs) + sorted(p.parent for p in run_dir.glob("eval*/**/results.md"))
    sections = []
    for directory in candidates:
        results = directory / "results.md" if directory.is_dir() else directory
        if not results.is_file():
            raise RaddinoError(f"--eval {directory}: no results.md (a `raddino eval` output directory)")
        sections.append((str(directory), results.read_text()))
    return sections


def _prepare_out(out: Path, run_dir: Path, *, overwrite: bool, what: str = "a run directory") -> Path:
    out = out.expanduser()
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or run.is_relative_to(resolved) or is_run_dir(out):
        raise RaddinoError(f"--out {out} would overwrite {what}; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RaddinoError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.parent / f".tmp-export-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished temporary directory (a rename: ``out`` is never half-written)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def export_run(
    run_dir: str | Path,
    *,
    fmt: str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    with_heads: bool = False,
    img_size: int | None = None,
    overwrite: bool = False,
    eval_dirs: list[Path] | None = None,
) -> ExportResult:
    """Export the teacher of ``run_dir``'s newest complete checkpoint (or of ``checkpoint``: a path or a step).

    Writes into a temporary sibling of ``out`` and renames it into place, so ``out`` is never half-written.

    Raises:
        RaddinoError: unknown format, missing run / checkpoint, ``out`` not empty without ``overwrite``.
    """
    if fmt not in EXPORT_FORMATS:
        raise RaddinoError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    run_dir, out = Path(run_dir).expanduser(), Path(out)
    teacher = read_run_teacher(run_dir, checkpoint=checkpoint)
    cfg = teacher.config
    spec = spec_from_state(teacher.backbone, arch=cfg.model.arch, pos_embed_interp=teacher.pos_embed_interp)
    inputs = InputSpec(
        size=int(cfg.crops.global_size),
        mean=tuple(float(v) for v in cfg.crops.mean),
        std=tuple(float(v) for v in cfg.crops.std),
    )
    eval_sections = _eval_sections(run_dir, [Path(p) for p in eval_dirs or []])
    tmp = _prepare_out(out, run_dir, overwrite=overwrite)
    try:
        heads = teacher.heads if with_heads else None
        written = export_backbone(
            tmp,
            fmt=fmt,
            state=teacher.backbone,
            spec=spec,
            inputs=inputs,
            config=cfg,
            heads=heads,
            name=out.name,
            img_size=img_size,
        )
        derived_file = run_dir / "derived.json"
        facts = CardFacts(
            title=f"{out.name}: raddino ViT-{spec.arch}/{spec.patch_size} ({fmt} export)",
            fmt=fmt,
            model_lines=written.model_lines,
            usage=written.usage,
            interpolation=written.interpolation,
            step=teacher.step,
            checkpoint=teacher.checkpoint.name,
            config=cfg,
            derived=json.loads(derived_file.read_text()) if derived_file.is_file() else None,
            last_metrics=_last_metrics(run_dir),
            eval_sections=eval_sections,
            files=[*written.files, "README.md"],
        )
        (tmp / "README.md").write_text(render(facts))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d) as %s to %s", teacher.checkpoint, teacher.step, fmt, out)
    return ExportResult(
        out=out, format=fmt, step=teacher.step, checkpoint=teacher.checkpoint, files=[*written.files, "README.md"]
    )


def convert_source(
    source: str | Path,
    *,
    fmt: str,
    out: str | Path,
    img_size: int | None = None,
    input_size: int | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a pretrained backbone (anything :func:`raddino.interop.source.read_source` reads) as ``fmt`` into
    ``out``, without training; heads are not converted.

    The preprocessing the export declares (timm ``pretrained_cfg``, HF ``preprocessor_config.json``, the card) is
    ``input_size`` px (default: the source's stored grid size) with ImageNet mean / std (raddino's default
    ``crops``); the grid is stored as :func:`export_backbone` decides (``img_size`` overrides).

    Raises:
        RaddinoError: missing or unreadable source, a source without a known head count, the safetensors format for a
            non-standard width / depth, ``out`` not empty without ``overwrite``.
    """
    from raddino.config import load_config
    from raddino.interop.source import read_source

    if fmt not in EXPORT_FORMATS:
        raise RaddinoError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    src = read_source(source)
    info = src.info
    if info.num_heads is None:
        raise RaddinoError(f"{source}: the number of attention heads is unknown (no config and no standard size)")
    if fmt == "safetensors" and info.arch is None:
        raise RaddinoError(
            f"{source}: width {info.embed_dim} / depth {info.depth} is no raddino model.arch, which the safetensors "
            "format's config.yaml needs; convert to timm, hf or dinov2 instead"
        )
    spec = BackboneSpec(
        arch=info.arch or "custom",  # a non-standard size: the writers use the explicit widths
        embed_dim=info.embed_dim,
        depth=info.depth,
        num_heads=info.num_heads,
        patch_size=info.patch_size,
        img_size=info.img_size,
        num_registers=info.num_registers,
        swiglu=info.swiglu,
        layerscale=info.layerscale,
        pos_embed_interp=info.pos_embed_interp,
    )
    defaults = load_config()
    inputs = InputSpec(
        size=input_size or info.img_size,
        mean=tuple(float(v) for v in defaults.crops.mean),
        std=tuple(float(v) for v in defaults.crops.std),
    )
    # the raddino config a safetensors export carries (``ours:DIR``, ``model.init_from``): this backbone, these inputs
    overrides = [f"crops.global_size={inputs.size}", f"model.pos_embed_interp={info.pos_embed_interp}"]
    if info.arch is not None:
        overrides += [
            f"model.arch={info.arch}",
            f"model.patch_size={info.patch_size}",
            f"model.img_size={info.img_size}",
            f"model.num_registers={info.num_registers}",
            f"model.layerscale={defaults.model.layerscale if info.layerscale else 'null'}",
        ]
    config = load_config(overrides=overrides)
    source_path = Path(str(source)).expanduser()
    tmp = _prepare_out(out, source_path, overwrite=overwrite, what="the source")
    try:
        written = export_backbone(
            tmp, fmt=fmt, state=src.backbone, spec=spec, inputs=inputs, config=config, name=out.name, img_size=img_size
        )
        facts = CardFacts(
            title=f"{out.name}: ViT-{spec.arch}/{spec.patch_size} ({fmt}, converted by raddino)",
            fmt=fmt,
            model_lines=written.model_lines,
            usage=written.usage,
            interpolation=written.interpolation,
            step=0,
            checkpoint="",
            config=config,
            origin=f"`{source}` ({info.describe()})",
            files=[*written.files, "README.md"],
        )
        (tmp / "README.md").write_text(render(facts))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s as %s to %s", source, fmt, out)
    return ExportResult(out=out, format=fmt, step=0, checkpoint=source_path, files=[*written.files, "README.md"])
