"""Continue pretraining from released weights: load a source backbone (and head) into student and teacher.

Both towers of :class:`raddino.ssl.SSLMetaArch` receive the same imported backbone; the DINO head comes from
``init_head`` when given, otherwise the heads keep their fresh initialisation (see docs/INTEROP.md for the risk of
fresh heads on a pretrained backbone and the recommended warm-up). Every key is checked: missing, unexpected and
shape-mismatched entries are listed one by one in a :class:`RaddinoError` unless ``strict=False``, which loads what
matches and reports the rest.

The stored position grid is kept as the source's when ``model.img_size`` equals the source's (recommended): every
crop size is then interpolated from the same grid with the same rule as the source model, so the imported model
computes exactly what the source computes at 224 px, 98 px or any size. A different ``model.img_size`` resamples
the grid once at load, with the source's rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from raddino.errors import RaddinoError
from raddino.interop import formats
from raddino.interop.files import read_tensors
from raddino.interop.source import Source, SourceInfo, read_source
from raddino.models.vit import POS_EMBED_INTERP, VisionTransformer, interpolate_patch_pos_embed

log = logging.getLogger(__name__)

MAX_LISTED = 25  # key-by-key lines in an error message before "... and N more"
HEAD_GAIN_TOLERANCE = 1e-4  # |weight_g - 1| below which a Meta head converts exactly


@dataclass
class ImportReport:
    """Outcome of :func:`init_meta_arch` (the same for student and teacher)."""

    source: SourceInfo
    loaded: int = 0  # backbone tensors loaded into each tower
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)  # head module -> where its weights came from
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {self.source.describe()} from {self.source.path}: {self.loaded} backbone tensors"]
        out += [f"missing in the source: {k}" for k in self.missing]
        out += [f"not used (unexpected): {k}" for k in self.unexpected]
        out += [f"shape mismatch: {k}" for k in self.mismatched]
        out += [f"{head}: {origin}" for head, origin in self.heads.items()]
        out += self.notes
        return out


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return title + "".join(f"\n  {item}" for item in shown) + more


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ")"


# ---------------------------------------------------------------------------------------------------------------
# config checks (run before the model is built)
# ---------------------------------------------------------------------------------------------------------------


def resolve_pos_embed_interp(requested: str, source: SourceInfo | None) -> str:
    """``model.pos_embed_interp``: ``auto`` becomes the source's rule (``dinov2`` without a source); an explicit
    rule is kept."""
    if requested != "auto":
        if requested not in POS_EMBED_INTERP:
            raise RaddinoError(f"unknown model.pos_embed_interp {requested!r}")
        return requested
    return source.pos_embed_interp if source is not None else "dinov2"


def check_model_config(
    info: SourceInfo, *, arch: str, patch_size: int, num_registers: int, img_size: int, pos_embed_interp: str
) -> list[str]:
    """Compare ``model.*`` with a source before building the model.

    Returns notes (a different ``img_size`` or interpolation rule: allowed, but not what the source computes).

    Raises:
        RaddinoError: naming every ``model.*`` key that must change (``arch``, ``patch_size``, ``num_registers``),
            with the value the source needs.
    """
    problems = []
    if info.arch is None:
        problems.append(
            f"the source has a non-standard size (width {info.embed_dim}, {info.depth} blocks) that no model.arch "
            "matches"
        )
    elif info.arch != arch:
        problems.append(f"model.arch={arch} but the source is ViT-{info.arch}: set model.arch={info.arch}")
    if info.patch_size != patch_size:
        problems.append(f"model.patch_size={patch_size} but the source uses {info.patch_size}")
    if info.num_registers != num_registers:
        problems.append(
            f"model.num_registers={num_registers} but the source has {info.num_registers}: "
            f"set model.num_registers={info.num_registers}"
        )
    if problems:
        raise RaddinoError(_listing(f"model.* does not match {info.path} ({info.describe()}):", problems))
    notes = []
    if img_size != info.img_size:
        notes.append(
            f"model.img_size={img_size} but the source stores a {info.grid}x{info.grid} grid ({info.img_size} px): "
            f"the grid is resampled once at load, so features at other sizes differ slightly from the source's; "
            f"model.img_size={info.img_size} keeps them identical"
        )
    rule = resolve_pos_embed_interp(pos_embed_interp, info)
    if rule != info.pos_embed_interp:
        notes.append(
            f"model.pos_embed_interp={rule} but the source interpolates with '{info.pos_embed_interp}': at sizes "
            f"other than {img_size} px the model will not compute what the source computes"
        )
    return notes


# ---------------------------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Matched:
    state: dict[str, Tensor]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    notes: list[str]


def _match_backbone(backbone: VisionTransformer, source: Source) -> _Matched:
    info = source.info
    target = backbone.state_dict()
    state = dict(source.backbone)
    notes: list[str] = []
    if info.num_heads is not None and info.num_heads != backbone.num_heads:
        raise RaddinoError(
            f"{info.path}: the source has {info.num_heads} attention heads, the model {backbone.num_heads} "
            "(check model.arch)"
        )
    if info.num_heads is None:
        notes.append(f"the source does not say its number of attention heads; assumed the model's {backbone.num_heads}")
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        if pos.shape[-1] == target["pos_embed"].shape[-1]:
            grid = backbone.stored_grid
            offset, antialias = POS_EMBED_INTERP[info.pos_embed_interp]
            patch = interpolate_patch_pos_embed(
                pos[:, 1:], grid_h=grid, grid_w=grid, offset=offset, antialias=antialias
            )
            state["pos_embed"] = torch.cat((pos[:, :1].float(), patch), dim=1)
            notes.append(
                f"position grid {info.grid}x{info.grid} resampled to the model's {grid}x{grid} with the source's "
                f"'{info.pos_embed_interp}' rule"
            )
    if "mask_token" in target and "mask_token" not in state:
        notes.append("the source has no mask token (timm / inference export): iBOT's mask token starts at zero")
        target = {k: v for k, v in target.items() if k != "mask_token"}
    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    mismatched = sorted(
        f"{k}: source {_shape(state[k])}, model {_shape(target[k])}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    )
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    return _Matched(state=usable, missing=missing, unexpected=unexpected, mismatched=mismatched, notes=notes)


def load_backbone(backbone: VisionTransformer, source: Source, *, strict: bool = True) -> ImportReport:
    """Load ``source`` into ``backbone`` in place (before FSDP sharding: plain tensors).

    Raises:
        RaddinoError: with ``strict``, listing every missing / unexpected / mismatched key; always when the
            number of attention heads is known to differ.
    """
    matched = _match_backbone(backbone, source)
    report = ImportReport(
        source=source.info,
        missing=matched.missing,
        unexpected=matched.unexpected,
        mismatched=matched.mismatched,
        notes=list(matched.notes),
    )
    problems = (
        [f"missing in the source: {k}" for k in matched.missing]
        + [f"not in the model (unexpected): {k}" for k in matched.unexpected]
        + [f"shape mismatch: {k}" for k in matched.mismatched]
    )
    if problems and strict:
        raise RaddinoError(
            _listing(
                f"cannot import {source.info.path} ({source.info.describe()}) into the model "
                f"({len(problems)} problems; model.init_strict=false loads what matches):",
                problems,
            )
        )
    if problems:
        log.warning("%s", _listing(f"importing {source.info.path}: {len(problems)} keys not loaded:", problems))
    with torch.no_grad():
        backbone.load_state_dict(matched.state, strict=False)
    report.loaded = len(matched.state)
    return report


# ---------------------------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------------------------

_HEAD_SUFFIXES = ("last_layer.weight_v", "last_layer.parametrizations.weight.original1", "last_layer.weight")


def read_heads(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], float]:
    """DINO / iBOT heads of a file (Meta's ``DINOHead`` names, e.g. RAD-DINO's ``dino_head.safetensors``, optionally
    prefixed ``dino_head.`` / ``teacher.ibot_head.`` ...), a raddino export (``heads/``) or a run directory.

    Returns ``({"dino_head": state, ...}, max |weight_g - 1|)`` in raddino head names.
    """
    location = Path(path).expanduser()
    if location.is_dir():
        source = read_source(location, fmt="raddino")
        if not source.heads:
            raise RaddinoError(f"{location}: holds no heads (export with --heads, or give the head file)")
        return source.heads, 0.0
    tensors = read_tensors(location)
    prefixes: dict[str, set[str]] = {}
    for key in tensors:
        for suffix in _HEAD_SUFFIXES:
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                prefixes.setdefault("ibot_head" if "ibot" in prefix else "dino_head", set()).add(prefix)
                break
    if not prefixes:
        some = ", ".join(sorted(tensors)[:5])
        raise RaddinoError(f"{location}: no DINO head (no last_layer.weight[_v]; keys: {some}, ...)")
    heads, deviation = {}, 0.0
    for module, found in prefixes.items():
        teacher = {p for p in found if "teacher" in p}
        if len(found) > 1 and len(teacher) != 1:
            raise RaddinoError(f"{location}: several {module}s (prefixes {sorted(found)}); keep one")
        prefix = next(iter(teacher)) if len(found) > 1 else next(iter(found))
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if k.startswith(("mlp.", "last_layer."))}
        heads[module], dev = formats.head_from_meta(state)
        deviation = max(deviation, dev)
    return heads, deviation


def _head_dims(state: dict[str, Tensor]) -> str:
    linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("mlp.") and k.endswith(".weight"))
    if not linears or "last_layer.weight" not in state:
        return "an incomplete head"
    first, proto = state[f"mlp.{linears[0]}.weight"], state["last_layer.weight"]
    hidden = f"head.hidden_dim={int(first.shape[0])}, " if len(linears) > 1 else ""
    return (
        f"in_dim {int(first.shape[1])}, {hidden}head.bottleneck_dim={int(proto.shape[1])}, "
        f"head.out_dim={int(proto.shape[0])}, head.nlayers={len(linears)}"
    )


def _load_head(head: nn.Module, state: dict[str, Tensor], *, strict: bool, origin: str) -> list[str]:
    target = head.state_dict()
    problems = [f"missing: {k}" for k in sorted(target) if k not in state]
    problems += [f"unexpected: {k}" for k in sorted(state) if k not in target]
    problems += [
        f"shape mismatch: {k}: source {_shape(state[k])}, model {_shape(target[k])}"
        for k in sorted(state)
        if k in target and state[k].shape != target[k].shape
    ]
    if problems and strict:
        raise RaddinoError(_listing(f"cannot import the head {origin} (it has {_head_dims(state)}):", problems))
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    with torch.no_grad():
        head.load_state_dict(usable, strict=False)
    return problems


# ---------------------------------------------------------------------------------------------------------------
# the meta-architecture
# ---------------------------------------------------------------------------------------------------------------


def init_meta_arch(
    model: nn.Module,
    *,
    init_from: str | Path | Source,
    init_head: str | Path | None = None,
    strict: bool = True,
    fmt: str = "auto",
) -> ImportReport:
    """Load pretrained weights into both towers of an :class:`raddino.ssl.SSLMetaArch`, in place.

    Call it after building the model and before sharding / compiling it and before building the optimizer (or
    at least before its first step: parameters are updated in place, so optimizer references stay valid).

    Args:
        model: the meta-architecture (``student`` / ``teacher`` ModuleDicts with ``backbone``, ``dino_head`` and
            optionally ``ibot_head``).
        init_from: source path (see :mod:`raddino.interop.source`) or an already read :class:`Source`.
        init_head: head weights (Meta ``DINOHead`` file, raddino export or run directory); None keeps fresh heads,
            unless ``init_from`` itself carries heads (raddino run / export directories), which are then used.
        strict: fail on any missing / unexpected / mismatched key (False: load what matches, report the rest).
        fmt: source layout (``auto`` | ``dinov2`` | ``timm`` | ``hf`` | ``raddino``).
    """
    source = init_from if isinstance(init_from, Source) else read_source(init_from, fmt=fmt)
    backbone = model.student["backbone"]
    report = load_backbone(backbone, source, strict=strict)  # reports (and warns about) unloaded keys once
    with torch.no_grad():  # the teacher starts as the student, unloaded keys included
        model.teacher["backbone"].load_state_dict(backbone.state_dict())
    if backbone.pos_embed_interp != source.info.pos_embed_interp:
        report.notes.append(
            f"the model interpolates position embeddings with '{backbone.pos_embed_interp}', the source with "
            f"'{source.info.pos_embed_interp}': crops of other sizes than {backbone.img_size} px will not see what "
            "the source computes (model.pos_embed_interp=auto follows the source)"
        )
    if init_head is not None:
        heads, deviation = read_heads(init_head)
        origin = str(init_head)
    else:
        heads, deviation, origin = source.heads, 0.0, source.info.path
    if deviation > HEAD_GAIN_TOLERANCE:
        message = (
            f"the head in {origin} has weight-norm gains weight_g != 1 (max |g - 1| = {deviation:.3g}); raddino's "
            "head fixes them to 1, so only the prototype directions can be imported"
        )
        if strict:
            raise RaddinoError(message + " (model.init_strict=false imports them anyway)")
        report.notes.append(message)
    for module in ("dino_head", "ibot_head"):
        if module not in model.student:
            if module in heads:
                report.notes.append(f"{origin} has an {module}, but the model has none (loss.ibot_separate_head)")
            continue
        if module not in heads:
            report.heads[module] = "fresh (random init)"
            continue
        for tower in (model.student, model.teacher):
            problems = _load_head(tower[module], heads[module], strict=strict, origin=f"{origin} ({module})")
        report.heads[module] = f"imported from {origin}" + (f" ({len(problems)} keys not loaded)" if problems else "")
    if all(v.startswith("fresh") for v in report.heads.values()):
        report.notes.append(
            "the heads start fresh on a pretrained backbone: their first random targets can pull the backbone away "
            "from its features; keep the learning rate low for the first steps (docs/INTEROP.md)"
        )
    for line in report.lines():
        log.info("%s", line)
    return report
