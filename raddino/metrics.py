"""``metrics.jsonl``: one row per step, buffered on the device and written at the logging interval.

The training step leaves its loss terms and monitors as device tensors (:meth:`MetricsLog.add` never reads them),
so the step runs without a host synchronisation for logging. :meth:`MetricsLog.flush` -- every
``train.log_every`` steps, before each checkpoint and at the end -- stacks the buffered rows, averages them over
ranks with one all-reduce (each rank holds an equal share of the global batch, so this is what one process would
log for the whole batch, up to the per-rank KoLeo and monitors), reads them with one host sync, feeds the collapse
monitor and, on rank 0, writes them. Every rank calls ``flush`` at the same steps (it is a collective).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from raddino.io import atomic_write_text
from raddino.monitors import CollapseMonitor
from raddino.tensorboard_log import ScalarLog

log = logging.getLogger(__name__)


def trim_metrics(path: Path, *, last_step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``last_step`` (the step a run resumes from) and drop the rest: the
    steps an interrupted attempt logged after its last checkpoint are trained again, and a torn last line (a kill
    mid-write) is not JSON. Rewritten via a temporary file, so a crash here loses nothing. Returns rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) > last_step or ("refused" in row and row.get("step", 0) >= last_step):
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        log.info("metrics.jsonl: dropped %d rows logged after step %d by an interrupted attempt", dropped, last_step)
    return dropped


class MetricsLog:
    """The metrics of one run (see the module docstring). ``main``: this rank writes the file (rank 0)."""

    def __init__(
        self,
        path: Path,
        *,
        main: bool,
        resume_step: int,
        log_k: float,
        monitor: CollapseMonitor,
        global_batch: int,
        board: ScalarLog | None = None,
    ) -> None:
        """``board``: TensorBoard scalars written alongside (rank 0, ``train.tensorboard=true``)."""
        self.main, self.log_k, self.monitor, self.global_batch = main, log_k, monitor, global_batch
        self.board = board
        if main:
            trim_metrics(path, last_step=resume_step)
        self._file = path.open("a") if main else None
        self._pending: list[tuple[int, dict[str, Tensor], dict[str, float]]] = []
        self._since = time.perf_counter()

    def add(self, step: int, values: dict[str, Tensor], schedule: dict[str, float]) -> None:
        """Buffer step ``step``'s scalar tensors (not read here: no host sync) and its scheduled values."""
        self._pending.append((step, {k: v.detach() for k, v in values.items()}, schedule))

    def refused(self, step: int, terms: list[str]) -> None:
        self.flush()  # keep the file in step order
        if self.main:
            self._file.write(json.dumps({"step": step, "refused": terms}) + "\n")
            self._file.flush()

    def flush(self) -> list[dict]:
        """Average the buffered rows over ranks, raise collapse flags, write them (rank 0); returns the rows."""
        if not self._pending:
            return []
        names = list(self._pending[0][1])
        stacked = torch.stack(
            [torch.stack([vals[n].float().reshape(()) for n in names]) for _, vals, _ in self._pending]
        )
        if dist.is_initialized():
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        table = stacked.tolist()  # the one host sync of a logging interval
        now = time.perf_counter()
        img_per_s = self.global_batch * len(self._pending) / max(now - self._since, 1e-9)
        rows = []
        for (step, _, schedule), values in zip(self._pending, table, strict=True):
            row = {"step": step, **dict(zip(names, values, strict=True)), **schedule}
            row["dino_rel"] = row["dino"] / self.log_k  # 1 = the DINO cross-entropy of a uniform student
            row["img_per_s"] = img_per_s  # averaged over the interval: per-step host timing would need a sync
            # rank 0 alone watches (and warns): the values are the same on every rank
            flags = (
                self.monitor.update(
                    step=step, **{k: row[k] for k in ("student_entropy", "teacher_entropy", "student_std")}
                )
                if self.main
                else []
            )
            if flags:
                row["collapse"] = [flag.name for flag in flags]
            for flag in (f for f in flags if f.first):
                log.warning("step %d: collapse monitor raised %s: %s", step, flag.name, flag.message)
            rows.append(row)
        if self.main:
            self._file.write("".join(json.dumps(row) + "\n" for row in rows))
            self._file.flush()
            for row in rows if self.board is not None else []:
                self.board.write(row)
            log.debug("step %d: %s", rows[-1]["step"], rows[-1])
        self._pending.clear()
        self._since = now
        return rows

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        if self.board is not None:
            self.board.close()
