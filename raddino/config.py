"""Strict structured configuration: defaults <- recipe YAML <- CLI dotlist, then frozen.

The schema is a tree of dataclasses. Unknown keys and wrong types are errors that name the key. Values derived from
the config (the lr after the sqrt batch-size rule, step counts) are computed by :func:`derive`, logged and saved in
the run directory; they are never written back into the config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raddino.data.synthetic import FINDINGS
from raddino.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    arch: str = "base"  # tiny | small | base | large | giant
    patch_size: int = 14
    img_size: int = 224  # grid the position embeddings are stored at; other sizes are interpolated
    num_registers: int = 0
    drop_path_rate: float = 0.1
    # sample (timm's DropPath: dropped samples still run the block, zeroed) | subset (only the kept samples run each
    # residual branch, DINOv2's efficient stochastic depth: ~drop_path_rate less block compute, same expectation)
    drop_path_mode: str = "sample"
    # true: the student runs global and local crops through its blocks in one packed pass (one matmul per layer for
    # all crops, attention per crop size; under FSDP2 one weight gather per block instead of two). Same losses up
    # to float rounding; with drop path the draws come in another order. docs/TRAINING.md, "Packed crops"
    pack_crops: bool = False
    layerscale: float = 1e-5
    # auto (the rule of the model.init_from source, so continued pretraining sees what the source saw; dinov2
    # without one) | dinov2 (offset 0.1, no antialias) | dinov2_reg (no offset, antialias) | hf (no offset, no
    # antialias); docs/INTEROP.md
    pos_embed_interp: str = "auto"
    init_from: str | None = None  # continue pretraining from released weights (docs/INTEROP.md)
    init_format: str = "auto"  # auto | dinov2 (Meta hub layout) | timm | hf (transformers directory) | raddino
    init_head: str | None = None  # DINO head weights (e.g. RAD-DINO's dino_head.safetensors); none: fresh heads
    init_strict: bool = True  # false: load what matches and report the rest instead of failing


@dataclass
class HeadConfig:
    out_dim: int = 65536  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    ibot_separate_head: bool = False
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | centering
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1


@dataclass
class CropConfig:
    global_size: int = 224
    local_size: int = 98
    n_global: int = 2
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # ImageNet statistics: what DINOv2 checkpoints were trained with, so continued pretraining sees familiar inputs.
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    # Gaussian blur sigma range in pixels of the output crop (DINOv2: 0.1-2.0, chosen for 224-px crops; scale it with
    # the crop size, or blur erases the fine structure small crops still have) and its probabilities: per global
    # crop (the last value repeats; DINOv2's effective 0.0 / 0.9, see docs/AUGMENTATION.md) and per local crop.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    global_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    local_blur_p: float = 0.5
    # crop resampling: "pyramid" (2x box averages + bilinear, OpenCV; fast, sharpness within ~2 % of bicubic) or
    # PIL's antialiased "bicubic" (DINOv2's) / "bilinear"; docs/AUGMENTATION.md, "Resampling"
    interpolation: str = "pyramid"


@dataclass
class MaskConfig:
    prob: float = 0.5  # fraction of global crops that are masked at all
    ratio_min: float = 0.1
    ratio_max: float = 0.5


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | npz | shards
    path: str | None = None  # .npz file (source=npz)
    split: str = "train"
    synthetic_count: int = 4096
    synthetic_size: int = 128
    synthetic_finding: str = "focal"  # what positive images carry: focal | reticular | miliary (data/synthetic.py)
    batch_size: int = 64  # images per device per forward (the micro-batch)
    # images per optimizer step over all devices; None = batch_size x world size. When set, each device takes
    # global_batch / world_size images per step, in global_batch / (world_size x batch_size) micro-batches
    # (gradient accumulation) if that is more than batch_size -- so a run keeps its batch on any number of GPUs.
    global_batch: int | None = None
    num_workers: int = 2
    # source=shards (docs/DATA.md, "Streaming"): one WebDataset URL pattern per dataset -- local brace pattern
    # (/data/shard-{000000..000099}.tar), a shard directory, http(s)://, s3://, pipe:; join patterns of one
    # dataset with '::'.
    shards: list[str] = field(default_factory=list)
    shard_weights: list[float] = field(default_factory=list)  # sampling weight per entry of `shards`; empty = equal
    shuffle_buffer: int = 1000  # samples per worker held for shuffling (0 = stream order)
    resampled: bool = True  # draw shards with replacement (endless); false = passes without repetition


@dataclass
class OptimConfig:
    base_lr: float = 4e-3  # at a global batch of `reference_batch`, scaled by sqrt(global_batch / reference_batch)
    reference_batch: int = 1024
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    beta1: float = 0.9
    beta2: float = 0.999
    freeze_last_layer_epochs: int = 1
    # AdamW kernel: auto (torch's choice: the multi-tensor foreach path on CUDA) | foreach | fused (one kernel per
    # parameter group; a GPU lever to measure) | for_loop (one parameter at a time, the reference)
    implementation: str = "auto"


@dataclass
class TeacherConfig:
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    temp_start: float = 0.04
    temp_end: float = 0.07
    temp_warmup_epochs: int = 30


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 100
    steps_per_epoch: int = 1250  # DINOv2's "official epoch length": an epoch is a fixed number of steps
    max_steps: int | None = None  # stop early (schedules still follow epochs * steps_per_epoch)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    # write checkpoints in a background thread while training goes on (complete at the next save or at the end)
    async_checkpoint: bool = False
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | none | PATH
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True
    # TensorBoard event files in output_dir beside metrics.jsonl (rank 0, every row's scalars); optional dependency:
    # pip install tensorboard. Off by default so a plain install never needs it
    tensorboard: bool = False


@dataclass
class ParallelConfig:
    # FSDP2 sharding of student and teacher: null (auto: when more than one process) | true (also a single GPU) |
    # false (never; only valid with one process). docs/TRAINING.md, "Distributed training"
    fsdp: bool | None = None
    activation_checkpointing: int = 0  # recompute every k-th block in backward: 0 off, 1 every block
    compile: bool = False  # torch.compile each transformer block
    reshard_after_forward: bool = True  # FSDP2, student: free gathered params after forward (ZeRO-3); false = ZeRO-2
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # collective timeout: a hung or dead rank fails the job after this long


@dataclass
class RaddinoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("tiny", "small", "base", "large", "giant"),
    "model.pos_embed_interp": ("auto", "dinov2", "dinov2_reg", "hf"),
    "model.drop_path_mode": ("sample", "subset"),
    "model.init_format": ("auto", "dinov2", "timm", "hf", "raddino"),
    "loss.centering": ("sinkhorn_knopp", "centering"),
    "crops.interpolation": ("pyramid", "bicubic", "bilinear"),
    "optim.implementation": ("auto", "foreach", "fused", "for_loop"),
    "data.source": ("synthetic", "npz", "shards"),
    "data.synthetic_finding": tuple(FINDINGS),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp32"),
    "parallel.backend": ("auto", "nccl", "gloo"),
}


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe is a YAML path, or the name of one in the repository's ``configs/`` (``tiny_cpu``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    if not RECIPES_DIR.is_dir():
        raise ConfigError(
            f"config file not found: {recipe}; named recipes are read from the repository's configs/ directory, "
            f"which this installation does not have ({RECIPES_DIR}): install from a checkout with "
            "`pip install -c constraints.txt -e .` or pass a YAML path"
        )
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config file not found: {recipe} (named recipes: {available})")


def _error_message(err: OmegaConfBaseException, origin: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    msg = msg.splitlines()[0]
    if key:
        return f"{origin}: invalid config key '{key}': {msg}"
    return f"{origin}: {msg}"


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge defaults <- recipe YAML <- dotlist overrides (``optim.base_lr=1e-3``), validate and freeze.

    Raises:
        ConfigError: naming the key for unknown keys, wrong types or values outside the allowed choices.
    """
    cfg = OmegaConf.structured(RaddinoConfig)
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            loaded = OmegaConf.load(path)
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise ConfigError(_error_message(err, str(path))) from None
        except Exception as err:  # YAML syntax errors come from the yaml parser
            raise ConfigError(f"{path}: cannot parse YAML: {str(err).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(_error_message(err, f"override '{item}'")) from None
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"invalid config key '{key}': {value!r} is not one of {', '.join(choices)}")
    if cfg.data.source == "npz" and not cfg.data.path:
        raise ConfigError("invalid config key 'data.path': required when data.source=npz")
    for key in ("crops.global_scale", "crops.local_scale"):
        lo, hi = OmegaConf.select(cfg, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"invalid config key '{key}': need 0 < min <= max <= 1, got [{lo}, {hi}]")
    if not 0 <= cfg.mask.ratio_min <= cfg.mask.ratio_max < 1:
        raise ConfigError("invalid config key 'mask.ratio_min': need 0 <= ratio_min <= ratio_max < 1")
    for key in ("crops.global_size", "crops.local_size", "model.img_size"):
        if OmegaConf.select(cfg, key) % cfg.model.patch_size:
            raise ConfigError(f"invalid config key '{key}': must be a multiple of model.patch_size")
    lo, hi = cfg.crops.blur_sigma
    if not 0 < lo <= hi:
        raise ConfigError(f"invalid config key 'crops.blur_sigma': need 0 < min <= max, got [{lo}, {hi}]")
    for key, values in (
        ("crops.global_blur_p", list(cfg.crops.global_blur_p)),
        ("crops.local_blur_p", [cfg.crops.local_blur_p]),
    ):
        if not values or not all(0 <= v <= 1 for v in values):
            raise ConfigError(f"invalid config key '{key}': probabilities must be in [0, 1], got {values}")
    if cfg.crops.n_global < 1:
        raise ConfigError("invalid config key 'crops.n_global': need at least one global crop")
    if cfg.data.batch_size < 1:
        raise ConfigError("invalid config key 'data.batch_size': must be >= 1")
    for key in ("head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.nlayers"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"invalid config key '{key}': must be >= 1")
    if cfg.data.global_batch is not None and cfg.data.global_batch < 1:
        raise ConfigError("invalid config key 'data.global_batch': must be >= 1")
    if cfg.parallel.activation_checkpointing < 0:
        raise ConfigError("invalid config key 'parallel.activation_checkpointing': must be >= 0")
    if cfg.parallel.timeout_s <= 0:
        raise ConfigError("invalid config key 'parallel.timeout_s': must be > 0")


