"""The dataset kinds: a suite's ``kind:`` -> (its spec class, its loader), and :func:`load_dataset`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import SPLITS, EvalDataset, SpecBase
from raddino.eval.datasets.csv import CsvSpec, load_csv
from raddino.eval.datasets.folder import FolderSpec, load_folder
from raddino.eval.datasets.medmnist import MedmnistSpec, load_medmnist
from raddino.eval.datasets.shards import ShardsSpec, load_shards

log = logging.getLogger(__name__)

# kind -> (spec class, loader); the loader takes the spec and ``data_root=``
KINDS: dict[str, tuple[type[SpecBase], Callable[..., EvalDataset]]] = {
    "medmnist": (MedmnistSpec, load_medmnist),
    "folder": (FolderSpec, load_folder),
    "csv": (CsvSpec, load_csv),
    "shards": (ShardsSpec, load_shards),
}
DATASET_KINDS = tuple(KINDS)


def spec_class(kind: Any, *, dataset: str) -> type[SpecBase]:
    """The spec class of ``kind``; raises :class:`RaddinoError` naming ``dataset`` for an unknown kind."""
    if kind not in DATASET_KINDS:  # a tuple, so an unhashable YAML value is an unknown kind too
        raise RaddinoError(f"dataset {dataset}: unknown kind {kind!r}; expected {', '.join(DATASET_KINDS)}")
    return KINDS[kind][0]


def spec_keys(kind: str) -> tuple[str, ...]:
    """The keys a ``datasets:`` entry of ``kind`` may have (``kind`` itself included), sorted."""
    return tuple(sorted({"kind", *(f.name for f in dataclasses.fields(KINDS[kind][0]))}))


def load_dataset(spec: SpecBase, *, data_root: Path | None = None) -> EvalDataset:
    """Load a dataset (labels and an image index; pixels load lazily). Missing files raise :class:`RaddinoError`."""
    loader = KINDS[spec.kind][1]
    dataset = loader(spec, data_root=data_root)
    for split in SPLITS:
        if len(dataset.splits[split]) == 0:
            raise RaddinoError(f"dataset {spec.name}: the {split} split is empty")
    log.info("dataset %s", dataset.summary())
    return dataset
