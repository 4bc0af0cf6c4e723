"""``kind: medmnist``: a MedMNIST ``.npz`` with its official splits (``{train,val,test}_{images,labels}``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import SPLITS, ArrayImages, EvalDataset, EvalSplit, SpecBase, digest, file_identity


@dataclass(frozen=True)
class MedmnistSpec(SpecBase):
    """A MedMNIST ``.npz`` (``path``); only the common fields: the splits and labels come from the file.

    ``classes`` names the classes (or, for ``(N, K)`` labels, the findings); ``task`` overrides the inference
    (``(N, K)`` labels -> multilabel, otherwise binary / multiclass by the number of classes).
    """

    kind: ClassVar[str] = "medmnist"

    def __post_init__(self) -> None:
        self.check_task()
        self.check_path()


def load_medmnist(spec: MedmnistSpec, *, data_root: Path | None) -> EvalDataset:
    path = spec.resolve(spec.path, data_root)
    if not path.is_file():
        raise spec.not_found(path, "MedMNIST .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise RaddinoError(f"dataset {spec.name}: cannot read {path}: {err}") from None
    identity = digest(*file_identity(path))
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
