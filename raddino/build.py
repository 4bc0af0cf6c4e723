"""Builders: the only place that reads the config and turns it into components with narrow arguments."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from omegaconf import DictConfig

from raddino.config import Derived
from raddino.data.augment import MultiCropAugmentation
from raddino.data.batch import SSLBatch
from raddino.data.dataset import SSLDataset, build_ssl_loader
from raddino.data.sources import ImageSource, NpzSource, SyntheticSource
from raddino.data.stream import (
    ShardStream,
    build_stream_loader,
    resolve_rank,
    shard_sets,
    worker_errors_as_user_errors,
)
from raddino.errors import RaddinoError
from raddino.interop.load import check_model_config, init_meta_arch, resolve_pos_embed_interp
from raddino.interop.source import Source, read_source
from raddino.models.heads import DINOHead
from raddino.models.vit import VisionTransformer, build_backbone
from raddino.optim import build_optimizer, build_param_groups
from raddino.schedules import Schedules
from raddino.ssl import SSLMetaArch

log = logging.getLogger(__name__)


def backbone_from_config(model: DictConfig, *, pos_embed_interp: str | None = None) -> VisionTransformer:
    """The backbone of ``model.*``. ``pos_embed_interp`` overrides ``model.pos_embed_interp`` with a resolved rule
    (``auto`` without one means ``dinov2``)."""
    return build_backbone(
        arch=model.arch,
        img_size=model.img_size,
        patch_size=model.patch_size,
        num_registers=model.num_registers,
        drop_path_rate=model.drop_path_rate,
        drop_path_mode=model.drop_path_mode,
        layerscale=model.layerscale,
        pos_embed_interp=pos_embed_interp or resolve_pos_embed_interp(model.pos_embed_interp, None),
    )


def init_source_from_config(model: DictConfig) -> Source | None:
    """Read ``model.init_from`` (released weights to continue from) and check ``model.*`` against it.

    Raises:
        RaddinoError: unreadable weights, or ``model.*`` keys that must change to fit them (each named).
    """
    if not model.init_from:
        return None
    source = read_source(model.init_from, fmt=model.init_format)
    notes = check_model_config(
        source.info,
        arch=model.arch,
        patch_size=model.patch_size,
        num_registers=model.num_registers,
        img_size=model.img_size,
        pos_embed_interp=model.pos_embed_interp,
    )
    for note in notes:
        log.warning("model.init_from: %s", note)
    return source


def head_from_config(head: DictConfig, *, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=head.out_dim,
        hidden_dim=head.hidden_dim,
        bottleneck_dim=head.bottleneck_dim,
        nlayers=head.nlayers,
    )


def meta_arch_from_config(cfg: DictConfig) -> SSLMetaArch:
    """Student + teacher; both start from ``model.init_from`` (and ``model.init_head``) when given."""
    source = init_source_from_config(cfg.model)
    rule = resolve_pos_embed_interp(cfg.model.pos_embed_interp, source.info if source else None)
    backbone = backbone_from_config(cfg.model, pos_embed_interp=rule)
    dino_head = head_from_config(cfg.head, in_dim=backbone.embed_dim)
    ibot_head = head_from_config(cfg.head, in_dim=backbone.embed_dim) if cfg.loss.ibot_separate_head else None
    model = SSLMetaArch(
        backbone=backbone,
        dino_head=dino_head,
        ibot_head=ibot_head,
        n_global=cfg.crops.n_global,
        n_local=cfg.crops.n_local,
        student_temp=cfg.loss.student_temp,
        centering=cfg.loss.centering,
        sinkhorn_iterations=cfg.loss.sinkhorn_iterations,
        center_momentum=cfg.loss.center_momentum,
        dino_weight=cfg.loss.dino_weight,
        ibot_weight=cfg.loss.ibot_weight,
        koleo_weight=cfg.loss.koleo_weight,
        pack_crops=cfg.model.pack_crops,
    )
    if source is not None:
        init_meta_arch(model, init_from=source, init_head=cfg.model.init_head, strict=cfg.model.init_strict)
    return model


def source_from_config(data: DictConfig, *, seed: int) -> ImageSource:
    if data.source == "synthetic":
        return SyntheticSource(
            n=data.synthetic_count, seed=seed, size=data.synthetic_size, finding=data.synthetic_finding
        )
    if data.source == "npz":
        return NpzSource(data.path, split=data.split)
    if data.source == "shards":
        raise RaddinoError(
            "data.source=shards is streamed, not an indexable image source: build it with loader_from_config"
        )
    raise RaddinoError(f"invalid config key 'data.source': unknown source {data.source!r}")


def augmentation_from_config(crops: DictConfig) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_size=crops.global_size,
        local_size=crops.local_size,
        n_global=crops.n_global,
        n_local=crops.n_local,
        global_scale=tuple(crops.global_scale),
        local_scale=tuple(crops.local_scale),
        mean=tuple(crops.mean),
        std=tuple(crops.std),
        flip_p=crops.flip_p,
        brightness=crops.brightness,
        contrast=crops.contrast,
        blur_sigma=tuple(crops.blur_sigma),
        global_blur_p=tuple(crops.global_blur_p),
        local_blur_p=crops.local_blur_p,
        interpolation=crops.interpolation,
    )


def dataset_from_config(cfg: DictConfig) -> SSLDataset:
    return SSLDataset(
        source=source_from_config(cfg.data, seed=cfg.train.seed),
        augmentation=augmentation_from_config(cfg.crops),
        patch_size=cfg.model.patch_size,
        mask_prob=cfg.mask.prob,
        mask_ratio=(cfg.mask.ratio_min, cfg.mask.ratio_max),
        seed=cfg.train.seed,
    )


def stream_loader_from_config(
    cfg: DictConfig,
    *,
    start_position: int,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int | None = None,
) -> Iterator[SSLBatch]:
    """The endless batch stream of ``data.source=shards`` (WebDataset shards), from global ``start_position``.

    ``rank`` / ``world_size``: the trainer's (:class:`raddino.parallel.ParallelEnv`); default: the process group,
    else ``RANK`` / ``WORLD_SIZE``. They are handed to the workers inside the dataset object. ``batch_size``: the
    micro-batch per rank (default ``data.batch_size``). Data errors found in a worker are raised as one-line
    :class:`RaddinoError`.
    """
    data = cfg.data
    rank, world_size = resolve_rank(rank, world_size)
    stream = ShardStream(
        datasets=shard_sets(list(data.shards), list(data.shard_weights)),
        augmentation=augmentation_from_config(cfg.crops),
        patch_size=cfg.model.patch_size,
        mask_prob=cfg.mask.prob,
        mask_ratio=(cfg.mask.ratio_min, cfg.mask.ratio_max),
        seed=cfg.train.seed,
        batch_size=batch_size or data.batch_size,
        rank=rank,
        world_size=world_size,
        start_position=start_position,
        shuffle_buffer=data.shuffle_buffer,
        resampled=data.resampled,
    )
    log.info(
        "streaming %s shards (%s) from position %d on rank %d of %d",
        " + ".join(str(len(d.urls)) for d in stream.datasets),
        "resampled" if data.resampled else "passes without repetition",
        start_position,
        rank,
        world_size,
    )
    return worker_errors_as_user_errors(build_stream_loader(stream, num_workers=data.num_workers))


def loader_from_config(
    cfg: DictConfig,
    *,
    start_position: int,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int | None = None,
) -> Iterable[SSLBatch]:
    """The endless micro-batch stream of the configured source for one rank, continuing from global sample
    ``start_position``. ``rank`` / ``world_size`` default to the process group (else 0 / 1), ``batch_size`` to
    ``data.batch_size``; the trainer passes its own (:attr:`raddino.config.Derived.micro_batch`)."""
    if cfg.data.source == "shards":
        return stream_loader_from_config(
            cfg, start_position=start_position, rank=rank, world_size=world_size, batch_size=batch_size
        )
    dataset = dataset_from_config(cfg)
    return build_ssl_loader(
        dataset,
        batch_size=batch_size or cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        start_position=start_position,
        rank=rank,
        world_size=world_size,
    )


def optimizer_from_config(cfg: DictConfig, model: SSLMetaArch):
    groups = build_param_groups(
        model.student.named_parameters(),
        num_layers=len(model.student["backbone"].blocks),
        layer_decay=cfg.optim.layer_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    return build_optimizer(
        groups, betas=(cfg.optim.beta1, cfg.optim.beta2), implementation=str(cfg.optim.implementation)
    )


def schedules_from_config(cfg: DictConfig, derived: Derived) -> Schedules:
    return Schedules(
        lr=derived.lr,
        min_lr=derived.min_lr,
        warmup_steps=derived.warmup_steps,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum_start=cfg.teacher.momentum_start,
        momentum_end=cfg.teacher.momentum_end,
        teacher_temp_start=cfg.teacher.temp_start,
        teacher_temp_end=cfg.teacher.temp_end,
        teacher_temp_warmup_steps=derived.teacher_temp_warmup_steps,
        freeze_last_layer_steps=derived.freeze_last_layer_steps,
        total_steps=derived.total_steps,
    )
