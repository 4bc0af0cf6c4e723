"""``kind: folder``: ``ROOT/{train,val,test}/<class>/*`` image trees (Kermany's ``chest_xray/`` layout), or
``ROOT/<class>/*`` with seeded stratified splits (``split_fractions``; iChallenge-AMD's ``Training400/``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import (
    SPLITS,
    EvalDataset,
    EvalSplit,
    FileImages,
    SpecBase,
    carve_validation,
    check_val_fraction,
    random_splits,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")
# Folder names accepted for each split (Kermany's layout uses "val"; others use "valid" / "validation").
_SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


@dataclass(frozen=True)
class FolderSpec(SpecBase):
    """A folder root (``path``) with ``train`` and ``test`` (and optionally ``val``) folders of class subfolders.

    Attributes:
        classes: (common field) the class subfolders to use, in index order; default: every subfolder, sorted.
        val_fraction: share of train carved out (stratified) as validation when there is no ``val`` folder.
        split_fractions: train / val / test shares for a root holding the class folders itself (no split folders):
            the data has no official split, so one is drawn, stratified by class.
        seed: seed of that carving / those splits.
    """

    kind: ClassVar[str] = "folder"
    val_fraction: float = 0.1
    split_fractions: tuple[float, float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_task()
        check_val_fraction(self.name, self.val_fraction)
        if self.split_fractions is not None and (len(self.split_fractions) != 3 or min(self.split_fractions) <= 0):
            raise RaddinoError(f"dataset {self.name}: split_fractions needs 3 positive values (train, val, test)")
        self.check_path()


def _image_files(directory: Path) -> list[Path]:
    found = directory.rglob("*")
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != ".")


def _classes(spec: FolderSpec, root: Path, parents: Iterable[Path]) -> tuple[str, ...]:
    classes = spec.classes or tuple(
        sorted({d.name for p in parents for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")})
    )
    if len(classes) < 2:
        raise RaddinoError(f"dataset {spec.name}: {root} needs at least two class subfolders, found {list(classes)}")
    return classes


def _load_unsplit(spec: FolderSpec, root: Path) -> EvalDataset:
    """``ROOT/<class>/*`` -> seeded train / val / test splits in ``split_fractions``, stratified by class."""
    classes = _classes(spec, root, [root])
    paths, labels = [], []
    for index, name in enumerate(classes):
        found = _image_files(root / name) if (root / name).is_dir() else []
        if not found:
            raise spec.not_found(root / name, f"class folder '{name}' (with images)")
        paths += found
        labels += [index] * len(found)
    y = np.asarray(labels, dtype=np.int64)
    task = spec.task or ("binary" if len(classes) == 2 else "multiclass")
    assignment = random_splits(y, fractions=spec.split_fractions, seed=spec.seed, groups=None, task=task)
    splits = {s: EvalSplit(images=FileImages([paths[i] for i in idx]), labels=y[idx]) for s, idx in assignment.items()}
    return EvalDataset(name=spec.name, task=task, label_names=list(classes), splits=splits)


def load_folder(spec: FolderSpec, *, data_root: Path | None) -> EvalDataset:
    root = spec.resolve(spec.path, data_root)
    if not root.is_dir():
        raise spec.not_found(root, "image folder")
    split_dirs: dict[str, Path] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if (root / alias).is_dir():
                split_dirs[split] = root / alias
                break
    if spec.split_fractions is not None:
        if split_dirs:
            raise RaddinoError(
                f"dataset {spec.name}: {root} has split folders ({', '.join(sorted(split_dirs))}); split_fractions is "
                "for a root that holds the class folders itself"
            )
        return _load_unsplit(spec, root)
    for split in ("train", "test"):
        if split not in split_dirs:
            raise spec.not_found(root / split, f"'{split}' folder (with one subfolder per class)")
    classes = _classes(spec, root, split_dirs.values())
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