def batch_split(*, batch_size: int, global_batch: int | None, world_size: int) -> tuple[int, int, int]:
    """``(global_batch, micro_batch, accumulation_steps)`` for ``world_size`` devices.

    Raises:
        ConfigError: a global batch that the devices (and micro-batches) cannot split evenly, naming the keys.
    """
    if global_batch is None:
        return batch_size * world_size, batch_size, 1
    if global_batch % world_size:
        raise ConfigError(
            f"invalid config key 'data.global_batch': {global_batch} images do not split evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    if per_rank <= batch_size:
        return global_batch, per_rank, 1
    if per_rank % batch_size:
        raise ConfigError(
            f"invalid config key 'data.batch_size': {per_rank} images per process (data.global_batch="
            f"{global_batch} over {world_size}) are not a whole number of micro-batches of {batch_size}"
        )
    return global_batch, batch_size, per_rank // batch_size


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the world size; saved as ``derived.json`` in the run directory."""

    world_size: int
    global_batch: int  # images per optimizer step, all processes
    micro_batch: int  # images per process per forward
    accumulation_steps: int  # forwards per process per optimizer step
    lr: float
    min_lr: float
    total_steps: int
    max_steps: int
    warmup_steps: int
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    # model.pos_embed_interp after resolving ``auto`` against model.init_from: what the run's backbone uses
    pos_embed_interp: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive(cfg: DictConfig, *, world_size: int, pos_embed_interp: str | None = None) -> Derived:
    """Scale the learning rate with the sqrt rule and turn epoch counts into step counts.

    ``pos_embed_interp``: the rule the built backbone resolved ``model.pos_embed_interp=auto`` to (default: the
    configured value).
    """
    global_batch, micro_batch, accumulation = batch_split(
        batch_size=cfg.data.batch_size, global_batch=cfg.data.global_batch, world_size=world_size
    )
    scale = math.sqrt(global_batch / cfg.optim.reference_batch)
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    spe = cfg.train.steps_per_epoch
    return Derived(
        world_size=world_size,
        global_batch=global_batch,
        micro_batch=micro_batch,
        accumulation_steps=accumulation,
        lr=cfg.optim.base_lr * scale,
        min_lr=cfg.optim.min_lr * scale,
        total_steps=total,
        max_steps=min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total,
        warmup_steps=cfg.optim.warmup_epochs * spe,
        teacher_temp_warmup_steps=cfg.teacher.temp_warmup_epochs * spe,
        freeze_last_layer_steps=cfg.optim.freeze_last_layer_epochs * spe,
        pos_embed_interp=pos_embed_interp or cfg.model.pos_embed_interp,
    )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
