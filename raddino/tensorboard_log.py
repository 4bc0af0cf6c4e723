"""TensorBoard event files beside ``metrics.jsonl`` (``train.tensorboard=true``; optional: ``pip install tensorboard``).

Each metrics row's numeric scalars become TensorBoard scalars of the same name at the row's step (booleans, lists
such as the collapse flags, and refused steps are not scalars and are skipped). Only rank 0 writes, as for
``metrics.jsonl``. On resume, events from the resumed step on are purged, as ``metrics.jsonl`` is trimmed.
"""

from __future__ import annotations

from pathlib import Path

from raddino.errors import RaddinoError

INSTALL_HINT = "pip install tensorboard (or pip install 'raddino[tensorboard]')"


def require_tensorboard() -> None:
    """Raise a :class:`RaddinoError` naming the install command when TensorBoard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as err:
        raise RaddinoError(
            f"train.tensorboard=true needs TensorBoard, which is not installed ({err}): {INSTALL_HINT}"
        ) from None


class ScalarLog:
    """A ``SummaryWriter`` on ``log_dir`` that takes whole metrics rows."""

    def __init__(self, log_dir: Path, *, first_step: int) -> None:
        """``first_step``: the first step this attempt logs; older events of a resumed run at or after it are
        dropped (TensorBoard's ``purge_step``)."""
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step if first_step > 1 else None)

    def write(self, row: dict) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
