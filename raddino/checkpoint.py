"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, keep-last-k, resumable on any world size.

Layout of ``RUN/checkpoints/step_0000100/``: DCP shards of ``{"model", "optimizer"}`` (the model being the whole
student/teacher meta-architecture, so centers and the teacher are included) and ``state.json`` (step, data position,
world size). A checkpoint is written into ``.tmp-step_…`` and renamed when every rank has finished, so a directory
named ``step_…`` is always complete.

RNG state is not stored as opaque generator blobs: every random draw in training is a function of (seed, step,
rank) -- augmentations and masks of the sample position, stochastic depth of the default generator that the trainer
reseeds each step (:func:`raddino.train.step_seed`) -- so ``step`` and ``data_position`` *are* the RNG state. That is
what lets a run resume exactly, including on a different number of GPUs for the data stream.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class TrainerState:
    """Everything besides tensors that a resumed run needs."""

    step: int  # optimizer steps completed
    data_position: int  # global sample position the data stream continues from
    world_size: int
    global_batch: int | None = None  # images per step when saved (None: checkpoints from before it was recorded)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled" warning: single-process saves and loads are intended here and
    DCP would otherwise warn on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class _PendingSave:
    """An asynchronous save in flight: DCP writes ``tmp`` in a background thread; finalised by ``wait``."""

    future: Future
    tmp: Path
    final: Path
    state: TrainerState


class CheckpointManager:
    """Saves, lists and loads the checkpoints of one run directory.

    ``async_save``: :meth:`save` stages the state to CPU memory, returns, and lets DCP write it in a background
    thread while training goes on; the checkpoint becomes complete (``state.json``, rename, pruning) at the next
    :meth:`save` or :meth:`wait`. Until then the previous complete checkpoint stays the newest one, so a crash
    mid-write loses nothing that a synchronous save would have kept. The background writer synchronises ranks on a
    gloo group of its own, never on the training's process group, so its collectives cannot interleave with
    training collectives.
    """

    def __init__(self, directory: str | Path, *, keep_last: int, async_save: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: _PendingSave | None = None
        self._writer_group: dist.ProcessGroup | None = None

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first: ``step_…`` directories (renamed only once every rank's shards are
        written) that hold DCP's ``.metadata`` and ``state.json`` (written last)."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file() and (p / ".metadata").is_file()
        ]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState) -> Path:
        """Write the checkpoint of ``state.step``; returns its final path (complete on return unless
        ``async_save``, then complete after the next :meth:`save` / :meth:`wait`)."""
        self.wait()
        final = self.directory / f"step_{state.step:07d}"
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}"
        if _rank() == 0:
            if tmp.exists():  # left over from a run killed while saving
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with single_process_dcp():
            if self.async_save:
                future = dcp.async_save(
                    {"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp, process_group=self._group()
                )
                self._pending = _PendingSave(future=future, tmp=tmp, final=final, state=state)
                return final
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        self._finalize(tmp=tmp, final=final, state=state)
        return final

    def wait(self) -> Path | None:
        """Finish an asynchronous save in flight (no-op without one); returns the checkpoint it completed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending.future.result()  # re-raises a write error of the background thread here
        self._finalize(tmp=pending.tmp, final=pending.final, state=pending.state)
        return pending.final

    def _group(self) -> dist.ProcessGroup | None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._writer_group is None:
            self._writer_group = dist.new_group(backend="gloo")
        return self._writer_group

    def _finalize(self, *, tmp: Path, final: Path, state: TrainerState) -> None:
        _barrier()  # every rank's shards are written
        if _rank() == 0:
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
            if final.exists():  # same step saved again (e.g. the final step after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", final)
        _barrier()

    def load(self, path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
        """Load model + optimizer in place, resharding to the current world size."""
        path = Path(path)
        state_file = path / "state.json"
        if not state_file.is_file():
            raise RaddinoError(f"not a complete raddino checkpoint (no state.json): {path}")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        to_load = {"model": model_sd, "optimizer": optim_sd}
        try:
            with single_process_dcp():
                dcp.load(to_load, checkpoint_id=path)
        except Exception as err:  # DCP reports missing/mismatched keys with long nested errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RaddinoError(f"cannot load checkpoint {path}: {first}") from err
        set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optimizer"])
        saved = TrainerState(**json.loads(state_file.read_text()))
        log.info("resumed from %s (step %d)", path, saved.step)
        return saved

    def resolve_resume(self, resume: str) -> Path | None:
        """``auto`` -> newest complete checkpoint or None; ``none`` -> None; otherwise a checkpoint path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise RaddinoError(f"train.resume={resume}: not a complete raddino checkpoint directory")
        return path
