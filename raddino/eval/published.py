"""Published reference rows: the numbers a paper reports, carried by a suite and printed beside the measured rows.

A suite's ``published:`` list holds one entry per (paper model, dataset, protocol, metric) cell of a paper's table:

.. code-block:: yaml

    published:
      - paper: Huix et al. 2024 (WACV)
        model: DINOv2 ViT-B/14          # the paper's name for it
        backbone: dinov2_vitb14         # the suite backbone label whose measured row it sits beside
        dataset: aptos2019
        protocol: finetune_frozen
        metric: accuracy
        value: null                     # null: not found verbatim in the paper (then 'note' says so)
        table: "Table 2"
        page: "5"
        note: "..."

Values are fractions (a paper's 85.3 % is 0.853). A value needs its table and page; an empty cell needs a note saying
why it is empty. Nothing here is ever filled in from elsewhere: a cell without a verbatim source stays empty.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raddino.errors import RaddinoError
from raddino.eval.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Bounded metrics: a value above 1 is a percentage someone forgot to convert.
_UNIT_INTERVAL = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")


@dataclass(frozen=True)
class PublishedRow:
    """One published number (see the module docstring for the fields)."""

    paper: str
    model: str
    backbone: str
    dataset: str
    protocol: str
    metric: str
    value: float | None = None
    table: str | None = None
    page: str | None = None
    features: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        where = f"published row {self.paper} / {self.model} / {self.dataset}"
        if self.metric not in METRICS:
            raise RaddinoError(f"{where}: unknown metric {self.metric!r}; expected {', '.join(METRICS)}")
        if self.value is None:
            if not self.note:
                raise RaddinoError(f"{where}: value is empty; add a 'note' saying why (e.g. not in the paper)")
            return
        if not self.table or not self.page:
            raise RaddinoError(f"{where}: a published value needs its 'table' and 'page'")
        if not math.isfinite(self.value) or (self.metric in _UNIT_INTERVAL and not 0.0 <= self.value <= 1.0):
            raise RaddinoError(
                f"{where}: {self.metric} must be a fraction in [0, 1], got {self.value} (85.3 % -> 0.853)"
            )

    @property
    def source(self) -> str:
        """``paper, Table N, p. P`` (or the paper alone for an empty cell)."""
        parts = [self.paper] + [p for p in (self.table, f"p. {self.page}" if self.page else None) if p]
        return ", ".join(parts)


def published_from_dict(entry: Any, where: str) -> PublishedRow:
    """A :class:`PublishedRow` from one ``published:`` entry; unknown keys are errors naming them."""
    if not isinstance(entry, dict):
        raise RaddinoError(f"{where}: each published row is a mapping, got {entry!r}")
    known = {f.name for f in dataclasses.fields(PublishedRow)}
    unknown = sorted(set(entry) - known)
    if unknown:
        allowed = ", ".join(sorted(known))
        raise RaddinoError(f"{where} published row: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
    required = [f.name for f in dataclasses.fields(PublishedRow) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in entry]
    if missing:
        raise RaddinoError(f"{where} published row: missing key(s) {', '.join(missing)}")
    values = dict(entry)
    for key in ("table", "page"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    if values.get("value") is not None:
        values["value"] = float(values["value"])
    return PublishedRow(**values)


@dataclass(frozen=True)
class Comparison:
    """A published row with the measured value it is compared to (NaN when nothing was measured)."""

    row: PublishedRow
    measured: float

    @property
    def difference(self) -> float:
        """measured − published (NaN when either is missing)."""
        if self.row.value is None:
            return math.nan
        return self.measured - self.row.value


def compare(
    rows: Sequence[PublishedRow], measured: dict[tuple[str, str, str, str], dict[str, float]]
) -> list[Comparison]:
    """Pair each published row with the measured value of its metric.

    Args:
        rows: the published rows.
        measured: ``(backbone, dataset, protocol, features) -> {metric: value}`` of the runs on 100 % of the labels.
            A row without ``features`` takes the first features of its (backbone, dataset, protocol) in order.
    """
    out = []
    for row in rows:
        value = math.nan
        for (backbone, dataset, protocol, features), metrics in measured.items():
            if (backbone, dataset, protocol) == (row.backbone, row.dataset, row.protocol) and (
                row.features is None or row.features == features
            ):
                value = metrics.get(row.metric, math.nan)
                break
        out.append(Comparison(row=row, measured=value))
    return out
