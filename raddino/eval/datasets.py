"""Labelled evaluation datasets: MedMNIST ``.npz``, class-subfolder trees, CSV manifests and labelled shards.

Every dataset becomes an :class:`EvalDataset` with exactly three splits (``train``, ``val``, ``test``) of images +
labels, where labels are ``(N,)`` int64 (binary / multiclass), ``(N, K)`` int64 0/1 (multilabel) or ``(N,)`` float64
(regression). Images load lazily, one at a time, as ``(H, W)`` (gray) or ``(H, W, 3)`` (colour) arrays of dtype
uint8, uint16 or float32 in [0, 1] (DICOM); each backbone adapter converts them to its own input (colour matters for
the fundus and dermoscopy sets, so it is not dropped here). See ``docs/EVAL.md`` for the expected layouts.

Splits come from the data where it has them (MedMNIST's official splits, ``train/val/test`` folders, a split column,
per-split CSVs or official split lists) and are otherwise drawn with a seeded generator: a validation set carved
from train (``val_fraction``), or train / val / test from ``split_fractions``; grouped by ``group_column`` (e.g. the
patient) when given, so one patient never spans two splits.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from raddino.data.imageio import HEADER_BYTES, SkipReason, UnusableImage, decode_image, sniff_format
from raddino.data.shard_format import IMAGE_EXT, ShardMember, read_shard
from raddino.errors import RaddinoError
from raddino.eval.metrics import TASKS, Task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_KINDS = ("medmnist", "folder", "csv", "shards")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")
# Folder names accepted for each split (Kermany's layout uses "val"; others use "valid" / "validation").
_SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
_DEFAULT_SPLIT_VALUES = {"train": ["train", "training"], "val": ["val", "valid", "validation"], "test": ["test"]}


# --------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------


class ImageList(Protocol):
    """Random access to the images of one split."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> np.ndarray:
        """Image ``index``: ``(H, W)`` or ``(H, W, 3)``, uint8 / uint16 / float32 in [0, 1]."""
        ...

    def fingerprint(self) -> str:
        """A hex digest identifying exactly these images in this order (feature-cache key)."""
        ...


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _file_identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_image(data: bytes | Path, *, name: str) -> np.ndarray:
    """Decode PNG / JPEG / BMP / TIFF bytes or a file (DICOM too) into ``(H, W)`` or ``(H, W, 3)``.

    Gray modes keep their depth (uint8 / uint16); colour images become RGB uint8 (alpha dropped); EXIF orientation
    is not applied; DICOM pixels are min-max scaled to float32 [0, 1] after the modality / VOI transforms of
    :func:`raddino.data.dicom.read_dicom`. ``name`` names the image in errors.
    """
    try:
        if isinstance(data, Path):
            with open(data, "rb") as handle:
                head = handle.read(HEADER_BYTES)
            if sniff_format(head, data.suffix) == "dicom":
                from raddino.data.dicom import DicomReadOptions, read_dicom

                # Evaluation images are chosen by the dataset, so no modality / burned-in-annotation filtering.
                options = DicomReadOptions(modalities=None, skip_burned_in=False, multi_frame="first")
                pixels = read_dicom(data, options).pixels.astype(np.float32)
                low, high = float(pixels.min()), float(pixels.max())
                return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        return decode_image(data, colour=True, formats=None, orient=False)
    except FileNotFoundError:
        raise RaddinoError(f"image file not found: {name}") from None
    except UnusableImage as err:
        if err.reason is SkipReason.MISSING:
            raise RaddinoError(f"image file not found: {name}") from None
        if err.reason in (SkipReason.UNDECODABLE, SkipReason.TRUNCATED):
            raise RaddinoError(f"cannot decode image {name}: {err.detail}") from None
        raise RaddinoError(f"cannot read image {name}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:  # DICOM reading
        raise RaddinoError(f"cannot decode image {name}: {err}") from None


class ArrayImages:
    """Images held in one array ``(N, H, W)`` or ``(N, H, W, 3)`` (MedMNIST)."""

    def __init__(self, array: np.ndarray, *, identity: str) -> None:
        self.array = array
        self.identity = identity

    def __len__(self) -> int:
        return len(self.array)

    def load(self, index: int) -> np.ndarray:
        return self.array[index]

    def fingerprint(self) -> str:
        return _digest("array", self.identity, self.array.shape, str(self.array.dtype))


class FileImages:
    """Images stored as files (PNG / JPEG / DICOM ...)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return load_image(self.paths[index], name=str(self.paths[index]))

    def fingerprint(self) -> str:
        # Path, size and modification time of every file: replacing an image invalidates cached features.
        return _digest("files", [_file_identity(p) for p in self.paths])


class ShardImages:
    """The ``<key>.png`` members of WebDataset shards."""

    def __init__(self, members: Sequence[ShardMember], keys: Sequence[str]) -> None:
        self.members = list(members)
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.members)

    def load(self, index: int) -> np.ndarray:
        member = self.members[index]
        return load_image(member.read(), name=f"{member.tar.name}:{self.keys[index]}.png")

    def fingerprint(self) -> str:
        tars = sorted({m.tar for m in self.members})
        return _digest("shards", [_file_identity(t) for t in tars], self.keys)


class SubsetImages:
    """A view of some images of another list, in the order of ``indices``."""

    def __init__(self, base: ImageList, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> np.ndarray:
        return self.base.load(int(self.indices[index]))

    def fingerprint(self) -> str:
        return _digest("subset", self.base.fingerprint(), hashlib.sha256(self.indices.tobytes()).hexdigest())


# --------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSplit:
    """Images and labels of one split (``labels`` as described in the module docstring)."""

    images: ImageList
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> EvalSplit:
        return EvalSplit(images=SubsetImages(self.images, indices), labels=self.labels[indices])


@dataclass
class EvalDataset:
    """A labelled dataset with ``train`` / ``val`` / ``test`` splits."""

    name: str
    task: Task
    label_names: list[str]
    splits: dict[str, EvalSplit]

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(self.splits[s])}" for s in SPLITS)
        return f"{self.name}: {self.task}, {len(self.label_names)} labels/classes; {sizes}"


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset (a ``datasets:`` entry of a suite; every field documented in ``docs/EVAL.md``).

    Attributes:
        name: the name in result tables.
        kind: ``medmnist`` (.npz) | ``folder`` (split/class subfolders) | ``csv`` (manifest) | ``shards``.
        path: the .npz file, the folder root, the CSV file or the shard directory.
        task: binary | multiclass | multilabel | regression; inferred when omitted.
        label_columns: CSV columns / shard JSON fields holding labels (several -> multilabel).
        classes: class names, in index order (single-column string labels, or the vocabulary of ``label_delimiter``).
        label_delimiter: one column listing several findings, e.g. NIH's ``Finding Labels`` = ``A|B``.
        value_map: raw label value -> number, e.g. CheXpert ``{"-1.0": 1, "": 0}`` (uncertain -> positive).
        path_column / path_format: the image path per row: a column, or a format over row columns
            (``"{patientId}.dcm"``; with ``split_files`` also ``{__split__}``, the split the file is for);
            relative to ``image_root`` (default: the CSV's folder).
        search_subdirs: find images by file name anywhere under ``image_root`` (NIH's ``images_0NN/images``).
        split_column / split_values: a column naming each row's split, and which values mean which split.
        split_files: per-split CSV files (CheXpert ``train.csv`` / ``valid.csv``) instead of ``path``.
        split_lists: per-split text files listing path-column values (NIH ``train_val_list.txt`` / ``test_list.txt``).
        where: keep only rows whose column has one of the listed values, e.g. ``{"Frontal/Lateral": ["Frontal"]}``.
        group_column: patient / study column; random splits keep each group within one split.
        aggregate_by: merge rows with the same value of this column (labels: maximum, i.e. "any reader / box").
        val_fraction: share of train carved out as validation when the data has no validation split.
        split_fractions: train / val / test shares when the data has no splits at all.
        seed: seed of those random splits.
    """

    name: str
    kind: str
    path: str = ""
    task: str | None = None
    label_columns: tuple[str, ...] = ("label",)
    classes: tuple[str, ...] | None = None
    label_delimiter: str | None = None
    value_map: dict[str, float] | None = None
    path_column: str = "path"
    path_format: str | None = None
    image_root: str | None = None
    search_subdirs: bool = False
    split_column: str | None = None
    split_values: dict[str, tuple[str, ...]] | None = None
    split_files: dict[str, str] | None = None
    split_lists: dict[str, str] | None = None
    where: dict[str, tuple[str, ...]] | None = None
    group_column: str | None = None
    aggregate_by: str | None = None
    val_fraction: float = 0.1
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise RaddinoError(f"dataset {self.name}: unknown kind {self.kind!r}; expected {', '.join(DATASET_KINDS)}")
        if self.task is not None and self.task not in TASKS:
            raise RaddinoError(f"dataset {self.name}: unknown task {self.task!r}; expected {', '.join(TASKS)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise RaddinoError(f"dataset {self.name}: val_fraction must be in (0, 1), got {self.val_fraction}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise RaddinoError(f"dataset {self.name}: split_fractions needs 3 positive values (train, val, test)")
        if not self.path and not self.split_files:
            raise RaddinoError(f"dataset {self.name}: set 'path' (or 'split_files' for a csv dataset)")
        for mapping, what in ((self.split_files, "split_files"), (self.split_lists, "split_lists")):
            unknown = set(mapping or {}) - set(SPLITS)
            if unknown:
                raise RaddinoError(f"dataset {self.name}: {what} keys must be train/val/test, got {sorted(unknown)}")

    def resolve(self, value: str, data_root: Path | None) -> Path:
        """A path from the spec: ``~`` expanded; relative paths are relative to ``data_root`` when given."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() or data_root is None else data_root / path


def load_dataset(spec: DatasetSpec, *, data_root: Path | None = None) -> EvalDataset:
    """Load a dataset (labels and an image index; pixels load lazily). Missing files raise :class:`RaddinoError`."""
    loaders: dict[str, Callable[[DatasetSpec, Path | None], EvalDataset]] = {
        "medmnist": _load_medmnist,
        "folder": _load_folder,
        "csv": _load_csv,
        "shards": _load_shards,
    }
    dataset = loaders[spec.kind](spec, data_root)
    for split in SPLITS:
        if len(dataset.splits[split]) == 0:
            raise RaddinoError(f"dataset {spec.name}: the {split} split is empty")
    log.info("dataset %s", dataset.summary())
    return dataset


def _missing(spec: DatasetSpec, path: Path, what: str) -> RaddinoError:
    hint = f" ({spec.description})" if spec.description else ""
    return RaddinoError(f"dataset {spec.name}: {what} not found: {path}{hint}; see docs/EVAL.md for the layout")


# ---- MedMNIST ------------------------------------------------------------------------------------------------


def _load_medmnist(spec: DatasetSpec, data_root: Path | None) -> EvalDataset:
    path = spec.resolve(spec.path, data_root)
    if not path.is_file():
        raise _missing(spec, path, "MedMNIST .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise RaddinoError(f"dataset {spec.name}: cannot read {path}: {err}") from None
    identity = _digest(*_file_identity(path))
    splits: dict[str, EvalSplit] = {}
    with archive:
        for split in SPLITS:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in archive.files:
                    raise RaddinoError(
                        f"dataset {spec.name}: {path} has no array '{key}' (keys: {', '.join(sorted(archive.files))})"
                    )
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
            if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
                raise RaddinoError(f"dataset {spec.name}: {split}_images has shape {images.shape}")
            if images.ndim == 4 and images.shape[-1] == 1:
                images = images[..., 0]
            if len(labels) != len(images):
                raise RaddinoError(f"dataset {spec.name}: {len(labels)} {split}_labels for {len(images)} images")
            splits[split] = EvalSplit(
                images=ArrayImages(images, identity=f"{identity}:{split}"), labels=np.asarray(labels)
            )
    width = splits["train"].labels.reshape(len(splits["train"]), -1).shape[1]
    task = spec.task or ("multilabel" if width > 1 else None)
    for split in splits.values():
        if task == "regression":
            split.labels = split.labels.reshape(len(split), -1)[:, 0].astype(np.float64)
        elif task == "multilabel" or width > 1:
            split.labels = split.labels.reshape(len(split), -1).astype(np.int64)
        else:
            split.labels = split.labels.reshape(-1).astype(np.int64)
    if task is None:
        n_classes = int(max(int(s.labels.max()) for s in splits.values())) + 1
        task = "binary" if n_classes <= 2 else "multiclass"
    n_names = width if task == "multilabel" else int(max(int(s.labels.max()) for s in splits.values())) + 1
    names = list(spec.classes) if spec.classes else [str(i) for i in range(n_names)]
    return EvalDataset(name=spec.name, task=task, label_names=names, splits=splits)


# ---- class-subfolder trees -----------------------------------------------------------------------------------


def _image_files(directory: Path) -> list[Path]:
    found = directory.rglob("*")
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != ".")


def _load_folder(spec: DatasetSpec, data_root: Path | None) -> EvalDataset:
    root = spec.resolve(spec.path, data_root)
    if not root.is_dir():
        raise _missing(spec, root, "image folder")
    split_dirs: dict[str, Path] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if (root / alias).is_dir():
                split_dirs[split] = root / alias
                break
    for split in ("train", "test"):
        if split not in split_dirs:
            raise _missing(spec, root / split, f"'{split}' folder (with one subfolder per class)")
    classes = spec.classes or tuple(
        sorted({d.name for s in split_dirs.values() for d in s.iterdir() if d.is_dir() and not d.name.startswith(".")})
    )
    if len(classes) < 2:
        raise RaddinoError(f"dataset {spec.name}: {root} needs at least two class subfolders, found {list(classes)}")
    files: dict[str, tuple[list[Path], list[int]]] = {}
    for split, directory in split_dirs.items():
        paths, labels = [], []
        for index, name in enumerate(classes):
            found = _image_files(directory / name) if (directory / name).is_dir() else []
            paths += found
            labels += [index] * len(found)
        files[split] = (paths, labels)
    if "val" not in files:
        paths, labels = files["train"]
        y = np.asarray(labels, dtype=np.int64)
        train_idx, val_idx = carve_validation(y, fraction=spec.val_fraction, seed=spec.seed, groups=None, task="binary")
        files["val"] = ([paths[i] for i in val_idx], [labels[i] for i in val_idx])
        files["train"] = ([paths[i] for i in train_idx], [labels[i] for i in train_idx])
        log.info("dataset %s: no validation folder; %d train images carved out as validation", spec.name, len(val_idx))
    task = spec.task or ("binary" if len(classes) == 2 else "multiclass")
    splits = {
        s: EvalSplit(images=FileImages(files[s][0]), labels=np.asarray(files[s][1], dtype=np.int64)) for s in SPLITS
    }
    return EvalDataset(name=spec.name, task=task, label_names=list(classes), splits=splits)


# ---- labels from table rows (CSV and shard JSON) ------------------------------------------------------------


@dataclass
class _Rows:
    """Rows (column -> string value) before labels and splits are decided. The image reference of each row travels
    in the row itself under the key ``"\x00path"`` (no CSV column can have that name), so it survives merging."""

    rows: list[dict[str, str]]
    source: str  # for error messages


def _parse_value(raw: str, *, spec: DatasetSpec, column: str, source: str) -> float:
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


def _labels(spec: DatasetSpec, data: _Rows) -> tuple[np.ndarray, Task, list[str]]:
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
            [[_parse_value(row[c], spec=spec, column=c, source=data.source) for c in columns] for row in data.rows]
        ).reshape(len(data.rows), len(columns))
        bad = ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: multilabel column '{columns[c]}' has value {labels[r, c]:g} "
                "(expected 0 or 1; map others with value_map)"
            )
        return labels.astype(np.int64), "multilabel", columns
    column = columns[0]
    if spec.task == "regression":
        values = [_parse_value(row[column], spec=spec, column=column, source=data.source) for row in data.rows]
        return np.asarray(values, dtype=np.float64), "regression", [column]
    raw = [(row[column] or "").strip() for row in data.rows]
    if spec.classes:
        index = {name: i for i, name in enumerate(spec.classes)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise RaddinoError(
                f"dataset {spec.name}: {data.source}: column '{column}' has values not in classes: {unknown[:5]}"
            )
        labels = np.asarray([index[v] for v in raw], dtype=np.int64)
        names = list(spec.classes)
    else:
        numeric = [_parse_value(v, spec=spec, column=column, source=data.source) for v in raw]
        if any(v != int(v) or v < 0 for v in numeric):
            raise RaddinoError(
                f"dataset {spec.name}: column '{column}' holds non-integer or negative values; set task: regression "
                "or list 'classes'"
            )
        labels = np.asarray(numeric, dtype=np.int64)
        names = [str(i) for i in range(int(labels.max(initial=1)) + 1)]
    task = spec.task or ("binary" if len(names) <= 2 else "multiclass")
    return labels, task, names


def _aggregate(spec: DatasetSpec, data: _Rows) -> _Rows:
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
                a = _parse_value(target[column], spec=spec, column=column, source=data.source)
                b = _parse_value(row[column], spec=spec, column=column, source=data.source)
                target[column] = repr(max(a, b))
    return _Rows(rows=rows, source=data.source)


def _split_assignment(
    spec: DatasetSpec, data: _Rows, labels: np.ndarray, task: Task, preset: list[str | None]
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


# ---- CSV manifests -------------------------------------------------------------------------------------------


def _read_csv_rows(spec: DatasetSpec, path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise _missing(spec, path, "CSV file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise RaddinoError(f"dataset {spec.name}: {path} is empty (no header row)")
        return [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]


def _image_path(spec: DatasetSpec, row: dict[str, str], root: Path, source: str) -> str:
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


def _resolve_images(spec: DatasetSpec, relative: list[str], root: Path) -> list[Path]:
    """Image paths under ``root``; with ``search_subdirs`` files are found by name anywhere below it."""
    if not root.is_dir():
        raise _missing(spec, root, "image root folder")
    paths = [root / r for r in relative]
    if spec.search_subdirs:
        index: dict[str, Path] = {}
        for directory, _, names in os.walk(root):
            for name in names:
                index.setdefault(name, Path(directory) / name)
        paths = [index.get(Path(r).name, root / r) for r in relative]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RaddinoError(
            f"dataset {spec.name}: {len(missing)} of {len(paths)} image files not found, e.g. {missing[0]}"
            + ("" if spec.search_subdirs else " (set search_subdirs: true if images sit in subfolders)")
        )
    return paths


def _load_csv(spec: DatasetSpec, data_root: Path | None) -> EvalDataset:
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
    if spec.where:
        preset, rows = _filter_rows(spec, rows, preset, csv_path.name)
    if not rows:
        raise RaddinoError(f"dataset {spec.name}: {csv_path} has no rows" + (" after 'where'" if spec.where else ""))
    root = spec.resolve(spec.image_root, data_root) if spec.image_root else csv_path.parent
    relative = [_image_path(spec, row, root, csv_path.name) for row in rows]
    for row, rel in zip(rows, relative, strict=True):
        row["\x00path"] = rel  # the image reference travels with the row through aggregation
    data = _Rows(rows=rows, source=csv_path.name)
    data, preset = _aggregate_with_preset(spec, data, preset)
    preset = _preset_splits(spec, data, preset, data_root)
    labels, task, names = _labels(spec, data)
    paths = _resolve_images(spec, [row["\x00path"] for row in data.rows], root)
    assignment = _split_assignment(spec, data, labels, task, preset)
    images = FileImages(paths)
    splits = {
        s: EvalSplit(images=FileImages([images.paths[i] for i in idx]), labels=labels[idx])
        for s, idx in assignment.items()
    }
    return EvalDataset(name=spec.name, task=task, label_names=names, splits=splits)


def _filter_rows(
    spec: DatasetSpec, rows: list[dict[str, str]], preset: list[str | None], source: str
) -> tuple[list[str | None], list[dict[str, str]]]:
    """Rows (and their preset splits) whose ``where`` columns hold one of the allowed values."""
    for column in spec.where or {}:
        if rows and column not in rows[0]:
            raise RaddinoError(f"dataset {spec.name}: {source}: 'where' column '{column}' not found")
    keep = [
        i
        for i, row in enumerate(rows)
        if all(row[c].strip() in {str(v) for v in _as_tuple(vs)} for c, vs in (spec.where or {}).items())
    ]
    return [preset[i] for i in keep], [rows[i] for i in keep]


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _aggregate_with_preset(spec: DatasetSpec, data: _Rows, preset: list[str | None]) -> tuple[_Rows, list]:
    if spec.aggregate_by is None:
        return data, preset
    for row, split in zip(data.rows, preset, strict=True):
        row["\x00split"] = split or ""
    merged = _aggregate(spec, data)
    return merged, [row["\x00split"] or None for row in merged.rows]


def _preset_splits(spec: DatasetSpec, data: _Rows, preset: list[str | None], data_root: Path | None) -> list:
    """Split names from ``split_column`` or ``split_lists`` (on top of ``split_files``)."""
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
                raise _missing(spec, path, f"{split} split list")
            for line in path.read_text().splitlines():
                if line.strip():
                    names[line.strip()] = split
        preset = [names.get(row["\x00path"]) or names.get(Path(row["\x00path"]).name) for row in data.rows]
    return preset


# ---- labelled WebDataset shards ------------------------------------------------------------------------------


def _index_shards(spec: DatasetSpec, directory: Path) -> tuple[list[str], list[ShardMember], list[dict[str, str]]]:
    """Keys, PNG members and flattened JSON records (``meta`` fields first) of every sample in the shards."""
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise _missing(spec, directory / "shard-000000.tar", "shard files (*.tar)")
    keys: list[str] = []
    members: list[ShardMember] = []
    records: list[dict[str, str]] = []
    for tar_path in tars:
        try:
            samples = [s for s in read_shard(tar_path) if IMAGE_EXT in s.members]
        except ValueError as err:
            raise RaddinoError(f"dataset {spec.name}: {tar_path.name}: a JSON member is not JSON ({err})") from None
        for sample in sorted(samples, key=lambda s: s.key):
            if sample.metadata is None:
                raise RaddinoError(f"dataset {spec.name}: {tar_path.name}: sample {sample.key} has a .png but no .json")
            flat = {k: v for k, v in sample.metadata.items() if not isinstance(v, dict | list)}
            flat.update(sample.metadata.get("meta") or {})
            keys.append(sample.key)
            members.append(sample.members[IMAGE_EXT])
            records.append({k: "" if v is None else str(v) for k, v in flat.items()})
    return keys, members, records


def _load_shards(spec: DatasetSpec, data_root: Path | None) -> EvalDataset:
    directory = spec.resolve(spec.path, data_root)
    if not directory.is_dir():
        raise _missing(spec, directory, "shard directory")
    keys, members, records = _index_shards(spec, directory)
    data = _Rows(rows=records, source=directory.name)
    for row, key in zip(records, keys, strict=True):
        row["\x00path"] = key
    preset = _preset_splits(spec, data, [None] * len(records), data_root)
    labels, task, names = _labels(spec, data)
    assignment = _split_assignment(spec, data, labels, task, preset)
    splits = {
        s: EvalSplit(images=ShardImages([members[i] for i in idx], [keys[i] for i in idx]), labels=labels[idx])
        for s, idx in assignment.items()
    }
    return EvalDataset(name=spec.name, task=task, label_names=names, splits=splits)


# --------------------------------------------------------------------------------------------------------------
# stratified subsets and random splits
# --------------------------------------------------------------------------------------------------------------


def strata(labels: np.ndarray, task: Task) -> np.ndarray:
    """Stratification key ``(N,)`` int: the class (binary / multiclass); the rarest positive label, -1 for none
    (multilabel); the quintile of the target (regression)."""
    labels = np.asarray(labels)
    if task == "multilabel":
        prevalence = labels.sum(axis=0)
        order = np.argsort(prevalence, kind="stable")  # rarest label first
        key = np.full(len(labels), -1, dtype=np.int64)
        for label in order[::-1]:  # later (rarer) labels overwrite
            key[labels[:, label] > 0] = label
        return key
    if task == "regression":
        edges = np.quantile(labels, [0.2, 0.4, 0.6, 0.8])
        return np.searchsorted(edges, labels, side="right").astype(np.int64)
    return labels.astype(np.int64)


def label_subset(labels: np.ndarray, *, fraction: float, seed: int, task: Task) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the samples (label-efficiency experiments).

    Each stratum keeps ``round(fraction * size)`` samples (at least 1), taken from one seeded permutation, so the
    subsets are reproducible for a seed and nested across fractions (1 % of seed s lies inside 10 % of seed s).
    """
    if not 0.0 < fraction <= 1.0:
        raise RaddinoError(f"label fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    if fraction == 1.0:
        return np.arange(n)
    permutation = np.random.default_rng(seed).permutation(n)
    key = strata(labels, task)[permutation]
    chosen = []
    for stratum in np.unique(key):
        members = permutation[key == stratum]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def carve_validation(
    labels: np.ndarray, *, fraction: float, seed: int, groups: np.ndarray | None, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into (train, val): stratified by label, or by whole groups when ``groups`` is given."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    if groups is not None:
        unique = np.unique(groups)
        shuffled = unique[rng.permutation(len(unique))]
        n_val_groups = max(1, round(fraction * len(unique)))
        val_mask = np.isin(groups, shuffled[:n_val_groups])
        return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    val = label_subset(labels, fraction=fraction, seed=seed, task=task)
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def random_splits(
    labels: np.ndarray, *, fractions: Sequence[float], seed: int, groups: np.ndarray | None, task: Task
) -> dict[str, np.ndarray]:
    """Seeded train / val / test indices in the given proportions (stratified, or by whole groups)."""
    total = float(sum(fractions))
    train_share, val_share, _ = (f / total for f in fractions)
    rest, test = carve_validation(labels, fraction=1.0 - train_share - val_share, seed=seed, groups=groups, task=task)
    sub_groups = None if groups is None else groups[rest]
    train, val = carve_validation(
        labels[rest], fraction=val_share / (train_share + val_share), seed=seed + 1, groups=sub_groups, task=task
    )
    return {"train": rest[train], "val": rest[val], "test": test}


def infer_kind(path: Path) -> str:
    """Dataset kind of a bare ``--dataset PATH``: .npz -> medmnist, .csv -> csv, a folder of .tar -> shards, else
    folder."""
    if path.suffix == ".npz":
        return "medmnist"
    if path.suffix == ".csv":
        return "csv"
    if path.is_dir() and any(path.glob("*.tar")):
        return "shards"
    return "folder"


def dataset_name(path: Path) -> str:
    """A short dataset name from its path (``pneumoniamnist.npz`` -> ``pneumoniamnist``)."""
    return re.sub(r"\.(npz|csv)$", "", path.name) or "dataset"
