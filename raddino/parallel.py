"""Data parallelism, applied from outside the model: process group, device, activation checkpointing, compile, FSDP2.

One code path for 1 process, 1 GPU, 8 GPUs and N nodes:

- :func:`init_distributed` reads the launch environment (``torchrun``: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
  SLURM: ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``), starts the process group (``nccl`` on CUDA,
  ``gloo`` on CPU) with a collective timeout, and picks the device of the local rank. A single process without
  those variables starts no process group at all.
- :func:`parallelize` applies, in torchtitan's order, activation checkpointing -> ``torch.compile`` per block ->
  FSDP2 ``fully_shard`` per transformer block, then per head and backbone root, for the student *and* the teacher.
  The teacher is sharded like the student, so the EMA update (:meth:`raddino.ssl.SSLMetaArch.update_teacher`)
  runs shard-locally on matching DTensors with no gather.

The SSL meta-architecture calls ``backbone.forward_features`` / ``forward_features_packed`` (not ``forward``), so
those methods are registered with FSDP (:func:`torch.distributed.fsdp.register_fsdp_forward_method`) to all-gather
the backbone root's own parameters (patch embedding, tokens, position embedding, final norm) around them.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelEnv:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}) on {socket.gethostname()} [{self.device}]"


def launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, else SLURM's, else ``(0, 1, 0)``."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RaddinoError("train.device=cuda but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise RaddinoError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} visible GPUs "
                "(start at most that many processes per node)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(*, device: str, backend: str = "auto", timeout_s: float = 600.0) -> ParallelEnv:
    """Start (or join) the process group of this launch and pick this process's device.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` (``cuda:LOCAL_RANK`` per process).
        backend: ``auto`` (``nccl`` on CUDA, ``gloo`` on CPU) | ``nccl`` | ``gloo``.
        timeout_s: collective timeout; a rank that hangs (a dead peer, a stuck filesystem) fails after this long
            instead of blocking the job forever.

    A process group that already exists (a test harness, a launcher) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
        return ParallelEnv(rank=rank, world_size=world, local_rank=local, device=_device(device, local))
    rank, world, local = launch_env()
    dev = _device(device, local)
    if world > 1:
        if not dist.is_available():
            raise RaddinoError("this torch build has no torch.distributed; start a single process")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RaddinoError(
                f"WORLD_SIZE={world} but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun "
                "(`torchrun --nproc_per_node N -m raddino.cli pretrain ...`) or `raddino launch`"
            )
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("process group: %s over %s, timeout %.0f s", backend, world, timeout_s)
    return ParallelEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelPlan:
    """What :func:`parallelize` applies (from ``parallel.*``; see :mod:`raddino.config`)."""

    fsdp: bool
    ac_every: int = 0  # activation checkpointing: 0 none, 1 every block (full), k every k-th block
    compile: bool = False
    param_dtype: torch.dtype | None = None  # FSDP2 mixed precision: compute dtype of gathered params (bf16)
    reduce_dtype: torch.dtype | None = torch.float32  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # the student's units (the teacher's always reshard: it has no backward)


def _shard_tower(tower: nn.ModuleDict, *, mesh: DeviceMesh, plan: ParallelPlan, reshard_after_forward: bool) -> None:
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    kwargs = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    backbone = tower["backbone"]
    for block in backbone.blocks:
        fully_shard(block, **kwargs)
    fully_shard(backbone, **kwargs)
    register_fsdp_forward_method(backbone, "forward_features")
    register_fsdp_forward_method(backbone, "forward_features_packed")
    for name, head in tower.items():
        if name != "backbone":
            fully_shard(head, **kwargs)


def parallelize(model: nn.Module, *, plan: ParallelPlan, env: ParallelEnv) -> nn.Module:
    """Apply AC -> compile -> FSDP2 to an :class:`~raddino.ssl.SSLMetaArch` in place (already on ``env.device``).

    The student and the teacher are sharded alike (same units, same mesh), so their parameter lists stay aligned
    and the EMA is elementwise on local shards. The meta-architecture root holds only the centering buffers and is
    not sharded (each rank keeps the same, all-reduced centers). Returns the model.
    """
    for tower in (model.student, model.teacher):
        backbone = tower["backbone"]
        if plan.ac_every:
            backbone.set_grad_checkpointing(every=plan.ac_every)
        if plan.compile:
            for block in backbone.blocks:
                block.compile()
    if plan.fsdp:
        # The backbone returns views of its normed tokens (CLS, patches); nothing here modifies them in place, which
        # is the only case FSDP2's warning about view outputs is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if not dist.is_initialized():  # FSDP2 on one process (parallel.fsdp=true) still needs a process group
            backend = "nccl" if env.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp",))
        _shard_tower(model.student, mesh=mesh, plan=plan, reshard_after_forward=plan.reshard_after_forward)
        # The teacher always reshards after its forward: it never runs backward, so gathered weights kept for a
        # backward (ZeRO-2) would only cost memory, and they would stay gathered until the next step, where the EMA
        # would meet full tensors beside the student's shards.
        _shard_tower(model.teacher, mesh=mesh, plan=plan, reshard_after_forward=True)
        log.info(
            "FSDP2 over %d rank(s): %d blocks + root + heads per tower, params %s, reduce %s",
            env.world_size,
            len(model.student["backbone"].blocks),
            plan.param_dtype or "fp32",
            plan.reduce_dtype or "param dtype",
        )
    return model


def sharded_modules(module: nn.Module) -> list[FSDPModule]:
    """The FSDP2 units inside ``module`` (empty when it is not sharded)."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]
