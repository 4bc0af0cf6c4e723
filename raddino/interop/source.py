"""Pretrained backbones to import: find the weights, recognise their layout, describe the architecture.

A source is a file or a directory:

* a weights file (``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with ``torch.load(weights_only=True)``)
  in the DINOv2 hub layout (``dinov2_vitb14_pretrain.pth``, RAD-DINO's ``backbone_compatible.safetensors``, also
  Meta training checkpoints, whose *teacher* backbone is taken), in timm's layout (``vit_*_patch14_dinov2*``), or a
  raddino ``backbone.safetensors`` export;
* a Hugging Face transformers directory (``config.json`` with ``model_type`` ``dinov2`` /
  ``dinov2_with_registers`` + ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``) -- RAD-DINO's
  format;
* a timm directory (``config.json`` with ``architecture`` + ``model.safetensors``, as ``raddino export --format
  timm`` and timm's ``save_for_hf`` write);
* a raddino export directory (``raddino export --format safetensors``) or a raddino run directory (the teacher of
  the newest complete checkpoint).

Hub model ids are not downloaded: fetch them first (``huggingface-cli download microsoft/rad-dino --local-dir
rad-dino``).

Every source also names the position-embedding interpolation rule of the implementation it comes from
(:data:`raddino.models.vit.POS_EMBED_INTERP`): Meta's hub models ``dinov2`` (``dinov2_reg`` with registers), timm
``dinov2_reg``, transformers the rule the installed release computes (probed; current releases: ``Dinov2Model``
``hf``, ``Dinov2WithRegistersModel`` ``dinov2_reg``; older ``Dinov2Model`` releases used Meta's ``dinov2``), raddino
the rule recorded with the weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from raddino.errors import RaddinoError
from raddino.interop import formats
from raddino.interop.files import SAFETENSORS_SUFFIX, read_safetensors_metadata, read_sharded_safetensors, read_tensors
from raddino.models.vit import ARCHS, POS_EMBED_INTERP, interpolate_patch_pos_embed

log = logging.getLogger(__name__)

IMPORT_FORMATS = ("auto", "dinov2", "timm", "hf", "raddino")
# model_type -> interpolation rule of current transformers (used when transformers is not installed to ask it)
HF_MODEL_TYPES = {"dinov2": "hf", "dinov2_with_registers": "dinov2_reg"}
RADDINO_FORMAT = "raddino"  # ``format`` entry of raddino export descriptors (config.json / safetensors metadata)
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# names that are files, never hub ids (``bad/nonexistent.pth`` is a missing file, not a hub repository)
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True)
class SourceInfo:
    """What a source holds. ``img_size`` is the side of the stored position grid (``grid * patch_size``);
    ``num_heads`` is None when neither a config nor a standard size tells it; ``arch`` is the matching
    ``model.arch`` (None for a non-standard size)."""

    path: str
    format: str
    embed_dim: int
    depth: int
    num_heads: int | None
    patch_size: int
    img_size: int
    num_registers: int
    swiglu: bool
    layerscale: bool
    has_mask_token: bool
    pos_embed_interp: str
    arch: str | None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def describe(self) -> str:
        name = f"ViT-{self.arch}" if self.arch else f"ViT (width {self.embed_dim}, {self.depth} blocks)"
        regs = f", {self.num_registers} registers" if self.num_registers else ""
        return (
            f"{name}/{self.patch_size} in the {self.format} layout{regs}, position grid {self.grid}x{self.grid} "
            f"({self.img_size} px), '{self.pos_embed_interp}' interpolation"
        )


@dataclass
class Source:
    """A read source: its description, the backbone in raddino names, and heads it carries (raddino names, by
    module: ``dino_head`` / ``ibot_head``; run directories only)."""

    info: SourceInfo
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# architecture from the weights
# ---------------------------------------------------------------------------------------------------------------


def match_arch(*, embed_dim: int, depth: int) -> str | None:
    """The ``model.arch`` name with this width and depth, if any."""
    for name, spec in ARCHS.items():
        if spec.embed_dim == embed_dim and spec.depth == depth:
            return name
    return None


def describe_state(
    state: dict[str, Tensor],
    *,
    path: str,
    fmt: str,
    pos_embed_interp: str,
    num_heads: int | None = None,
    swiglu: bool | None = None,
) -> SourceInfo:
    """Read the architecture off a backbone state dict in raddino names."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            some = ", ".join(sorted(state)[:5])
            raise RaddinoError(f"{path}: not a ViT backbone in the {fmt} layout: no {key!r} (keys: {some}, ...)")
    embed_dim = int(state["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))}
    if not blocks:
        raise RaddinoError(f"{path}: no transformer blocks (blocks.N.*) in the {fmt} layout")
    depth = max(blocks) + 1
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    n_pos = int(state["pos_embed"].shape[1]) - 1
    grid = math.isqrt(max(n_pos, 0))
    if grid * grid != n_pos or n_pos == 0:
        raise RaddinoError(f"{path}: pos_embed has {n_pos + 1} positions, not 1 + a square grid")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if swiglu is None:
        swiglu = fc1 is not None and int(fc1.shape[0]) != 4 * embed_dim
    arch = match_arch(embed_dim=embed_dim, depth=depth)
    if num_heads is None and arch is not None:
        num_heads = ARCHS[arch].num_heads
    reg = state.get("reg_token")
    if pos_embed_interp not in POS_EMBED_INTERP:
        raise RaddinoError(f"{path}: unknown position-embedding interpolation rule {pos_embed_interp!r}")
    return SourceInfo(
        path=path,
        format=fmt,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        img_size=grid * patch_size,
        num_registers=int(reg.shape[1]) if reg is not None else 0,
        swiglu=bool(swiglu),
        layerscale="blocks.0.ls1.gamma" in state,
        has_mask_token="mask_token" in state,
        pos_embed_interp=pos_embed_interp,
        arch=arch,
    )


# ---------------------------------------------------------------------------------------------------------------
# layouts of flat weight files
# ---------------------------------------------------------------------------------------------------------------


def _pick_prefix(candidates: set[str], path: Path, what: str) -> str:
    if len(candidates) == 1:
        return next(iter(candidates))
    teacher = {p for p in candidates if "teacher." in p}
    if len(teacher) == 1:
        return next(iter(teacher))
    raise RaddinoError(f"{path}: several {what} in one file (prefixes {sorted(candidates)}); keep one")


def split_backbone(tensors: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], bool]:
    """The backbone's tensors without their prefix (``teacher.backbone.``, ``dinov2.`` ...), preferring the teacher
    of a student-teacher checkpoint; the flag says whether the names are HF transformers'."""
    hf_suffix = "embeddings.cls_token"
    hf = {k[: -len(hf_suffix)] for k in tensors if k.endswith(hf_suffix)}
    if hf:
        prefix = _pick_prefix(hf, path, "backbones")
    else:
        plain = {k[: -len("cls_token")] for k in tensors if k.endswith("cls_token") and not k.endswith("_cls_token")}
        if not plain:
            some = ", ".join(sorted(tensors)[:5])
            raise RaddinoError(f"{path}: not a ViT backbone checkpoint: no cls_token (keys: {some}, ...)")
        prefix = _pick_prefix(plain, path, "backbones")
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, bool(hf)


def detect_layout(state: dict[str, Tensor], *, is_hf: bool) -> str:
    """``hf`` | ``dinov2`` | ``raddino`` | ``timm`` from the names of a prefix-free backbone state dict."""
    if is_hf:
        return "hf"
    if "register_tokens" in state or any(_CHUNKED.match(k) for k in state) or any(".mlp.w12." in k for k in state):
        return "dinov2"
    if "mask_token" in state and "reg_token" in state:
        return RADDINO_FORMAT
    if "mask_token" in state:
        return "dinov2"  # Meta's hub layout (a raddino export without registers has the same names)
    return "timm"


_CHUNKED = re.compile(r"^blocks\.\d+\.\d+\.")


def _convert(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    if fmt == "dinov2":
        return formats.from_dinov2(state)
    if fmt == "timm":
        return formats.from_timm(state)
    if fmt == "hf":
        return formats.from_hf(state)
    return dict(state)


def _raddino_descriptor(meta: dict[str, str]) -> tuple[str, int | None]:
    rule = meta.get("pos_embed_interp", "dinov2")
    heads = meta.get("num_heads")
    return rule, int(heads) if heads else None


# ---------------------------------------------------------------------------------------------------------------
# directories
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RaddinoError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(payload, dict):
        raise RaddinoError(f"{path}: expected a JSON object")
    return payload


def _dir_weights(directory: Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            if name.endswith(".index.json"):
                return read_sharded_safetensors(candidate)
            return read_tensors(candidate)
    raise RaddinoError(f"{directory}: no weights file (looked for {', '.join(names)})")


def transformers_interpolation_rule(model_type: str) -> str | None:
    """The rule the installed transformers interpolates ``model_type``'s position embeddings with, found by running
    its ``interpolate_pos_encoding`` on a small random grid (releases differ: recent ones size the output directly,
    older ``Dinov2Model`` releases used Meta's 0.1 offset). None without transformers or without a match."""
    try:
        import transformers
    except ImportError:
        return None
    names = {"dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters"}
    config_class = getattr(transformers, f"{names[model_type]}Config", None)
    module = getattr(transformers.models, model_type, None)
    modeling = getattr(module, f"modeling_{model_type}", None) if module is not None else None
    embeddings_class = getattr(modeling, f"{names[model_type]}Embeddings", None) if modeling is not None else None
    if config_class is None or embeddings_class is None:
        return None
    dim, stored, grid, patch = 4, 5, 3, 14
    config = config_class(
        hidden_size=dim, num_hidden_layers=1, num_attention_heads=1, image_size=stored * patch, patch_size=patch
    )
    with torch.random.fork_rng(devices=[]):  # the constructor draws from torch's default generator: leave it as is
        embeddings = embeddings_class(config)
    pos = torch.randn(1, 1 + stored * stored, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeddings.position_embeddings.copy_(pos)
        got = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + grid * grid, dim), grid * patch, grid * patch)
    for rule, (offset, antialias) in POS_EMBED_INTERP.items():
        want = interpolate_patch_pos_embed(pos[:, 1:], grid_h=grid, grid_w=grid, offset=offset, antialias=antialias)
        if got.shape == (1, 1 + grid * grid, dim) and torch.allclose(got[:, 1:].float(), want, atol=1e-6):
            return rule
    return None


def _hf_source(directory: Path, config: dict, tensors: dict[str, Tensor] | None, path: str) -> Source:
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise RaddinoError(
            f"{directory / 'config.json'}: model_type {model_type!r} is not a DINOv2 model "
            f"(expected {' or '.join(HF_MODEL_TYPES)})"
        )
    if config.get("hidden_act", "gelu") != "gelu" and not config.get("use_swiglu_ffn", False):
        raise RaddinoError(f"{directory}: hidden_act={config.get('hidden_act')!r} is not supported (only gelu)")
    if abs(float(config.get("layer_norm_eps", 1e-6)) - 1e-6) > 1e-12:
        raise RaddinoError(f"{directory}: layer_norm_eps={config.get('layer_norm_eps')} (raddino's ViT uses 1e-6)")
    if not config.get("qkv_bias", True):
        raise RaddinoError(f"{directory}: qkv_bias=false is not supported")
    if tensors is None:
        tensors = _dir_weights(directory, ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    state, is_hf = split_backbone(tensors, directory)
    if not is_hf:
        raise RaddinoError(f"{directory}: config.json is an HF transformers config but the weights are not")
    backbone = formats.from_hf(state)
    rule = transformers_interpolation_rule(model_type) or HF_MODEL_TYPES[model_type]
    info = describe_state(
        backbone,
        path=path,
        fmt="hf",
        pos_embed_interp=rule,
        num_heads=int(config["num_attention_heads"]) if "num_attention_heads" in config else None,
        swiglu=bool(config.get("use_swiglu_ffn", False)),
    )
    return Source(info=info, backbone=backbone)


def _timm_source(directory: Path, config: dict, path: str) -> Source:
    tensors = _dir_weights(directory, ("model.safetensors", "pytorch_model.bin"))
    state, is_hf = split_backbone(tensors, directory)
    if is_hf:
        raise RaddinoError(f"{directory}: config.json is a timm config but the weights are HF transformers'")
    fmt = detect_layout(state, is_hf=False)  # timm's own loader also accepts Meta's layout
    backbone = _convert(state, fmt)
    args = config.get("model_args") or {}
    rule = "dinov2_reg"  # a timm directory is run by timm, whatever layout its weights file uses
    info = describe_state(
        backbone,
        path=path,
        fmt=fmt,
        pos_embed_interp=rule,
        num_heads=int(args["num_heads"]) if "num_heads" in args else None,
    )
    return Source(info=info, backbone=backbone)


def _run_source(directory: Path, path: str) -> Source:
    from raddino.interop.runs import read_run_teacher

    run = read_run_teacher(directory)
    # the rule the run trained with (``auto`` resolved from its derived.json), not a guess from the config
    info = describe_state(
        run.backbone,
        path=path,
        fmt=RADDINO_FORMAT,
        pos_embed_interp=run.pos_embed_interp,
        num_heads=ARCHS[run.config.model.arch].num_heads,
    )
    return Source(info=info, backbone=run.backbone, heads=run.heads)


def _raddino_export_source(directory: Path, config: dict | None, path: str) -> Source:
    files = sorted(directory.glob(f"*{SAFETENSORS_SUFFIX}"))
    if len(files) != 1:
        raise RaddinoError(f"{directory}: expected one *.safetensors backbone file, found {len(files)}")
    tensors = read_tensors(files[0])
    state, _ = split_backbone(tensors, files[0])
    meta = dict(read_safetensors_metadata(files[0]))
    meta.update({k: str(v) for k, v in (config or {}).items() if k in ("pos_embed_interp", "num_heads")})
    rule, heads = _raddino_descriptor(meta)
    info = describe_state(state, path=path, fmt=RADDINO_FORMAT, pos_embed_interp=rule, num_heads=heads)
    head_states = _export_heads(directory)
    return Source(info=info, backbone=state, heads=head_states)


def _export_heads(directory: Path) -> dict[str, dict[str, Tensor]]:
    """Heads written by ``raddino export --heads`` (``heads/<module>.safetensors``, Meta's names)."""
    heads = {}
    for file in sorted((directory / "heads").glob(f"*{SAFETENSORS_SUFFIX}")):
        converted, _ = formats.head_from_meta(read_tensors(file))
        heads[file.stem] = converted
    return heads


def _directory_source(directory: Path, fmt: str, path: str) -> Source:
    from raddino.interop.runs import is_run_dir

    config_json = directory / "config.json"
    config = _read_json(config_json) if config_json.is_file() else None
    if config is not None and config.get("format") == RADDINO_FORMAT:
        kind = RADDINO_FORMAT
    elif config is not None and "model_type" in config:
        kind = "hf"
    elif config is not None and "architecture" in config:
        kind = "timm"
    elif is_run_dir(directory):
        kind = "run"
    elif (directory / "config.yaml").is_file() and any(directory.glob(f"*{SAFETENSORS_SUFFIX}")):
        kind = RADDINO_FORMAT
    else:
        raise RaddinoError(
            f"{directory}: not a recognised model directory (expected an HF transformers directory with config.json, "
            "a timm directory, a raddino export or a raddino run directory)"
        )
    wanted = {"run": RADDINO_FORMAT}.get(kind, kind)
    if fmt not in ("auto", wanted) and not (kind == "timm" and fmt == "dinov2"):
        raise RaddinoError(f"{directory} holds a {wanted} model, but the format was given as {fmt}")
    if kind == "hf":
        return _hf_source(directory, config, None, path)
    if kind == "timm":
        return _timm_source(directory, config, path)
    if kind == "run":
        return _run_source(directory, path)
    return _raddino_export_source(directory, config, path)


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------


def read_source(path: str | Path, *, fmt: str = "auto") -> Source:
    """Read a pretrained backbone (see the module docstring) into raddino names.

    Args:
        path: weights file or directory.
        fmt: ``auto`` (recognise the layout), or force ``dinov2`` | ``timm`` | ``hf`` | ``raddino``.

    Raises:
        RaddinoError: missing or unreadable file, unrecognised layout, a layout other than ``fmt``.
    """
    if fmt not in IMPORT_FORMATS:
        raise RaddinoError(f"unknown import format {fmt!r}; expected one of {', '.join(IMPORT_FORMATS)}")
    text = str(path)
    location = Path(text).expanduser()
    if not location.exists():
        hint = ""
        if Path(text).suffix.lower() in _WEIGHT_SUFFIXES or text.startswith((".", "/", "~")):
            raise RaddinoError(f"pretrained weights not found: no such file or directory: {text}")
        if _HUB_ID.match(text):
            hint = (
                f" (hub ids are not downloaded; fetch it first, e.g. `huggingface-cli download {text} "
                f"--local-dir {text.split('/')[-1]}`, and pass that directory)"
            )
        raise RaddinoError(f"pretrained weights not found: {text}{hint}")
    if location.is_dir():
        source = _directory_source(location, fmt, text)
    else:
        source = _file_source(location, fmt, text)
    log.info("source %s: %s", text, source.info.describe())
    return source


def _file_source(location: Path, fmt: str, text: str) -> Source:
    tensors = read_tensors(location)
    state, is_hf = split_backbone(tensors, location)
    meta = read_safetensors_metadata(location) if location.suffix == SAFETENSORS_SUFFIX else {}
    # raddino's own exports say so in their header (without registers their names equal Meta's hub layout)
    detected = RADDINO_FORMAT if meta.get("format") == RADDINO_FORMAT else detect_layout(state, is_hf=is_hf)
    layout = detected if fmt == "auto" else fmt
    if is_hf != (layout == "hf"):
        raise RaddinoError(f"{location}: holds {detected} names, not the {layout} layout (model.init_format)")
    if is_hf:
        config_json = location.parent / "config.json"
        if not config_json.is_file():
            raise RaddinoError(f"{location}: an HF transformers checkpoint needs its config.json beside it")
        return _hf_source(location.parent, _read_json(config_json), tensors, text)
    backbone = _convert(state, layout)
    num_heads = None
    if layout == RADDINO_FORMAT:
        rule, num_heads = _raddino_descriptor(meta)
    elif layout == "timm":
        rule = "dinov2_reg"
    else:
        rule = "dinov2_reg" if "reg_token" in backbone else "dinov2"
    info = describe_state(backbone, path=text, fmt=layout, pos_embed_interp=rule, num_heads=num_heads)
    return Source(info=info, backbone=backbone)


def inspect_source(path: str | Path, *, fmt: str = "auto") -> SourceInfo:
    """The architecture of a source (reads its weights): what ``model.*`` must say to import it."""
    return read_source(path, fmt=fmt).info
