"""The training loop: build everything from the config, then step (nanoGPT-style, short and linear)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from raddino import build
from raddino.checkpoint import CheckpointManager, TrainerState
from raddino.config import Derived, derive, to_yaml
from raddino.data.batch import SSLBatch
from raddino.errors import RaddinoError
from raddino.monitors import CollapseMonitor
from raddino.optim import apply_schedule, clip_grad_norm
from raddino.schedules import Schedules
from raddino.ssl import SSLMetaArch

log = logging.getLogger(__name__)


class TrainingDiverged(RaddinoError):
    """Too many consecutive non-finite steps; the last good checkpoint is left untouched."""

    exit_code = 3


@dataclass
class Training:
    """Everything a run needs, built from the config by :func:`build_training`."""

    model: SSLMetaArch
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    seed: int
    rank: int
    make_loader: Callable[..., Iterable[SSLBatch]]  # (start_position=global sample)  -> endless batch stream
    checkpoints: CheckpointManager
    derived: Derived
    run_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    clip_grad: float
    log_every: int
    checkpoint_every: int
    max_bad_steps: int
    resume: str
    progress: bool


@dataclass(frozen=True)
class FitSummary:
    steps: int
    last_checkpoint: Path | None
    refused_steps: int
    seconds: float


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RaddinoError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_training(cfg: DictConfig) -> Training:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(cfg.train.seed)
    device = _device(cfg.train.device)
    model = build.meta_arch_from_config(cfg).to(device)
    derived = derive(cfg, world_size=world_size, pos_embed_interp=model.student["backbone"].pos_embed_interp)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "derived.json").write_text(json.dumps(derived.as_dict(), indent=2))
    log.info("derived values: %s", derived.as_dict())
    return Training(
        model=model,
        optimizer=build.optimizer_from_config(cfg, model),
        schedules=build.schedules_from_config(cfg, derived),
        seed=cfg.train.seed,
        rank=dist.get_rank() if dist.is_initialized() else 0,
        make_loader=functools.partial(build.loader_from_config, cfg),
        checkpoints=CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_last),
        derived=derived,
        run_dir=run_dir,
        device=device,
        autocast_dtype=_autocast_dtype(cfg.train.precision, device),
        clip_grad=cfg.optim.clip_grad,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        max_bad_steps=cfg.train.max_bad_steps,
        resume=cfg.train.resume,
        progress=cfg.train.progress,
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the default generator for one step on one rank (stochastic depth draws from it).

    Reseeding every step makes the draws a function of (seed, step, rank), not of how many draws happened before
    -- so a resumed run matches an uninterrupted one even though DataLoader start-up and checkpoint I/O differ.
    """
    return (seed * 1_000_003 + step) * 4099 + rank


def _all_finite(values: dict[str, torch.Tensor]) -> list[str]:
    """Names of non-finite terms, agreed across ranks so every rank refuses the same step."""
    flags = torch.stack([torch.isfinite(v).all() for v in values.values()]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [name for name, ok in zip(values, flags.tolist(), strict=True) if not ok]


def fit(t: Training) -> FitSummary:
    state = TrainerState(step=0, data_position=0, world_size=t.derived.world_size)
    if (path := t.checkpoints.resolve_resume(t.resume)) is not None:
        state = t.checkpoints.load(path, model=t.model, optimizer=t.optimizer)
    step, position, bad, refused, last_ckpt = state.step, state.data_position, 0, 0, None
    loader = t.make_loader(start_position=position)
    student_params = [p for p in t.model.student.parameters() if p.requires_grad]
    autocast = torch.autocast(t.device.type, dtype=t.autocast_dtype) if t.autocast_dtype else contextlib.nullcontext()
    metrics = (t.run_dir / "metrics.jsonl").open("a")
    bar = tqdm(total=t.derived.max_steps, initial=step, disable=not t.progress or None, desc="pretrain")
    start = tick = time.perf_counter()
    t.model.train()
    log_k = math.log(t.model.out_dim)
    # Grace period: while the prototype layer is frozen the student cannot become uniform and targets are forming.
    monitor = CollapseMonitor(
        log_k=log_k, embed_dim=t.model.student["backbone"].embed_dim, grace_steps=t.derived.freeze_last_layer_steps
    )
    for batch in loader:
        if step >= t.derived.max_steps:
            break
        torch.manual_seed(step_seed(t.seed, step, t.rank))
        sched = t.schedules.at(step)
        apply_schedule(t.optimizer, lr=sched.lr, weight_decay=sched.weight_decay, last_layer_lr=sched.last_layer_lr)
        batch = batch.to(t.device, non_blocking=True)
        with autocast:
            out = t.model(batch, teacher_temp=sched.teacher_temp)
        t.optimizer.zero_grad(set_to_none=True)
        position += t.derived.global_batch
        bad_terms = _all_finite(out.terms())
        if not bad_terms:
            out.loss.backward()
            grad_norm = clip_grad_norm(student_params, t.clip_grad)
            bad_terms = _all_finite({"grad_norm": grad_norm})
        if bad_terms:  # never step on a non-finite loss or gradient
            bad, refused = bad + 1, refused + 1
            log.warning("step %d refused: non-finite %s (%d in a row)", step, ", ".join(bad_terms), bad)
            metrics.write(json.dumps({"step": step, "refused": bad_terms}) + "\n")
            if bad >= t.max_bad_steps:
                metrics.close()
                raise TrainingDiverged(
                    f"stopped after {bad} consecutive non-finite steps at step {step} ({', '.join(bad_terms)}); "
                    f"last good checkpoint: {t.checkpoints.latest() or 'none'}. Lower optim.base_lr or check data."
                )
            continue
        bad = 0
        t.optimizer.step()
        t.model.update_teacher(sched.momentum)
        step += 1
        now = time.perf_counter()
        row = {
            "step": step,
            "loss": out.loss.item(),
            **{k: v.item() for k, v in out.terms().items()},
            "lr": sched.lr,
            "wd": sched.weight_decay,
            "momentum": sched.momentum,
            "teacher_temp": sched.teacher_temp,
            "grad_norm": grad_norm.item(),
            "teacher_entropy": out.teacher_entropy.item(),
            "student_entropy": out.student_entropy.item(),
            "dino_rel": out.dino.item() / log_k,  # 1 = the DINO cross-entropy of a uniform student
            "student_std": out.student_std.item(),
            "img_per_s": t.derived.global_batch / (now - tick),
        }
        flags = monitor.update(step=step, **{k: row[k] for k in ("student_entropy", "teacher_entropy", "student_std")})
        if flags:
            row["collapse"] = [flag.name for flag in flags]
        for flag in (f for f in flags if f.first):
            log.warning("step %d: collapse monitor raised %s: %s", step, flag.name, flag.message)
        tick = now
        metrics.write(json.dumps(row) + "\n")
        if step % t.log_every == 0 or step == 1:
            metrics.flush()
            log.debug("step %d: %s", step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ent=f"{row['teacher_entropy']:.2f}")
        if step % t.checkpoint_every == 0 or step == t.derived.max_steps:
            last_ckpt = t.checkpoints.save(
                model=t.model,
                optimizer=t.optimizer,
                state=TrainerState(step=step, data_position=position, world_size=t.derived.world_size),
            )
    bar.close()
    metrics.close()
    return FitSummary(
        steps=step,
        last_checkpoint=last_ckpt or t.checkpoints.latest(),
        refused_steps=refused,
        seconds=time.perf_counter() - start,
    )
