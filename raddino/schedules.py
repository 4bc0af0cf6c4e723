"""Training schedules as pure functions of the step (DINOv2's schedules, without precomputed arrays)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(
    step: int, *, start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warmup from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine from ``start`` to ``end``.

    Reaches ``end`` at ``total_steps`` and stays there afterwards.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, *, peak: float, total_steps: int, warmup_steps: int) -> float:
    """Fine-tuning's lr: linear warmup that counts the current step (step 0 at ``peak / warmup_steps``, the last
    warmup step at ``peak``), then :func:`cosine` from ``peak`` towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step, start=peak, end=0.0, total_steps=total_steps, warmup_steps=warmup_steps)


def linear_warmup(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end`` (teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float  # 0 while the prototypes are frozen


@dataclass(frozen=True)
class Schedules:
    """All schedules of a run; ``at(step)`` evaluates them."""

    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float
    teacher_temp_start: float
    teacher_temp_end: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    total_steps: int

    def at(self, step: int) -> ScheduleValues:
        lr = cosine(step, start=self.lr, end=self.min_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps)
        return ScheduleValues(
            lr=lr,
            weight_decay=cosine(step, start=self.weight_decay, end=self.weight_decay_end, total_steps=self.total_steps),
            momentum=cosine(step, start=self.momentum_start, end=self.momentum_end, total_steps=self.total_steps),
            teacher_temp=linear_warmup(
                step,
                start=self.teacher_temp_start,
                end=self.teacher_temp_end,
                warmup_steps=self.teacher_temp_warmup_steps,
            ),
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
        )
