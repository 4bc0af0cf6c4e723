"""Labels and splits from table rows, shared by ``kind: csv`` (manifest rows) and ``kind: shards`` (the JSON record of
each sample): :class:`TableSpec` holds the fields both kinds have, the functions here read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import SPLITS, SpecBase, carve_validation, check_val_fraction, random_splits
from raddino.eval.metrics import Task

log = logging.getLogger(__name__)

_DEFAULT_SPLIT_VALUES = {"train": ["train", "training"], "val": ["val", "valid", "validation"], "test": ["test"]}


@dataclass(frozen=True)
class TableSpec(SpecBase):
    """The fields of row-based kinds (``csv`` and ``shards``; every field documented in ``docs/EVAL.md``).

    Attributes:
        label_columns: columns / JSON fields holding labels (several -> multilabel; several with
            ``task: multiclass`` -> one-hot class columns, class ``k`` = the ``k``-th column).
        classes: (common field) class names, in index order (single-column string labels, or the vocabulary of
            ``label_delimiter``).
        label_delimiter: one column listing several findings, e.g. NIH's ``Finding Labels`` = ``A|B``.
        value_map: raw label value -> number, e.g. CheXpert ``{"-1.0": 1, "": 0}`` (uncertain -> positive).
        split_column / split_values: a column naming each row's split, and which values mean which split.
        split_lists: per-split text files listing image references (NIH ``train_val_list.txt`` / ``test_list.txt``;
            CSV path-column values, or shard keys).
        group_column: patient / study column; random splits keep each group within one split.
        val_fraction: share of train carved out as validation when the data has no validation split.
        split_fractions: train / val / test shares when the data has no splits at all.
        seed: seed of those random splits.
    """

    label_columns: tuple[str, ...] = ("label",)
    label_delimiter: str | None = None
    value_map: dict[str, float] | None = None
    split_column: str | None = None
    split_values: dict[str, tuple[str, ...]] | None = None
    split_lists: dict[str, str] | None = None
    group_column: str | None = None
    val_fraction: float = 0.1
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_task()
        check_val_fraction(self.name, self.val_fraction)
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise RaddinoError(f"dataset {self.name}: split_fractions needs 3 positive values (train, val, test)")
        self.check_path()
        check_split_keys(self.name, self.split_lists, what="split_lists")


def check_split_keys(name: str, mapping: dict[str, str] | None, *, what: str) -> None:
    unknown = set(mapping or {}) - set(SPLITS)
    if unknown:
        raise RaddinoError(f"dataset {name}: {what} keys must be train/val/test, got {sorted(unknown)}")


@dataclass
class Rows:
    """Rows (column -> string value) before labels and splits are decided. The image reference of each row travels
    in the row itself under the key ``"\x00path"`` (no CSV column can have that name), so it survives merging."""

    rows: list[dict[str, str]]
    source: str  # for error messages


def parse_value(raw: str, *, spec: TableSpec, column: str, source: str) -> float:
    value = (raw or "").strip()
    if spec.value_map is not None and value in spec.value_map:
        return float(spec.value_map[value])
    try:
        return float(value)
    except ValueError:
        hint = "; map it with value_map" if value == "" else ""
        raise RaddinoError(
            f"dataset {spec.name}: {source}: column '{column}' has non-numeric value {value!r}{hint}"
        ) from None


def table_labels(spec: TableSpec, data: Rows) -> tuple[np.ndarray, Task, list[str]]:
    """Label array, task and label / class names from the rows."""
    columns = list(spec.label_columns)
    if data.rows:
        missing = [c for c in columns if c not in data.rows[0]]
        if missing:
            available = ", ".join(sorted(data.rows[0]))
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: label column(s) not found: {', '.join(missing)} "
                f"(columns: {available})"
            )
    if spec.label_delimiter is not None:
        if len(columns) != 1 or not spec.classes:
            raise RaddinoError(f"dataset {spec.name}: label_delimiter needs one label column and the 'classes' list")
        index = {name: i for i, name in enumerate(spec.classes)}
        labels = np.zeros((len(data.rows), len(index)), dtype=np.int64)
        for r, row in enumerate(data.rows):
            for item in (row[columns[0]] or "").split(spec.label_delimiter):
                item = item.strip()
                if item in index:
                    labels[r, index[item]] = 1
        return labels, "multilabel", list(spec.classes)
    if len(columns) > 1 or spec.task == "multilabel":
        labels = np.array(
            [[parse_value(row[c], spec=spec, column=c, source=data.source) for c in columns] for row in data.rows]
        ).reshape(len(data.rows), len(columns))
        bad = ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: multilabel column '{columns[c]}' has value {labels[r, c]:g} "
                "(expected 0 or 1; map others with value_map)"
            )
        if spec.task != "multiclass":
            return labels.astype(np.int64), "multilabel", columns
        # one-hot columns, one per class (ISIC 2018 / 2019 ground truth: MEL, NV, BCC, ... = 0.0 / 1.0)
        hot = labels.sum(axis=1)
        if (hot != 1).any():
            r = int(np.flatnonzero(hot != 1)[0])
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: row {r + 1} has {int(hot[r])} of the one-hot class columns "
                f"{', '.join(columns)} set (a multiclass dataset needs exactly one per row)"
            )
        return labels.argmax(axis=1).astype(np.int64), "multiclass", columns
    column = columns[0]
    if spec.task == "regression":
        values = [parse_value(row[column], spec=spec, column=column, source=data.source) for row in data.rows]
        return np.asarray(values, dtype=np.float64), "regression", [column]
    raw = [(row[column] or "").strip() for row in data.rows]
    if spec.classes and not spec.value_map:
        index = {name: i for i, name in enumerate(spec.classes)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: column '{column}' has values not in classes: {unknown[:5]}"
            )
        labels = np.asarray([index[v] for v in raw], dtype=np.int64)
        names = list(spec.classes)
    else:
        numeric = [parse_value(v, spec=spec, column=column, source=data.source) for v in raw]
        if any(v != int(v) or v < 0 for v in numeric):
            raise RaddinoError(
                f"dataset {spec.name}: column '{column}' holds non-integer or negative values; set task: regression "
                "or list 'classes'"
            )
        labels = np.asarray(numeric, dtype=np.int64)
        names = [str(i) for i in range(int(labels.max(initial=1)) + 1)]
        if spec.classes:  # value_map gave the indices (several raw values may share a class: AP, AP Supine -> AP)
            if labels.max(initial=0) >= len(spec.classes):
                raise RaddinoError(
                    f"dataset {spec.name}: value_map gives class index {labels.max()} but 'classes' has "
                    f"{len(spec.classes)} names"
                )
            names = list(spec.classes)
    task = spec.task or ("binary" if len(names) <= 2 else "multiclass")
    return labels, task, names


def preset_splits(spec: TableSpec, data: Rows, *, preset: list[str | None], data_root: Path | None) -> list[str | None]:
    """Split names from ``split_column`` or ``split_lists`` (on top of ``preset``, e.g. from CSV ``split_files``)."""
    if spec.split_column is not None:
        if data.rows and spec.split_column not in data.rows[0]:
            raise RaddinoError(f"dataset {spec.name}: {data.source}: split column '{spec.split_column}' not found")
        values = spec.split_values or {s: tuple(v) for s, v in _DEFAULT_SPLIT_VALUES.items()}
        lookup = {str(v): s for s, vs in values.items() for v in ([vs] if isinstance(vs, str) else vs)}
        preset = [lookup.get(row[spec.split_column].strip()) for row in data.rows]
        if not any(preset):
            raise RaddinoError(
                f"dataset {spec.name}: split column '{spec.split_column}' has none of the values {sorted(lookup)}"
            )
    if spec.split_lists:
        names: dict[str, str] = {}
        for split, file in spec.split_lists.items():
            path = spec.resolve(file, data_root)
            if not path.is_file():
                raise spec.not_found(path, f"{split} split list")
            for line in path.read_text().splitlines():
                if line.strip():
                    names[line.strip()] = split
        preset = [names.get(row["\x00path"]) or names.get(Path(row["\x00path"]).name) for row in data.rows]
    return preset


def split_assignment(
    spec: TableSpec, data: Rows, *, labels: np.ndarray, task: Task, preset: list[str | None]
) -> dict[str, np.ndarray]:
    """Row indices of each split: from ``preset`` names where given, random (seeded) otherwise."""
    groups = None
    if spec.group_column is not None:
        if data.rows and spec.group_column not in data.rows[0]:
            raise RaddinoError(f"dataset {spec.name}: {data.source}: group_column '{spec.group_column}' not found")
        groups = np.asarray([row[spec.group_column] for row in data.rows])
    named = {s: np.asarray([i for i, p in enumerate(preset) if p == s], dtype=np.int64) for s in SPLITS}
    if any(p is None for p in preset) and any(len(v) for v in named.values()):
        unassigned = sum(p is None for p in preset)
        log.warning("dataset %s: %d rows belong to no split and are ignored", spec.name, unassigned)
    if all(len(v) == 0 for v in named.values()):
        return random_splits(labels, fractions=spec.split_fractions, seed=spec.seed, groups=groups, task=task)
    if len(named["train"]) == 0 or len(named["test"]) == 0:
        raise RaddinoError(f"dataset {spec.name}: {data.source}: the split assignment gives no train or no test rows")
    if len(named["val"]) == 0:
        sub_groups = None if groups is None else groups[named["train"]]
        train_idx, val_idx = carve_validation(
            labels[named["train"]], fraction=spec.val_fraction, seed=spec.seed, groups=sub_groups, task=task
        )
        named["val"], named["train"] = named["train"][val_idx], named["train"][train_idx]
        log.info("dataset %s: %d train rows carved out as validation", spec.name, len(val_idx))
    return named
