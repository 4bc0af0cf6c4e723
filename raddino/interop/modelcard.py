"""The model card (``README.md``) of an export: what the model is, how it was trained, how to load it.

Sections: model (architecture, input, position-embedding interpolation and whether the target library reproduces
it), usage (format-specific code), training (steps, source weights, the resolved config), data (manifest summaries
of the shards, or the npz / synthetic source), last logged metrics, and evaluation results when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@dataclass
class CardFacts:
    """Everything the card says, gathered by the exporter."""

    title: str
    fmt: str
    model_lines: list[str]
    usage: str
    interpolation: str
    step: int
    checkpoint: str
    config: DictConfig
    derived: dict | None = None
    last_metrics: dict | None = None
    eval_sections: list[tuple[str, str]] = field(default_factory=list)  # (source path, markdown)
    files: list[str] = field(default_factory=list)
    origin: str | None = None  # `raddino convert`: the source it was converted from (no run: no training sections)


def _manifest_paths(pattern: str) -> list[Path]:
    """Local ``manifest.json`` files beside the shards of one ``data.shards`` entry ('::'-joined patterns)."""
    found = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part or "://" in part or part.startswith("pipe:"):
            continue
        path = Path(part.split("{", 1)[0]).expanduser()
        directory = path if path.is_dir() else path.parent
        manifest = directory / "manifest.json"
        if manifest.is_file() and manifest not in found:
            found.append(manifest)
    return found


def data_summary(config: DictConfig) -> list[str]:
    """Bullet lines describing the pretraining data (never the key map or source paths inside manifests)."""
    data = config.data
    lines = [f"source: `{data.source}`"]
    if data.source == "synthetic":
        lines.append(f"{data.synthetic_count} synthetic radiographs of {data.synthetic_size} px")
    elif data.source == "npz":
        lines.append(f"file: `{data.path}` (split `{data.split}`)")
    shards = OmegaConf.select(config, "data.shards", default=None) or []
    for entry in shards:
        manifests = _manifest_paths(str(entry))
        if not manifests:
            lines.append(f"shards `{entry}` (no local manifest.json found)")
        for manifest in manifests:
            try:
                payload = json.loads(manifest.read_text())
            except (OSError, ValueError) as err:
                lines.append(f"shards `{entry}`: manifest unreadable ({err})")
                continue
            counts = payload.get("counts", {})
            size = payload.get("image_size", {})
            lines.append(
                f"shards `{entry}`: {counts.get('written', '?')} images written, {counts.get('skipped', '?')} "
                f"skipped, {len(payload.get('shards', []))} shards, {payload.get('total_bytes', '?')} bytes, "
                f"heights {size.get('height')}, widths {size.get('width')}, key salt fingerprint "
                f"`{payload.get('keys', {}).get('salt_fingerprint', '?')}`"
            )
    return lines


def render(facts: CardFacts) -> str:
    cfg = facts.config
    out = [f"# {facts.title}", ""]
    if facts.origin:
        intro = (
            f"Pretrained ViT backbone converted by `raddino convert` from {facts.origin} into the **{facts.fmt}** "
            "format, without training."
        )
    else:
        intro = (
            f"Teacher backbone of a raddino pretraining run (DINOv2 recipe: DINO + iBOT + KoLeo), exported in the "
            f"**{facts.fmt}** format at step {facts.step} (`{facts.checkpoint}`)."
        )
    out += [intro, "", "## Model", ""]
    out += [f"- {line}" for line in facts.model_lines]
    out += ["", "### Position embeddings at other input sizes", "", facts.interpolation, ""]
    out += ["## Usage", "", facts.usage.strip(), ""]
    if facts.origin:
        return "\n".join(out + ["## Files", ""] + [f"- `{name}`" for name in facts.files] + [""])
    out += ["## Training", ""]
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    out.append(f"- initialised from: `{init_from}`" if init_from else "- initialised from: random (from scratch)")
    out.append(f"- optimizer steps: {facts.step}")
    if facts.derived:
        keys = ("world_size", "global_batch", "lr", "total_steps", "max_steps")
        out.append("- derived: " + ", ".join(f"{k}={facts.derived[k]}" for k in keys if k in facts.derived))
    out += [
        f"- crops: {cfg.crops.n_global} global x {cfg.crops.global_size} px, {cfg.crops.n_local} local x "
        f"{cfg.crops.local_size} px; normalisation mean {list(cfg.crops.mean)}, std {list(cfg.crops.std)}",
        "",
        "### Data",
        "",
    ]
    out += [f"- {line}" for line in data_summary(cfg)]
    if facts.last_metrics:
        out += ["", "### Last logged training metrics", ""]
        shown = {k: v for k, v in facts.last_metrics.items() if isinstance(v, int | float)}
        out.append("| " + " | ".join(shown) + " |")
        out.append("|" + "---|" * len(shown))
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in shown.values()) + " |")
    out += ["", "## Evaluation", ""]
    if facts.eval_sections:
        for origin, text in facts.eval_sections:
            out += [f"From `{origin}`:", "", text.strip(), ""]
    else:
        out += ["No evaluation results were given (`raddino eval`, then `raddino export --eval DIR`).", ""]
    out += ["## Training configuration", "", "```yaml", OmegaConf.to_yaml(cfg, resolve=True).rstrip(), "```", ""]
    if facts.files:
        out += ["## Files", ""] + [f"- `{name}`" for name in facts.files] + [""]
    return "\n".join(out)
