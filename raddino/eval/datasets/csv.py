"""``kind: csv``: a manifest (or per-split manifests) with an image path and label column(s) per row (NIH
ChestX-ray14, CheXpert, RSNA Pneumonia, VinDr-CXR)."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import EvalDataset, EvalSplit, FileImages
from raddino.eval.datasets.rows import (
    Rows,
    TableSpec,
    check_split_keys,
    parse_value,
    preset_splits,
    split_assignment,
    table_labels,
)

log = logging.getLogger(__name__)

MISSING_IMAGES = ("error", "skip")


@dataclass(frozen=True)
class CsvSpec(TableSpec):
    """A CSV manifest (``path``, or ``split_files``); labels and splits as in :class:`TableSpec`, plus:

    Attributes:
        path_column / path_format: the image path per row: a column, or a format over row columns
            (``"{patientId}.dcm"``; with ``split_files`` also ``{__split__}``, the split the file is for);
            relative to ``image_root`` (default: the CSV's folder).
        image_root: the folder image paths are relative to.
        search_subdirs: find images by file name anywhere under ``image_root`` (NIH's ``images_0NN/images``).
        split_files: per-split CSV files (CheXpert ``train.csv`` / ``valid.csv``) instead of ``path``.
        where: keep only rows whose column has one of the listed values, e.g. ``{"Frontal/Lateral": ["Frontal"]}``.
        where_not: drop rows whose column has one of the listed values, e.g. ``{age: [""]}`` (no age recorded).
        aggregate_by: merge rows with the same value of this column (labels: maximum, i.e. "any reader / box").
        header: column names for a CSV without a header row (ISIC 2016's ground-truth files); every row is data.
        missing_images: ``error`` (default) or ``skip``: drop rows whose image file is absent, with a warning
            giving the count (public samples such as the COVID-19 image collection list images they do not ship).
    """

    kind: ClassVar[str] = "csv"
    path_column: str = "path"
    path_format: str | None = None
    image_root: str | None = None
    search_subdirs: bool = False
    split_files: dict[str, str] | None = None
    where: dict[str, tuple[str, ...]] | None = None
    where_not: dict[str, tuple[str, ...]] | None = None
    aggregate_by: str | None = None
    header: tuple[str, ...] | None = None
    missing_images: str = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_split_keys(self.name, self.split_files, what="split_files")
        if self.missing_images not in MISSING_IMAGES:
            raise RaddinoError(
                f"dataset {self.name}: missing_images must be {' or '.join(MISSING_IMAGES)}, "
                f"got {self.missing_images!r}"
            )
        if self.header is not None and len(set(self.header)) != len(self.header):
            raise RaddinoError(f"dataset {self.name}: header names must be unique, got {list(self.header)}")

    def check_path(self) -> None:
        # per-split files replace the one manifest
        if not self.path and not self.split_files:
            raise RaddinoError(f"dataset {self.name}: set 'path' (or 'split_files' for a csv dataset)")


def _read_csv_rows(spec: CsvSpec, path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise spec.not_found(path, "CSV file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, fieldnames=list(spec.header) if spec.header else None)
        if not reader.fieldnames:
            raise RaddinoError(f"dataset {spec.name}: {path} is empty (no header row)")
        return [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]


def _image_path(spec: CsvSpec, row: dict[str, str], source: str) -> str:
    if spec.path_format is not None:
        try:
            return spec.path_format.format(**row)
        except KeyError as err:
            raise RaddinoError(f"dataset {spec.name}: {source}: path_format needs column {err}") from None
    if spec.path_column not in row:
        raise RaddinoError(
            f"dataset {spec.name}: {source}: no path column '{spec.path_column}' (columns: {', '.join(sorted(row))})"
        )
    return row[spec.path_column]


def _resolve_images(spec: CsvSpec, relative: list[str], root: Path) -> list[Path]:
    """Image paths under ``root``; with ``search_subdirs`` files are found by name anywhere below it. Missing files
    are an error, or (``missing_images: skip``) returned anyway for the caller to drop."""
    if not root.is_dir():
        raise spec.not_found(root, "image root folder")
    paths = [root / r for r in relative]
    if spec.search_subdirs:
        index: dict[str, Path] = {}
        for directory, _, names in os.walk(root):
            for name in names:
                index.setdefault(name, Path(directory) / name)
        paths = [index.get(Path(r).name, root / r) for r in relative]
    missing = [p for p in paths if not p.is_file()]
    if missing and spec.missing_images == "error":
        raise RaddinoError(
            f"dataset {spec.name}: {len(missing)} of {len(paths)} image files not found, e.g. {missing[0]}"
            + ("" if spec.search_subdirs else " (set search_subdirs: true if images sit in subfolders)")
        )
    return paths


def load_csv(spec: CsvSpec, *, data_root: Path | None) -> EvalDataset:
    preset: list[str | None] = []
    rows: list[dict[str, str]] = []
    if spec.split_files:
        for split, file in spec.split_files.items():
            part = _read_csv_rows(spec, spec.resolve(file, data_root))
            for row in part:
                row["__split__"] = split
            rows += part
            preset += [split] * len(part)
        csv_path = spec.resolve(spec.split_files.get("train", next(iter(spec.split_files.values()))), data_root)
    else:
        csv_path = spec.resolve(spec.path, data_root)
        rows = _read_csv_rows(spec, csv_path)
        preset = [None] * len(rows)
    if spec.where or spec.where_not:
        preset, rows = _filter_rows(spec, rows, preset, csv_path.name)
    if not rows:
        filtered = " after 'where' / 'where_not'" if spec.where or spec.where_not else ""
        raise RaddinoError(f"dataset {spec.name}: {csv_path} has no rows{filtered}")
    root = spec.resolve(spec.image_root, data_root) if spec.image_root else csv_path.parent
    relative = [_image_path(spec, row, csv_path.name) for row in rows]
    for row, rel in zip(rows, relative, strict=True):
        row["\x00path"] = rel  # the image reference travels with the row through aggregation
    data = Rows(rows=rows, source=csv_path.name)
    data, preset = _aggregate_with_preset(spec, data, preset)
    paths = _resolve_images(spec, [row["\x00path"] for row in data.rows], root)
    present = [i for i, path in enumerate(paths) if path.is_file()]
    if len(present) < len(paths):  # only with missing_images: skip
        skipped = len(paths) - len(present)
        log.warning("dataset %s: %d of %d image files not found, rows skipped", spec.name, skipped, len(paths))
        if not present:
            raise RaddinoError(f"dataset {spec.name}: none of the {len(paths)} image files under {root} exists")
        data = Rows(rows=[data.rows[i] for i in present], source=data.source)
        preset, paths = [preset[i] for i in present], [paths[i] for i in present]
    preset = preset_splits(spec, data, preset=preset, data_root=data_root)
    labels, task, names = table_labels(spec, data)
    assignment = split_assignment(spec, data, labels=labels, task=task, preset=preset)
    images = FileImages(paths)
    splits = {
        s: EvalSplit(images=FileImages([images.paths[i] for i in idx]), labels=labels[idx])
        for s, idx in assignment.items()
    }
    return EvalDataset(name=spec.name, task=task, label_names=names, splits=splits)


def _filter_rows(
    spec: CsvSpec, rows: list[dict[str, str]], preset: list[str | None], source: str
) -> tuple[list[str | None], list[dict[str, str]]]:
    """Rows (and their preset splits) whose ``where`` columns hold one of the allowed values and whose ``where_not``
    columns hold none of the excluded ones."""
    keep_if = {c: {str(v) for v in _as_tuple(vs)} for c, vs in (spec.where or {}).items()}
    drop_if = {c: {str(v) for v in _as_tuple(vs)} for c, vs in (spec.where_not or {}).items()}
    for key, columns in (("where", keep_if), ("where_not", drop_if)):
        for column in columns:
            if rows and column not in rows[0]:
                raise RaddinoError(f"dataset {spec.name}: {source}: '{key}' column '{column}' not found")
    keep = [
        i
        for i, row in enumerate(rows)
        if all(row[c].strip() in values for c, values in keep_if.items())
        and not any(row[c].strip() in values for c, values in drop_if.items())
    ]
    return [preset[i] for i in keep], [rows[i] for i in keep]


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _aggregate_with_preset(spec: CsvSpec, data: Rows, preset: list[str | None]) -> tuple[Rows, list]:
    if spec.aggregate_by is None:
        return data, preset
    for row, split in zip(data.rows, preset, strict=True):
        row["\x00split"] = split or ""
    merged = _aggregate(spec, data)
    return merged, [row["\x00split"] or None for row in merged.rows]


def _aggregate(spec: CsvSpec, data: Rows) -> Rows:
    """Merge rows sharing ``aggregate_by``: the first row's image and columns, label columns at their maximum."""
    if spec.aggregate_by is None:
        return data
    if data.rows and spec.aggregate_by not in data.rows[0]:
        raise RaddinoError(f"dataset {spec.name}: {data.source}: aggregate_by column '{spec.aggregate_by}' not found")
    merged: dict[str, int] = {}
    rows: list[dict[str, str]] = []
    for row in data.rows:
        key = row[spec.aggregate_by]
        if key not in merged:
            merged[key] = len(rows)
            rows.append(dict(row))
            continue
        target = rows[merged[key]]
        for column in spec.label_columns:
            if spec.label_delimiter is not None:
                joined = {*target[column].split(spec.label_delimiter), *row[column].split(spec.label_delimiter)}
                target[column] = spec.label_delimiter.join(sorted(v for v in joined if v))
            else:
                a = parse_value(target[column], spec=spec, column=column, source=data.source)
                b = parse_value(row[column], spec=spec, column=column, source=data.source)
                target[column] = repr(max(a, b))
    return Rows(rows=rows, source=data.source)
