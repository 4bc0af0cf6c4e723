"""Evaluation datasets: MedMNIST npz, class folders, CSV manifests, labelled shards, label-efficiency subsets."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raddino.errors import RaddinoError
from raddino.eval.datasets.base import carve_validation, label_subset, random_splits
from raddino.eval.datasets.csv import CsvSpec
from raddino.eval.datasets.folder import FolderSpec
from raddino.eval.datasets.medmnist import MedmnistSpec
from raddino.eval.datasets.registry import KINDS, load_dataset
from raddino.eval.datasets.shards import ShardsSpec


def _png(path: Path, value: int, size: int = 12, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3) if rgb else (size, size), value, dtype=np.uint8)
    Image.fromarray(array).save(path)


def _npz(path: Path, *, n: int = 20, labels_width: int = 1, rgb: bool = False) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, labels_width)).astype(np.uint8)
        arrays[f"{split}_labels"][:2] = [[0] * labels_width, [1] * labels_width]  # both classes everywhere
    np.savez(path, **arrays)


# ---- MedMNIST ------------------------------------------------------------------------------------------------


def test_medmnist_binary_multilabel_and_rgb(tmp_path: Path):
    _npz(tmp_path / "pneu.npz")
    _npz(tmp_path / "chest.npz", labels_width=14)
    _npz(tmp_path / "derma.npz", rgb=True)
    binary = load_dataset(MedmnistSpec(name="pneu", path="pneu.npz"), data_root=tmp_path)
    assert binary.task == "binary" and binary.splits["train"].labels.shape == (20,)
    assert binary.splits["test"].images.load(3).shape == (8, 8)
    chest = load_dataset(MedmnistSpec(name="chest", path=str(tmp_path / "chest.npz")))
    assert chest.task == "multilabel" and chest.splits["val"].labels.shape == (20, 14)
    derma = load_dataset(MedmnistSpec(name="derma", path=str(tmp_path / "derma.npz")))
    assert derma.splits["train"].images.load(0).shape == (8, 8, 3)  # colour is kept


def test_medmnist_errors_name_the_file_and_key(tmp_path: Path):
    with pytest.raises(RaddinoError, match="missing.npz"):
        load_dataset(MedmnistSpec(name="x", path=str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(RaddinoError, match="train_labels"):
        load_dataset(MedmnistSpec(name="x", path=str(tmp_path / "bad.npz")))


def test_real_pneumoniamnist_official_splits(pneumoniamnist: Path):
    dataset = load_dataset(MedmnistSpec(name="pneumoniamnist", path=str(pneumoniamnist)))
    assert {s: len(dataset.splits[s]) for s in ("train", "val", "test")} == {"train": 4708, "val": 524, "test": 624}
    assert dataset.task == "binary"


# ---- class folders -------------------------------------------------------------------------------------------


def test_folder_kermany_layout_and_carved_validation(tmp_path: Path):
    root = tmp_path / "chest_xray"
    for split, n in (("train", 10), ("test", 4)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(n):
                _png(root / split / name / f"{i}.png", 50 + label * 100)
    dataset = load_dataset(FolderSpec(name="kermany", path=str(root), val_fraction=0.2))
    assert dataset.label_names == ["NORMAL", "PNEUMONIA"] and dataset.task == "binary"
    assert len(dataset.splits["val"]) == 4 and len(dataset.splits["train"]) == 16  # 20 % of each class
    assert np.bincount(dataset.splits["val"].labels).tolist() == [2, 2]
    image = dataset.splits["test"].images.load(5)
    label = dataset.splits["test"].labels[5]
    assert image.shape == (12, 12) and image[0, 0] == 50 + label * 100
    with pytest.raises(RaddinoError, match="'test' folder"):
        (root / "test").rename(tmp_path / "elsewhere")
        load_dataset(FolderSpec(name="kermany", path=str(root)))


# ---- CSV manifests -------------------------------------------------------------------------------------------


def test_csv_with_split_column_and_missing_column_error(tmp_path: Path):
    rows = ["path,label,split"]
    for i in range(30):
        split = ("train", "valid", "test")[i % 3]
        _png(tmp_path / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,{i % 2},{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    dataset = load_dataset(CsvSpec(name="m", path=str(tmp_path / "manifest.csv"), split_column="split"))
    assert [len(dataset.splits[s]) for s in ("train", "val", "test")] == [10, 10, 10]
    assert dataset.splits["val"].images.load(0)[0, 0] == 1  # row 1 is the first "valid" row
    with pytest.raises(RaddinoError, match="label column\\(s\\) not found: Finding"):
        load_dataset(CsvSpec(name="m", path=str(tmp_path / "manifest.csv"), label_columns=("Finding",)))
    (tmp_path / "img" / "4.png").unlink()
    with pytest.raises(RaddinoError, match="4.png"):
        load_dataset(CsvSpec(name="m", path=str(tmp_path / "manifest.csv"), split_column="split"))


def test_csv_one_hot_class_columns_with_task_multiclass(tmp_path: Path):
    rows = ["path,A,B,C,split"]
    for i in range(18):
        _png(tmp_path / f"{i}.png", i)
        hot = ",".join("1.0" if k == i % 3 else "0.0" for k in range(3))
        rows.append(f"{i}.png,{hot},{('train', 'val', 'test')[(i // 3) % 3]}")
    manifest = tmp_path / "gt.csv"
    manifest.write_text("\n".join(rows) + "\n")
    spec = CsvSpec(
        name="isic", path=str(manifest), label_columns=("A", "B", "C"), task="multiclass", split_column="split"
    )
    dataset = load_dataset(spec)
    assert dataset.task == "multiclass" and dataset.label_names == ["A", "B", "C"]
    train = dataset.splits["train"]
    assert [int(train.images.load(i)[0, 0]) % 3 for i in range(len(train))] == train.labels.tolist()
    assert load_dataset(dataclasses.replace(spec, task=None)).task == "multilabel"  # without task: independent labels
    manifest.write_text("\n".join([*rows, "2.png,1.0,1.0,0.0,train"]) + "\n")
    with pytest.raises(RaddinoError, match="row 19 has 2 of the one-hot class columns A, B, C set"):
        load_dataset(spec)


def test_csv_nih_style_delimited_labels_split_lists_and_subfolders(tmp_path: Path):
    findings = ["Atelectasis|Effusion", "No Finding", "Effusion", "Atelectasis"]
    rows = ["Image Index,Finding Labels,Patient ID"]
    for i in range(24):
        name = f"{i:08d}_000.png"
        _png(tmp_path / f"images_{i % 3:03d}" / "images" / name, i)
        rows.append(f"{name},{findings[i % 4]},{i // 2}")
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(f"{i:08d}_000.png" for i in range(16)) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(f"{i:08d}_000.png" for i in range(16, 24)) + "\n")
    spec = CsvSpec(
        name="nih",
        path="Data_Entry_2017.csv",
        path_column="Image Index",
        label_columns=("Finding Labels",),
        label_delimiter="|",
        classes=("Atelectasis", "Effusion"),
        search_subdirs=True,
        split_lists={"train": "train_val_list.txt", "test": "test_list.txt"},
        group_column="Patient ID",
        val_fraction=0.25,
    )
    dataset = load_dataset(spec, data_root=tmp_path)
    assert dataset.task == "multilabel" and len(dataset.splits["test"]) == 8
    assert len(dataset.splits["train"]) + len(dataset.splits["val"]) == 16
    np.testing.assert_array_equal(dataset.splits["test"].labels[:4], [[1, 1], [0, 0], [0, 1], [1, 0]])
    # patients (two images each) never straddle train and val
    train_files = {p.name for p in dataset.splits["train"].images.paths}
    val_files = {p.name for p in dataset.splits["val"].images.paths}
    patients = lambda files: {int(f[:8]) // 2 for f in files}  # noqa: E731
    assert not patients(train_files) & patients(val_files)


def test_csv_chexpert_style_value_map_and_split_files(tmp_path: Path):
    header = "Path,Sex,Atelectasis,Edema"
    values = ["1.0,0.0", "-1.0,", "0.0,1.0", ",-1.0"]
    for split, n in (("train", 8), ("valid", 4)):
        lines = [header]
        for i in range(n):
            _png(tmp_path / "CheXpert" / split / f"p{i}.png", i)
            lines.append(f"CheXpert/{split}/p{i}.png,Male,{values[i % 4]}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    spec = CsvSpec(
        name="chexpert",
        split_files={"train": "train.csv", "test": "valid.csv"},
        path_column="Path",
        label_columns=("Atelectasis", "Edema"),
        value_map={"": 0.0, "-1.0": 1.0},  # U-Ones
        image_root=".",
        val_fraction=0.25,
    )
    dataset = load_dataset(spec, data_root=tmp_path)
    np.testing.assert_array_equal(dataset.splits["test"].labels, [[1, 0], [1, 0], [0, 1], [0, 1]])
    assert len(dataset.splits["val"]) == 2 and len(dataset.splits["train"]) == 6
    with pytest.raises(RaddinoError, match="non-numeric value ''"):
        load_dataset(dataclasses.replace(spec, value_map=None), data_root=tmp_path)


def test_csv_aggregate_rows_rsna_style(tmp_path: Path):
    rows = ["patientId,x,Target"]
    for i in range(12):
        _png(tmp_path / f"{i}.png", i)
        rows.append(f"{i},,{i % 2}")
        if i % 2:
            rows.append(f"{i},10,1")  # a second box for positive patients
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = CsvSpec(
        name="rsna",
        path=str(tmp_path / "labels.csv"),
        path_format="{patientId}.png",
        label_columns=("Target",),
        aggregate_by="patientId",
        split_fractions=(0.5, 0.25, 0.25),
    )
    dataset = load_dataset(spec)
    assert sum(len(s) for s in dataset.splits.values()) == 12
    assert dataset.task == "binary"


# ---- labelled shards -----------------------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[tuple[str, int, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, value, meta in samples:
            buffer = io.BytesIO()
            Image.fromarray(np.full((10, 10), value, dtype=np.uint8)).save(buffer, format="PNG")
            record = json.dumps({"format": "png", "size": [10, 10], "meta": meta}).encode()
            for ext, data in (("png", buffer.getvalue()), ("json", record)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shards_with_label_and_split_fields(tmp_path: Path):
    samples = [(f"{i:032x}", i, {"label": str(i % 2), "split": ("train", "val", "test")[i % 3]}) for i in range(18)]
    _write_shard(tmp_path / "shard-000000.tar", samples[:10])
    _write_shard(tmp_path / "shard-000001.tar", samples[10:])
    dataset = load_dataset(ShardsSpec(name="s", path=str(tmp_path), split_column="split"))
    assert [len(dataset.splits[s]) for s in ("train", "val", "test")] == [6, 6, 6]
    test = dataset.splits["test"]
    for i in range(len(test)):
        value = int(test.images.load(i)[0, 0])
        assert value % 3 == 2 and test.labels[i] == value % 2
    with pytest.raises(RaddinoError, match="label column\\(s\\) not found: sex"):
        load_dataset(ShardsSpec(name="s", path=str(tmp_path), label_columns=("sex",)))
    with pytest.raises(RaddinoError, match="shard"):
        load_dataset(ShardsSpec(name="s", path=str(tmp_path / "nothing")))


# ---- specs ---------------------------------------------------------------------------------------------------


def test_each_kind_has_only_its_own_fields():
    common = {"name", "path", "task", "classes", "description"}
    table = {"label_columns", "label_delimiter", "value_map", "split_column", "split_values", "split_lists"}
    table |= {"group_column", "val_fraction", "split_fractions", "seed"}
    csv_only = {"path_column", "path_format", "image_root", "search_subdirs", "split_files", "where", "aggregate_by"}
    csv_only |= {"where_not", "header", "missing_images"}
    fields = {cls.kind: {f.name for f in dataclasses.fields(cls)} for cls, _ in KINDS.values()}
    assert fields == {
        "medmnist": common,
        "folder": common | {"val_fraction", "split_fractions", "seed"},
        "csv": common | table | csv_only,
        "shards": common | table,
    }


def test_spec_checks_per_kind():
    with pytest.raises(RaddinoError, match="dataset k: val_fraction must be in \\(0, 1\\), got 1.5"):
        FolderSpec(name="k", path="root", val_fraction=1.5)
    with pytest.raises(RaddinoError, match="dataset p: unknown task 'ordinal'"):
        MedmnistSpec(name="p", path="p.npz", task="ordinal")
    with pytest.raises(RaddinoError, match="dataset p: set 'path'$"):
        MedmnistSpec(name="p")
    with pytest.raises(RaddinoError, match="set 'path' \\(or 'split_files' for a csv dataset\\)"):
        CsvSpec(name="c")
    assert CsvSpec(name="c", split_files={"train": "a.csv", "test": "b.csv"}).path == ""
    with pytest.raises(RaddinoError, match="split_files keys must be train/val/test, got \\['valid'\\]"):
        CsvSpec(name="c", split_files={"train": "a.csv", "valid": "b.csv"})
    with pytest.raises(RaddinoError, match="split_lists keys must be train/val/test"):
        ShardsSpec(name="s", path="s", split_lists={"dev": "d.txt"})
    with pytest.raises(RaddinoError, match="split_fractions needs 3 positive values"):
        ShardsSpec(name="s", path="s", split_fractions=(0.8, 0.2))


# ---- subsets -------------------------------------------------------------------------------------------------


def test_label_subsets_are_stratified_seed_stable_and_nested():
    labels = np.array([0] * 900 + [1] * 100)
    ten = label_subset(labels, fraction=0.1, seed=3, task="binary")
    assert np.bincount(labels[ten]).tolist() == [90, 10]
    one = label_subset(labels, fraction=0.01, seed=3, task="binary")
    assert np.bincount(labels[one]).tolist() == [9, 1]
    assert set(one) <= set(ten)  # nested for one seed
    np.testing.assert_array_equal(one, label_subset(labels, fraction=0.01, seed=3, task="binary"))
    assert set(label_subset(labels, fraction=0.1, seed=4, task="binary")) != set(ten)
    np.testing.assert_array_equal(label_subset(labels, fraction=1.0, seed=0, task="binary"), np.arange(1000))


def test_multilabel_subset_keeps_rare_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 3)) < [0.3, 0.1, 0.005]).astype(int)
    subset = label_subset(labels, fraction=0.05, seed=0, task="multilabel")
    assert labels[subset, 2].sum() >= 1  # the rarest label survives a 5 % subset
    assert abs(len(subset) - 100) <= 3


def test_random_splits_partition_and_groups():
    labels = np.arange(100) % 2
    splits = random_splits(labels, fractions=(0.7, 0.1, 0.2), seed=0, groups=None, task="binary")
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(100))
    assert len(splits["test"]) == 20 and len(splits["val"]) == 10
    groups = np.arange(100) // 4
    train, val = carve_validation(labels, fraction=0.2, seed=0, groups=groups, task="binary")
    assert not set(groups[train]) & set(groups[val])


def test_reads_shards_written_by_the_shard_builder(tmp_path: Path):
    from raddino.data.preprocess import PreprocessOptions
    from raddino.data.shard import build_shards
    from raddino.data.shard_inputs import collect_inputs

    rows = ["path,label,split"]
    for i in range(12):
        array = np.zeros((20, 20), dtype=np.uint8)
        array[: 2 + i] = 255  # distinct, non-constant images
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]}")
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
    inputs = collect_inputs(tmp_path / "in.csv", carry=("label", "split"))
    build_shards(inputs, out_dir=tmp_path / "shards", options=PreprocessOptions(size=16), key_map=tmp_path / "k.csv")
    dataset = load_dataset(ShardsSpec(name="s", path=str(tmp_path / "shards"), split_column="split"))
    assert [len(dataset.splits[s]) for s in ("train", "val", "test")] == [4, 4, 4]
    assert sorted(dataset.splits["train"].labels.tolist()) == [0, 0, 1, 1]
    assert dataset.splits["test"].images.load(0).shape == (16, 16)
