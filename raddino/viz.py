"""``raddino viz``: the teacher's last-block CLS attention over radiographs, rendered to PNG grids.

For each image: one PNG with the network's input (the eval preprocessing: shorter side to ``size``, central square,
gray), the mean over heads laid over it, and every head's map; plus ``overview.png`` with the mean map of each image.
Maps are the CLS query's softmax weights on the patch tokens
(:func:`raddino.models.attention.last_block_cls_attention`), each panel on its own colour scale from 0 to its
maximum (printed in the title).

Rendering uses matplotlib's object API (``Figure`` + ``savefig``), not ``pyplot``: no global figure state, no GUI
backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OVERVIEW_MAX = 48  # images in overview.png (the first ones); per-image PNGs are written for all
PANEL_INCHES = 2.4
MAX_COLUMNS = 7


@dataclass(frozen=True)
class VizResult:
    source: str  # what was loaded: a checkpoint directory or an exported weights file
    step: int | None  # training step of a run's checkpoint (None for an export)
    files: list[Path]  # per-image PNGs, then overview.png


def collect_images(inputs: Sequence[str | Path], *, max_images: int | None = None) -> list[Path]:
    """Image files named in ``inputs``: files as given, directories searched recursively for PNG / JPEG (sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise RaddinoError(f"--images {item}: no such file or directory")
    if not found:
        raise RaddinoError(f"no PNG / JPEG images in {', '.join(str(i) for i in inputs)}")
    if max_images is not None:
        if max_images < 1:
            raise RaddinoError(f"--max-images must be >= 1, got {max_images}")
        found = found[:max_images]
    return found


def load_teacher(path: str | Path, *, size: int, checkpoint: str | None = None):
    """``(OursBackbone, source, step)`` for a run directory (its teacher, via :func:`read_run_teacher`) or an
    exported directory (``config.yaml`` + one ``*.safetensors``), with the eval preprocessing at ``size`` px."""
    from raddino.eval.adapters.ours import build_ours
    from raddino.interop.runs import is_run_dir, read_run_teacher

    directory = Path(path).expanduser()
    if is_run_dir(directory):
        teacher = read_run_teacher(directory, checkpoint=checkpoint)
        # build_ours gives the architecture and preprocessing of the run's config; the weights are the teacher's
        backbone = build_ours(str(directory), weights=None, random_init=True, img_size=size, seed=0)
        missing, unexpected = backbone.model.load_state_dict(teacher.backbone, strict=False)
        if missing:
            raise RaddinoError(f"{teacher.checkpoint}: {len(missing)} backbone tensors missing, e.g. {missing[0]}")
        if unexpected:
            log.warning("%s: %d tensors not used by the backbone", teacher.checkpoint, len(unexpected))
        log.info("viz: the teacher of %s (step %d)", teacher.checkpoint, teacher.step)
        return backbone, str(teacher.checkpoint), teacher.step
    if directory.is_dir() and (directory / "config.yaml").is_file() and any(directory.glob("*.safetensors")):
        if checkpoint is not None:
            raise RaddinoError(f"--checkpoint applies to run directories; {directory} is an exported directory")
        backbone = build_ours(str(directory), weights=None, random_init=False, img_size=size, seed=0)
        return backbone, str(directory), None
    raise RaddinoError(
        f"{directory}: not a raddino run directory (config.yaml + checkpoints/) nor an exported directory "
        "(config.yaml + *.safetensors)"
    )


def _figure(n_panels: int):
    from matplotlib.figure import Figure

    cols = min(n_panels, MAX_COLUMNS)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def _show_map(ax, image: np.ndarray, heat: np.ndarray, *, title: str, overlay: bool) -> None:
    """``image (S, S)`` in [0, 1]; ``heat (gh, gw)`` stretched over it (nearest: one cell per patch)."""
    extent = (0, image.shape[1], image.shape[0], 0)
    if overlay:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, extent=extent)
    ax.imshow(
        heat,
        cmap="inferno",
        vmin=0,
        vmax=float(heat.max()) or 1.0,
        extent=extent,
        interpolation="nearest",
        alpha=0.55 if overlay else 1.0,
    )
    ax.set_title(title, fontsize=8)


def render_image(out: Path, *, image: np.ndarray, maps: np.ndarray, title: str) -> None:
    """One PNG: ``image (S, S)`` in [0, 1], the mean of ``maps (heads, gh, gw)`` over it, then each head's map."""
    heads = maps.shape[0]
    fig, axes = _figure(2 + heads)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=8)
    mean = maps.mean(axis=0)
    _show_map(axes[1], image, mean, title=f"mean of {heads} heads (max {mean.max():.3f})", overlay=True)
    for h in range(heads):
        _show_map(axes[2 + h], image, maps[h], title=f"head {h} (max {maps[h].max():.3f})", overlay=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=100)


def render_overview(
    out: Path, *, images: Sequence[np.ndarray], means: Sequence[np.ndarray], names: Sequence[str], title: str
) -> None:
    """A grid of mean-over-heads maps laid over their images (one panel per image)."""
    fig, axes = _figure(len(images))
    for ax, image, mean, name in zip(axes, images, means, names, strict=False):
        _show_map(ax, image, mean, title=name if len(name) <= 28 else name[:25] + "...", overlay=True)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=80)


def visualize(
    run: str | Path,
    *,
    images: Sequence[str | Path],
    out: Path,
    size: int = 224,
    max_images: int | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
) -> VizResult:
    """Attention PNGs of ``run``'s teacher (run or exported directory) for ``images`` into ``out``."""
    from raddino.data.imageio import UnusableImage, read_image
    from raddino.models.attention import last_block_cls_attention

    paths = collect_images(images, max_images=max_images)
    backbone, source, step = load_teacher(run, size=size, checkpoint=checkpoint)
    preprocess, model = backbone.preprocess, backbone.model.eval()
    out.mkdir(parents=True, exist_ok=True)
    label = f"{Path(run).name}" + (f" step {step}" if step is not None else "")
    files: list[Path] = []
    shown: list[np.ndarray] = []
    means: list[np.ndarray] = []
    for index, path in enumerate(tqdm(paths, desc="viz", disable=not progress or None, unit="img")):
        try:
            pixels = read_image(path, min_side=size).pixels
        except UnusableImage as err:
            raise RaddinoError(f"{path}: cannot read the image ({err})") from None
        x = preprocess(pixels)  # (3, S, S), normalised, gray replicated
        maps = last_block_cls_attention(model, x.unsqueeze(0)).patch_maps[0].numpy()  # (heads, gh, gw)
        image = np.clip(x[0].numpy() * preprocess.std[0] + preprocess.mean[0], 0.0, 1.0)  # (S, S) in [0, 1]
        target = out / f"{index:04d}-{path.stem}.png"
        render_image(target, image=image, maps=maps, title=f"{path.name} -- {label}, last-block CLS attention")
        files.append(target)
        if len(shown) < OVERVIEW_MAX:
            shown.append(image)
            means.append(maps.mean(axis=0))
    overview = out / "overview.png"
    render_overview(
        overview,
        images=shown,
        means=means,
        names=[p.name for p in paths[: len(shown)]],
        title=f"{label}: mean last-block CLS attention over heads",
    )
    files.append(overview)
    return VizResult(source=source, step=step, files=files)
