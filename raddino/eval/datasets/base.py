"""What every evaluation dataset kind shares: images, splits, the common spec fields and the split helpers.

Every dataset becomes an :class:`EvalDataset` with exactly three splits (``train``, ``val``, ``test``) of images +
labels, where labels are ``(N,)`` int64 (binary / multiclass), ``(N, K)`` int64 0/1 (multilabel) or ``(N,)`` float64
(regression). Images load lazily, one at a time, as ``(H, W)`` (gray) or ``(H, W, 3)`` (colour) arrays of dtype
uint8, uint16 or float32 in [0, 1] (DICOM); each backbone adapter converts them to its own input (colour matters for
the fundus and dermoscopy sets, so it is not dropped here). See ``docs/EVAL.md`` for the expected layouts.

Splits come from the data where it has them (MedMNIST's official splits, ``train/val/test`` folders, a split column,
per-split CSVs or official split lists) and are otherwise drawn with a seeded generator (:func:`carve_validation`,
:func:`random_splits`); grouped (e.g. by patient) when asked, so one patient never spans two splits.

Each kind has its own module with its spec and loader (:mod:`~raddino.eval.datasets.medmnist`,
:mod:`~raddino.eval.datasets.folder`, :mod:`~raddino.eval.datasets.csv`, :mod:`~raddino.eval.datasets.shards`);
:mod:`~raddino.eval.datasets.registry` maps a suite's ``kind:`` to them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from raddino.data.imageio import HEADER_BYTES, SkipReason, UnusableImage, decode_image, sniff_format
from raddino.data.shard_format import ShardMember
from raddino.errors import RaddinoError
from raddino.eval.metrics import TASKS, Task

SPLITS = ("train", "val", "test")


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


def digest(*parts: object) -> str:
    """A hex digest of the ``repr`` of each part (image fingerprints and identities)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def file_identity(path: Path) -> tuple[str, int, int]:
    """Resolved path, size and modification time: a replaced file gets a new identity."""
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
        return digest("array", self.identity, self.array.shape, str(self.array.dtype))


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
        return digest("files", [file_identity(p) for p in self.paths])


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
        return digest("shards", [file_identity(t) for t in tars], self.keys)


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
        return digest("subset", self.base.fingerprint(), hashlib.sha256(self.indices.tobytes()).hexdigest())


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
class SpecBase:
    """The fields every dataset kind has (a ``datasets:`` entry of a suite; each kind's module adds its own fields and
    checks them in ``__post_init__``; all documented in ``docs/EVAL.md``).

    Attributes:
        name: the name in result tables.
        path: the .npz file, the folder root, the CSV file or the shard directory.
        task: binary | multiclass | multilabel | regression; inferred when omitted.
        classes: class / label names, in index order.
        description: where the data comes from, shown with "not found" errors.
    """

    kind: ClassVar[str]  # the suite's ``kind:`` value; a class attribute, so never a key of the entry itself
    name: str
    path: str = ""
    task: str | None = None
    classes: tuple[str, ...] | None = None
    description: str = field(default="", compare=False)

    def check_task(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise RaddinoError(f"dataset {self.name}: unknown task {self.task!r}; expected {', '.join(TASKS)}")

    def check_path(self) -> None:
        if not self.path:
            raise RaddinoError(f"dataset {self.name}: set 'path'")

    def resolve(self, value: str, data_root: Path | None) -> Path:
        """A path from the spec: ``~`` expanded; relative paths are relative to ``data_root`` when given."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() or data_root is None else data_root / path

    def not_found(self, path: Path, what: str) -> RaddinoError:
        """The error for a missing file or folder: names it, adds the description and points to the layouts."""
        hint = f" ({self.description})" if self.description else ""
        return RaddinoError(f"dataset {self.name}: {what} not found: {path}{hint}; see docs/EVAL.md for the layout")


def check_val_fraction(name: str, val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise RaddinoError(f"dataset {name}: val_fraction must be in (0, 1), got {val_fraction}")


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


# --------------------------------------------------------------------------------------------------------------
# bare paths (``raddino eval --dataset PATH``)
# --------------------------------------------------------------------------------------------------------------


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
