"""``kind: shards``: a directory of labelled WebDataset shards (``raddino shard --carry label,split ...``): each
sample's ``<key>.png`` is the image, its ``<key>.json`` (``meta`` fields first, then the top level) is the row that
labels and splits are read from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from raddino.data.shard_format import IMAGE_EXT, ShardMember, read_shard
from raddino.errors import RaddinoError
from raddino.eval.datasets.base import EvalDataset, EvalSplit, ShardImages
from raddino.eval.datasets.rows import Rows, TableSpec, preset_splits, split_assignment, table_labels


@dataclass(frozen=True)
class ShardsSpec(TableSpec):
    """A shard directory (``path``); labels and splits as in :class:`TableSpec` (``split_lists`` list shard keys)."""

    kind: ClassVar[str] = "shards"


def _index_shards(spec: ShardsSpec, directory: Path) -> tuple[list[str], list[ShardMember], list[dict[str, str]]]:
    """Keys, PNG members and flattened JSON records (``meta`` fields first) of every sample in the shards."""
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise spec.not_found(directory / "shard-000000.tar", "shard files (*.tar)")
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


def load_shards(spec: ShardsSpec, *, data_root: Path | None) -> EvalDataset:
    directory = spec.resolve(spec.path, data_root)
    if not directory.is_dir():
        raise spec.not_found(directory, "shard directory")
    keys, members, records = _index_shards(spec, directory)
    data = Rows(rows=records, source=directory.name)
    for row, key in zip(records, keys, strict=True):
        row["\x00path"] = key
    preset = preset_splits(spec, data, preset=[None] * len(records), data_root=data_root)
    labels, task, names = table_labels(spec, data)
    assignment = split_assignment(spec, data, labels=labels, task=task, preset=preset)
    splits = {
        s: EvalSplit(images=ShardImages([members[i] for i in idx], [keys[i] for i in idx]), labels=labels[idx])
        for s, idx in assignment.items()
    }
    return EvalDataset(name=spec.name, task=task, label_names=names, splits=splits)
