"""The training loop: build everything from the config, then step (nanoGPT-style, short and linear).

One path for every scale: :mod:`raddino.parallel` starts the process group (if the launch has one), shards student
and teacher with FSDP2 and picks the device; the loop below is the same for 1 CPU process and N GPU nodes. Each
rank reads its own interleaved slice of every global batch (:class:`~raddino.data.dataset.PositionSampler`), the
centering / Sinkhorn-Knopp statistics are all-reduced inside the model, gradients are averaged by FSDP2's
reduce-scatter, and only rank 0 writes metrics, logs and the progress bar.
"""

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

from raddino import build, parallel
from raddino.checkpoint import CheckpointManager, TrainerState
from raddino.config import Derived, derive, to_yaml
from raddino.data.batch import SSLBatch
from raddino.errors import RaddinoError
from raddino.metrics import MetricsLog
from raddino.monitors import CollapseMonitor
from raddino.optim import apply_schedule, clip_grad_norm
from raddino.parallel import ParallelEnv, ParallelPlan
from raddino.plots import try_plot_run
from raddino.schedules import Schedules
from raddino.ssl import SSLMetaArch
from raddino.tensorboard_log import ScalarLog, require_tensorboard

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
    env: ParallelEnv
    make_loader: Callable[..., Iterable[SSLBatch]]  # (start_position=global sample)  -> endless micro-batch stream
    checkpoints: CheckpointManager
    derived: Derived
    run_dir: Path
    autocast_dtype: torch.dtype | None
    clip_grad: float
    log_every: int
    checkpoint_every: int
    max_bad_steps: int
    resume: str
    progress: bool
    tensorboard: bool = False

    @property
    def device(self) -> torch.device:
        return self.env.device


@dataclass(frozen=True)
class FitSummary:
    steps: int
    last_checkpoint: Path | None
    refused_steps: int
    seconds: float


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype matmuls run in (bf16 for ``bf16``, and for ``auto`` on CUDA), or None for fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def parallel_plan_from_config(cfg: DictConfig, *, env: ParallelEnv, dtype: torch.dtype | None) -> ParallelPlan:
    p = cfg.parallel
    fsdp = env.distributed if p.fsdp is None else p.fsdp
    if env.distributed and not fsdp:
        raise RaddinoError(
            "parallel.fsdp=false with more than one process: each process would train its own model; "
            "drop the override (FSDP2 shards automatically when distributed)"
        )
    return ParallelPlan(
        fsdp=fsdp,
        ac_every=p.activation_checkpointing,
        compile=p.compile,
        param_dtype=dtype if fsdp else None,
        reduce_dtype=torch.float32,
        reshard_after_forward=p.reshard_after_forward,
    )


