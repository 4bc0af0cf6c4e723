"""Read a training run's teacher from its DCP checkpoint without building the model or the optimizer.

A DCP checkpoint lists every tensor with its global shape and dtype in its metadata, so the wanted tensors (here the
teacher's: ``model.teacher.*``) can be allocated from the metadata and filled by ``dcp.load`` -- on one process,
whatever the number of ranks that wrote the checkpoint, and without touching the optimizer state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

MODEL_KEY = "model"  # top-level entry of raddino's DCP checkpoints holding the SSLMetaArch state dict


@dataclass(frozen=True)
class RunTeacher:
    """The teacher of one checkpoint: ``backbone`` in :class:`VisionTransformer` names, ``heads`` by module name
    (``dino_head``, optionally ``ibot_head``) in :class:`DINOHead` names."""

    run_dir: Path
    checkpoint: Path
    step: int
    config: DictConfig
    pos_embed_interp: str  # model.pos_embed_interp with ``auto`` resolved
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]


def run_pos_embed_interp(run_dir: Path, config: DictConfig) -> str:
    """The position-embedding rule a run's backbone used: ``model.pos_embed_interp``, with ``auto`` resolved from
    the run's ``derived.json`` (written by ``raddino pretrain``)."""
    rule = str(config.model.pos_embed_interp)
    if rule != "auto":
        return rule
    derived = run_dir / "derived.json"
    if derived.is_file():
        resolved = json.loads(derived.read_text()).get("pos_embed_interp")
        if resolved and resolved != "auto":
            return str(resolved)
    log.warning("%s: model.pos_embed_interp=auto and no resolved rule in derived.json; assuming 'dinov2'", run_dir)
    return "dinov2"


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def find_checkpoint(run_dir: Path, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint`` (a ``step_*`` directory, or a step number) or the newest complete checkpoint of ``run_dir``."""
    from raddino.checkpoint import CheckpointManager

    if checkpoint is not None:
        text = str(checkpoint)
        path = run_dir / "checkpoints" / f"step_{int(text):07d}" if text.isdigit() else Path(text)
        if not (path / "state.json").is_file():
            raise RaddinoError(f"not a complete raddino checkpoint (no state.json): {path}")
        return path
    latest = CheckpointManager(run_dir / "checkpoints", keep_last=0).latest()
    if latest is None:
        raise RaddinoError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    return latest


def read_checkpoint_tensors(checkpoint: Path, *, prefix: str) -> dict[str, Tensor]:
    """Tensors of the checkpoint's model state whose names start with ``prefix`` (returned without it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from raddino.checkpoint import single_process_dcp

    try:
        metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as err:  # noqa: BLE001  (missing / corrupt .metadata)
        raise RaddinoError(f"cannot read the DCP metadata of {checkpoint}: {err}") from None
    full = f"{MODEL_KEY}.{prefix}"
    wanted = {
        name[len(MODEL_KEY) + 1 :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if name.startswith(full) and isinstance(meta, TensorStorageMetadata)
    }
    if not wanted:
        raise RaddinoError(f"{checkpoint}: no tensors named {prefix}* in the checkpoint")
    try:
        with single_process_dcp():
            dcp.load({MODEL_KEY: wanted}, checkpoint_id=str(checkpoint))
    except Exception as err:  # noqa: BLE001  (DCP wraps read errors in long nested messages)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RaddinoError(f"cannot read {prefix}* from {checkpoint}: {first}") from err
    return {name[len(prefix) :]: tensor for name, tensor in wanted.items()}


def read_run_teacher(run_dir: str | Path, *, checkpoint: str | Path | None = None) -> RunTeacher:
    """The teacher (backbone + heads) of the newest complete checkpoint of ``run_dir`` (or of ``checkpoint``)."""
    from raddino.config import load_config

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RaddinoError(f"run directory not found: {run_dir}")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RaddinoError(f"{run_dir}: no config.yaml (is it a `raddino pretrain` output directory?)")
    config = load_config(config_file)
    path = find_checkpoint(run_dir, checkpoint)
    state = json.loads((path / "state.json").read_text())
    teacher = read_checkpoint_tensors(path, prefix="teacher.")
    backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    heads: dict[str, dict[str, Tensor]] = {}
    for name, tensor in teacher.items():
        module, _, param = name.partition(".")
        if module.endswith("_head"):
            heads.setdefault(module, {})[param] = tensor
    if not backbone:
        raise RaddinoError(f"{path}: the checkpoint holds no teacher backbone")
    log.info("read the teacher of %s (step %d): %d backbone tensors", path, state["step"], len(backbone))
    return RunTeacher(
        run_dir=run_dir,
        checkpoint=path,
        step=int(state["step"]),
        config=config,
        pos_embed_interp=run_pos_embed_interp(run_dir, config),
        backbone=backbone,
        heads=heads,
    )
