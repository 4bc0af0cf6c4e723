"""Collapse and bootstrap monitors: turn each step's scalar monitors into named warnings.

A DINO run can fail without any loss going non-finite: the student predicts the uniform distribution (the DINO
cross-entropy is then exactly log K whatever the targets, so the CLS term teaches nothing), the teacher's targets
are uniform or one-hot, or every image gets the same representation. :class:`CollapseMonitor` is fed the
monitors of :class:`raddino.ssl.SSLOutput` once per step and reports the conditions that have held for a whole
window of steps after a grace period. It is pure bookkeeping on Python floats (no tensors, no config, no logging).

Thresholds (nats for entropies; K prototypes, D the backbone width):

- ``student_uniform``: student entropy > ``(1 - uniform_margin) * log K`` (default margin 1 %, 0.083 nats at
  K = 4096). A freshly initialised head sits ~0.3-0.4 nats below log K (its logits are cosines / 0.1 with a
  spread of ~1/sqrt(bottleneck)); with the prototypes frozen it cannot get much closer, so a student inside the
  margin after the freeze has learnt to predict uniform.
- ``teacher_uniform``: teacher entropy > ``(1 - uniform_margin) * log K``: the targets carry no information.
- ``teacher_collapsed``: teacher entropy < ``collapsed_entropy`` (0.1 nats: > ~98 % of the mass on one prototype).
  With EMA centering this is DINO's one-prototype collapse; Sinkhorn-Knopp keeps the prototypes balanced, so there
  it means hard one-hot targets.
- ``representation_collapse``: student feature std < ``std_floor / sqrt(D)`` (default 0.1, i.e. a tenth of the
  per-dimension std of random unit vectors): all images get (almost) the same CLS feature.

A flag is raised at a step once its condition has held for ``window`` consecutive steps, all after
``grace_steps``; it stays raised while the condition holds and drops as soon as it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLAGS: dict[str, str] = {
    "student_uniform": (
        "the student predicts (almost) the uniform distribution over the prototypes, so the DINO loss is log K and "
        "the CLS term does not bootstrap. Sharpen or stabilise the targets: a lower teacher temperature "
        "(teacher.temp_start / teacher.temp_end, e.g. 0.04), weaker photometric jitter (crops.brightness / "
        "crops.contrast), a faster-following teacher early on (lower teacher.momentum_start), or a longer freeze of "
        "the prototype layer (optim.freeze_last_layer_epochs)"
    ),
    "teacher_uniform": (
        "the teacher's CLS targets are (almost) uniform and carry no information. Lower the teacher temperature "
        "(teacher.temp_start / teacher.temp_end); with model.layerscale=1e-5 and few steps every block is still "
        "an identity (try layerscale 1); check that the teacher momentum lets it follow the student "
        "(teacher.momentum_start)"
    ),
    "teacher_collapsed": (
        "the teacher's CLS targets are (almost) one-hot: with loss.centering=centering every image maps to one "
        "prototype. Raise the teacher temperature (teacher.temp_end), use loss.centering=sinkhorn_knopp, raise "
        "teacher.momentum_start, or lower optim.base_lr"
    ),
    "representation_collapse": (
        "the student's CLS features are (almost) the same for every image. Check loss.koleo_weight > 0 and "
        "model.layerscale (1e-5 keeps every block an identity for hundreds of steps), lower optim.base_lr, or "
        "freeze the prototype layer longer (optim.freeze_last_layer_epochs)"
    ),
}


@dataclass(frozen=True)
class Flag:
    """A raised flag: ``name`` (a key of :data:`FLAGS`), ``first`` (raised for the first time in this run) and
    ``message`` (what it means and which settings to turn)."""

    name: str
    first: bool
    message: str


class CollapseMonitor:
    """Per-step collapse flags of a DINO run; see the module docstring for the thresholds.

    Its state (the run lengths of each condition) is not checkpointed: after a resume the window starts again.
    """

    def __init__(
        self,
        *,
        log_k: float,
        embed_dim: int,
        grace_steps: int,
        window: int = 20,
        uniform_margin: float = 0.01,
        collapsed_entropy: float = 0.1,
        std_floor: float = 0.1,
    ) -> None:
        """Args:
        log_k: log of the number of DINO prototypes K (nats): the entropy of the uniform distribution.
        embed_dim: backbone width D (random unit vectors have a per-dimension std of 1/sqrt(D)).
        grace_steps: steps at the start that never count (the prototype layer is frozen, targets are forming).
        window: consecutive steps a condition must hold before its flag is raised.
        uniform_margin: relative distance from log K inside which an entropy counts as uniform.
        collapsed_entropy: teacher entropy (nats) below which the targets count as one-hot.
        std_floor: student feature std, in units of 1/sqrt(D), below which the representation counts as collapsed.
        """
        if log_k <= 0 or embed_dim < 1 or grace_steps < 0 or window < 1:
            raise ValueError(
                f"need log_k > 0, embed_dim >= 1, grace_steps >= 0, window >= 1; got {log_k}, {embed_dim}, "
                f"{grace_steps}, {window}"
            )
        self.grace_steps = grace_steps
        self.window = window
        self.uniform_entropy = (1.0 - uniform_margin) * log_k
        self.collapsed_entropy = collapsed_entropy
        self.std_floor = std_floor / math.sqrt(embed_dim)
        self._run = dict.fromkeys(FLAGS, 0)
        self._seen: set[str] = set()

    def conditions(self, *, student_entropy: float, teacher_entropy: float, student_std: float) -> dict[str, bool]:
        """Whether each flag's condition holds for one step's values (no window, no grace period)."""
        return {
            "student_uniform": student_entropy > self.uniform_entropy,
            "teacher_uniform": teacher_entropy > self.uniform_entropy,
            "teacher_collapsed": teacher_entropy < self.collapsed_entropy,
            "representation_collapse": student_std < self.std_floor,
        }

    def update(self, *, step: int, student_entropy: float, teacher_entropy: float, student_std: float) -> list[Flag]:
        """Feed the monitors of ``step`` (1-based, as in ``metrics.jsonl``); returns the flags raised at this step,
        in the order of :data:`FLAGS`. A non-finite value counts as the condition not holding (the non-finite
        guard reports those)."""
        held = self.conditions(
            student_entropy=student_entropy, teacher_entropy=teacher_entropy, student_std=student_std
        )
        raised = []
        for name, holds in held.items():
            self._run[name] = self._run[name] + 1 if holds and step > self.grace_steps else 0
            if self._run[name] >= self.window:
                raised.append(Flag(name=name, first=name not in self._seen, message=FLAGS[name]))
                self._seen.add(name)
        return raised