def build_training(cfg: DictConfig, *, env: ParallelEnv | None = None) -> Training:
    """Model (sharded when distributed), optimizer, schedules, loader and checkpointer of one run.

    ``env``: where this process sits; default: :func:`raddino.parallel.init_distributed` from the launch
    environment (torchrun / SLURM variables), which starts the process group when there is more than one process.
    """
    if env is None:
        env = parallel.init_distributed(
            device=cfg.train.device, backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s
        )
    if not env.is_main:  # one log, one progress bar, one metrics file: rank 0's
        logging.getLogger("raddino").setLevel(logging.WARNING)
    derived_batch = derive(cfg, world_size=env.world_size)  # fails early on a batch that does not split
    if cfg.train.tensorboard:  # every rank fails alike, before any work, when the optional package is missing
        require_tensorboard()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (FSDP2 shards them, no broadcast)
    model = build.meta_arch_from_config(cfg).to(env.device)
    dtype = compute_dtype(cfg.train.precision, env.device)
    plan = parallel_plan_from_config(cfg, env=env, dtype=dtype)
    parallel.parallelize(model, plan=plan, env=env)
    derived = derive(cfg, world_size=env.world_size, pos_embed_interp=model.student["backbone"].pos_embed_interp)
    assert derived.global_batch == derived_batch.global_batch
    run_dir = Path(cfg.train.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "derived.json").write_text(json.dumps(derived.as_dict(), indent=2))
    log.info("%s; derived values: %s", env.describe(), derived.as_dict())
    return Training(
        model=model,
        optimizer=build.optimizer_from_config(cfg, model),  # after sharding: it must hold the DTensor parameters
        schedules=build.schedules_from_config(cfg, derived),
        seed=cfg.train.seed,
        env=env,
        make_loader=functools.partial(
            build.loader_from_config, cfg, rank=env.rank, world_size=env.world_size, batch_size=derived.micro_batch
        ),
        checkpoints=CheckpointManager(
            run_dir / "checkpoints", keep_last=cfg.train.keep_last, async_save=cfg.train.async_checkpoint
        ),
        derived=derived,
        run_dir=run_dir,
        # FSDP2 computes in the gathered parameters' dtype (its mixed-precision policy); without it, autocast.
        autocast_dtype=None if plan.fsdp else dtype,
        clip_grad=cfg.optim.clip_grad,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        max_bad_steps=cfg.train.max_bad_steps,
        resume=cfg.train.resume,
        progress=cfg.train.progress,
        tensorboard=cfg.train.tensorboard,
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the default generator for one step on one rank (stochastic depth draws from it).

    Reseeding every step makes the draws a function of (seed, step, rank), not of how many draws happened before
    -- so a resumed run matches an uninterrupted one even though DataLoader start-up and checkpoint I/O differ.
    """
    return (seed * 1_000_003 + step) * 4099 + rank


def _agreed_non_finite(flags: dict[str, torch.Tensor]) -> list[str]:
    """Names whose finiteness flag is False on any rank (so every rank refuses the same step). The one host sync of
    a training step: whether to apply it must be known before the optimizer runs."""
    stacked = torch.stack(list(flags.values())).float()
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.MIN)
    return [name for name, ok in zip(flags, stacked.tolist(), strict=True) if not ok]


def fit(t: Training) -> FitSummary:
    main, d = t.env.is_main, t.derived
    state = TrainerState(step=0, data_position=0, world_size=d.world_size, global_batch=d.global_batch)
    if (path := t.checkpoints.resolve_resume(t.resume)) is not None:
        state = t.checkpoints.load(path, model=t.model, optimizer=t.optimizer)
        if state.world_size != d.world_size:
            log.info("resuming a %d-process checkpoint on %d processes", state.world_size, d.world_size)
        if state.global_batch not in (None, d.global_batch):
            log.warning(
                "the checkpoint was trained with a global batch of %d, this run uses %d (set data.global_batch=%d "
                "to keep it on any number of processes)",
                state.global_batch,
                d.global_batch,
                state.global_batch,
            )
    step, position, bad, refused, last_ckpt = state.step, state.data_position, 0, 0, None
    log_k = math.log(t.model.out_dim)
    metrics = MetricsLog(
        t.run_dir / "metrics.jsonl",
        main=main,
        resume_step=step,
        log_k=log_k,
        # Grace: while the prototype layer is frozen the student cannot become uniform and targets are forming.
        monitor=CollapseMonitor(
            log_k=log_k, embed_dim=t.model.student["backbone"].embed_dim, grace_steps=d.freeze_last_layer_steps
        ),
        global_batch=d.global_batch,
        board=ScalarLog(t.run_dir, first_step=step + 1) if main and t.tensorboard else None,
    )
    batches = iter(t.make_loader(start_position=position))
    student_params = [p for p in t.model.student.parameters() if p.requires_grad]
    autocast = torch.autocast(t.device.type, dtype=t.autocast_dtype) if t.autocast_dtype else contextlib.nullcontext()
    bar = tqdm(total=d.max_steps, initial=step, disable=not (t.progress and main) or None, desc="pretrain")
    start = time.perf_counter()
    t.model.train()
    while step < d.max_steps:
        torch.manual_seed(step_seed(t.seed, step, t.env.rank))
        sched = t.schedules.at(step)
        apply_schedule(t.optimizer, lr=sched.lr, weight_decay=sched.weight_decay, last_layer_lr=sched.last_layer_lr)
        # Take the whole step's micro-batches first: a refused step still consumes exactly its global batch.
        # The loader ships gray crops; the 3 normalised channels are made on the device.
        micro = [next(batches).to(t.device, non_blocking=True).normalized() for _ in range(d.accumulation_steps)]
        position += d.global_batch
        t.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        finite: dict[str, torch.Tensor] = {}
        for batch in micro:
            with autocast:
                out = t.model(batch, teacher_temp=sched.teacher_temp)
            for name, value in out.terms().items():  # device flags: read once, below
                finite[name] = torch.isfinite(value).all() & finite.get(name, True)
            (out.loss / d.accumulation_steps).backward()
            for name, value in out.scalars().items():
                sums[name] = sums.get(name, 0.0) + value.detach() / d.accumulation_steps
        grad_norm = clip_grad_norm(student_params, t.clip_grad)
        if bad_terms := _agreed_non_finite({**finite, "grad_norm": torch.isfinite(grad_norm)}):
            # Never applied: the gradients are dropped by the next zero_grad, optimizer and teacher are untouched.
            bad, refused = bad + 1, refused + 1
            log.warning("step %d refused: non-finite %s (%d in a row)", step, ", ".join(bad_terms), bad)
            metrics.refused(step, bad_terms)
            if bad >= t.max_bad_steps:
                t.checkpoints.wait()  # a good checkpoint still being written is completed, not lost
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
        schedule = {"lr": sched.lr, "wd": sched.weight_decay, "momentum": sched.momentum}
        metrics.add(step, {**sums, "grad_norm": grad_norm}, {**schedule, "teacher_temp": sched.teacher_temp})
        bar.update(1)
        checkpoint = step % t.checkpoint_every == 0 or step == d.max_steps
        if step % t.log_every == 0 or step == 1 or checkpoint:
            # The metrics of every step up to a checkpoint are on disk before the checkpoint exists.
            if rows := metrics.flush():
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", ent=f"{rows[-1]['teacher_entropy']:.2f}")
        if checkpoint:
            last_ckpt = t.checkpoints.save(
                model=t.model,
                optimizer=t.optimizer,
                state=TrainerState(
                    step=step, data_position=position, world_size=d.world_size, global_batch=d.global_batch
                ),
            )
    t.checkpoints.wait()
    bar.close()
    metrics.close()
    if main:
        try_plot_run(t.run_dir, log_k=log_k)  # RUN/curves.png; a plotting failure is only a warning
    return FitSummary(
        steps=step,
        last_checkpoint=last_ckpt or t.checkpoints.latest(),
        refused_steps=refused,
        seconds=time.perf_counter() - start,
    )
