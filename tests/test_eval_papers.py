"""The paper suites (eval/huix2024.yaml, eval/huang2024.yaml) on tiny generated datasets in each paper's download
layout (CSV + PNG / JPEG / DICOM, class folders), end to end on random-init / raw-pixel backbones, and their
published reference rows in the report."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from raddino.cli import main
from raddino.errors import RaddinoError
from raddino.eval.datasets.registry import load_dataset
from raddino.eval.finetune import TrainSchedule
from raddino.eval.published import PublishedRow, published_from_dict
from raddino.eval.report import write_report
from raddino.eval.runner import RunOptions, SuiteRunner
from raddino.eval.suite import BackboneEntry, load_suite, suite_from_dict

REPO = Path(__file__).resolve().parents[1]
HUIX = REPO / "eval" / "huix2024.yaml"
HUANG = REPO / "eval" / "huang2024.yaml"


def _image(rng: np.random.Generator, label: int, *, colour: bool = False, size: int = 20) -> np.ndarray:
    """A noisy image whose brightness rises with ``label`` (a signal every probe can find)."""
    image = rng.normal(90 + 50 * label, 15, (size, size, 3) if colour else (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal single-frame 16-bit MONOCHROME2 mammogram-like DICOM."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (pixels.astype(np.uint16) * 200).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_csv(path: Path, header: list[str] | None, rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_huix_data(root: Path, *, n: int = 40, seed: int = 0) -> None:
    """APTOS2019, CBIS-DDSM (mass + calc, DICOM), ISIC2016 (headerless CSVs), ISIC2019 (one-hot) and CheXpert-small
    under ``root``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        grade = i % 5
        _save(root / "aptos2019" / "train_images" / f"id{i:03d}.png", _image(rng, grade // 2, colour=True))
        rows.append([f"id{i:03d}", grade])
    _write_csv(root / "aptos2019" / "train.csv", ["id_code", "diagnosis"], rows)
    pathologies = ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")
    for kind in ("mass", "calc"):
        for split, tag in (("train", "Training"), ("test", "Test")):
            rows = []
            for i in range(n if split == "train" else n // 2):  # enough training patients for a 10 % val carve
                pathology = pathologies[i % 3]
                image = f"{kind.title()}-{tag}_P_{i:05d}_LEFT_CC/1.3.6.1/1.3.6.2/000000.dcm"
                _write_dicom(root / "cbis-ddsm" / image, _image(rng, int(pathology == "MALIGNANT")))
                rows.append([f"P_{i:05d}", 1, pathology, image])
                if i % 4 == 0:  # a second, benign abnormality on the same image: the image stays as it was
                    rows.append([f"P_{i:05d}", 2, "BENIGN", image])
            header = ["patient_id", "abnormality id", "pathology", "image file path"]
            _write_csv(root / "cbis-ddsm" / f"{kind}_case_description_{split}_set.csv", header, rows)
    for split, folder in (("Training", "ISBI2016_ISIC_Part3_Training_Data"), ("Test", "ISBI2016_ISIC_Part3_Test_Data")):
        rows = []
        for i in range(n):
            name, malignant = f"ISIC_{split[:2]}{i:05d}", i % 3 == 0
            _save(root / "isic2016" / folder / f"{name}.jpg", _image(rng, int(malignant), colour=True))
            label = ("malignant" if malignant else "benign") if split == "Training" else float(malignant)
            rows.append([name, label])
        _write_csv(root / "isic2016" / f"ISBI2016_ISIC_Part3_{split}_GroundTruth.csv", None, rows)
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = []
    for i in range(n * 2):  # every class (UNK never) often enough for an 80 / 10 / 10 stratified carve
        label = i % 8
        _save(root / "isic2019" / "ISIC_2019_Training_Input" / f"ISIC_{i:07d}.jpg", _image(rng, label % 2, colour=True))
        rows.append([f"ISIC_{i:07d}", *("1.0" if k == label else "0.0" for k in range(9))])
    _write_csv(root / "isic2019" / "ISIC_2019_Training_GroundTruth.csv", ["image", *classes], rows)
    findings = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    for split in ("train", "valid"):
        rows = []
        for i in range(n):
            path = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg"
            labels = [(i + k) % 3 == 0 for k in range(5)]
            _save(root / path, _image(rng, int(labels[0])))
            values = [("1.0" if v else ("-1.0" if k == 2 and i % 7 == 0 else "")) for k, v in enumerate(labels)]
            rows.append([path, "Frontal" if i % 10 else "Lateral", *values])
        _write_csv(root / "CheXpert-v1.0-small" / f"{split}.csv", ["Path", "Frontal/Lateral", *findings], rows)


def write_huang_data(root: Path, *, n: int = 40, seed: int = 1) -> None:
    """Kermany's chest_xray/ class folders, iChallenge-AMD Training400/ and HAM10000 (CSV + two image folders)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(n // 2):
                _save(root / "chest_xray" / split / name / f"{split}{i:03d}.jpeg", _image(rng, label))
    for label, name in enumerate(("Non-AMD", "AMD")):
        for i in range(n // 2):
            _save(
                root / "ichallenge-amd" / "Training400" / name / f"{name[0]}{i:04d}.jpg",
                _image(rng, label, colour=True),
            )
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    rows = []
    for i in range(3 * n):
        dx = classes[i % 7]
        part = 1 + i % 2
        _save(
            root / "ham10000" / f"HAM10000_images_part_{part}" / f"ISIC_{i:07d}.jpg",
            _image(rng, i % 7 // 3, colour=True),
        )
        rows.append([f"HAM_{i // 2:07d}", f"ISIC_{i:07d}", dx, "histo", 50, "male", "back"])
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    _write_csv(root / "ham10000" / "HAM10000_metadata.csv", header, rows)


FAST = TrainSchedule(epochs=1, lr=1e-3, batch_size=16, patience=1)


def _cells(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (as cell lists) of the table under ``heading``."""
    block = markdown.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[1:]


def test_paper_suites_parse_with_published_rows_aligned_to_their_backbones():
    for path, n_backbones in ((HUIX, 8), (HUANG, 6)):
        suite = load_suite(path)
        assert len(suite.backbones) == n_backbones
        labels = {b.label for b in suite.backbones}
        datasets = {d.name for d in suite.datasets}
        assert suite.published and {r.backbone for r in suite.published} == labels
        assert {r.dataset for r in suite.published} == datasets
        assert {r.protocol for r in suite.published} <= set(suite.protocols)
        # no number was found verbatim in the papers' text: every cell is empty and says so
        assert all(r.value is None and r.note for r in suite.published)
    assert "glioma" not in {d.name for d in load_suite(HUANG).datasets}


def test_published_rows_are_strict():
    base = {"paper": "P", "model": "M", "backbone": "b", "dataset": "d", "protocol": "linear", "metric": "auroc"}
    with pytest.raises(RaddinoError, match="unknown key\\(s\\) vaule"):
        published_from_dict({**base, "vaule": 0.8}, "suite x")
    with pytest.raises(RaddinoError, match="needs its 'table' and 'page'"):
        published_from_dict({**base, "value": 0.8}, "suite x")
    with pytest.raises(RaddinoError, match="fraction in \\[0, 1\\], got 85.3"):
        published_from_dict({**base, "value": 85.3, "table": "Table 2", "page": 5}, "suite x")
    with pytest.raises(RaddinoError, match="add a 'note'"):
        published_from_dict(base, "suite x")
    with pytest.raises(RaddinoError, match="unknown metric 'kappa'"):
        published_from_dict({**base, "metric": "kappa", "note": "n"}, "suite x")
    payload = {
        "datasets": [{"name": "d", "kind": "medmnist", "path": "p.npz"}],
        "backbones": [{"spec": "pixels", "name": "b"}],
        "published": [{**base, "backbone": "other", "note": "n"}],
    }
    with pytest.raises(RaddinoError, match="backbone 'other' is no backbone label of the suite"):
        suite_from_dict(payload, name="x")
    payload["published"] = [{**base, "dataset": "nope", "note": "n"}]
    with pytest.raises(RaddinoError, match="dataset 'nope' is not in the suite"):
        suite_from_dict(payload, name="x")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (HUIX, ["aptos2019/train.csv", "kaggle.com/competitions/aptos2019"]),
        (HUIX, ["mass_case_description_train_set.csv", "cancerimagingarchive.net"]),
        (HUIX, ["ISBI2016_ISIC_Part3_Training_GroundTruth.csv", "challenge.isic-archive.com"]),
        (HUANG, ["chest_xray", "kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia"]),
        (HUANG, ["Training400", "refuge.grand-challenge.org"]),
        (HUANG, ["HAM10000_metadata.csv", "challenge.isic-archive.com"]),
    ],
)
def test_absent_data_names_the_file_and_the_download_page(tmp_path: Path, path: Path, expected: list[str]):
    suite = load_suite(path)
    messages = []
    for spec in suite.datasets:
        with pytest.raises(RaddinoError) as err:
            load_dataset(spec, data_root=tmp_path)
        messages.append(str(err.value))
    assert any(all(e in m for e in expected) for m in messages), messages


def test_absent_data_is_a_cli_error(tmp_path: Path, capsys):
    code = main(["eval", "--suite", str(HUANG), "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "chest_xray" in err and "kaggle.com" in err and "docs/EVAL.md" in err


def test_huix_suite_end_to_end_with_published_rows_in_the_report(tmp_path: Path):
    write_huix_data(tmp_path)
    shipped = load_suite(HUIX)
    loaded = {spec.name: load_dataset(spec, data_root=tmp_path) for spec in shipped.datasets}
    assert loaded["aptos2019"].task == "multiclass" and loaded["chexpert"].task == "multilabel"
    mass = loaded["cbis_ddsm_mass"]
    assert mass.task == "binary" and mass.label_names == ["benign", "malignant"]
    assert sum(len(s) for s in mass.splits.values()) == 60  # 40 + 20 images; second abnormalities merged
    assert mass.splits["test"].images.load(0).dtype == np.float32  # DICOM pixels, min-max scaled
    isic = loaded["isic2016"]
    assert len(isic.splits["test"]) == 40 and isic.splits["test"].labels.sum() == 14  # words and numbers mapped
    isic19 = loaded["isic2019"]  # one-hot columns -> class indices
    assert isic19.task == "multiclass" and isic19.label_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert {s: len(v) for s, v in isic19.splits.items()} == {"train": 64, "val": 8, "test": 8}
    assert all(np.bincount(v.labels, minlength=8).tolist() == [len(v) // 8] * 8 for v in isic19.splits.values())
    # two of the suite's backbone labels, played by cheap stand-ins, so their published rows align
    backbones = (
        BackboneEntry(spec="pixels:8", name="DINOv2 ViT-B/14"),
        BackboneEntry(spec="timm:vit_tiny_patch16_224", random_init=True, img_size=32, name="ImageNet ViT-B/16"),
    )
    synthetic = PublishedRow(  # test data, not a paper's number: checks the value, the source and the difference
        paper="Synthetic 2099",
        model="Made-up",
        backbone="DINOv2 ViT-B/14",
        dataset="isic2016",
        protocol="finetune_frozen",
        metric="accuracy",
        value=0.625,
        table="Table 9",
        page="99",
    )
    suite = dataclasses.replace(
        shipped, backbones=backbones, finetune=FAST, n_bootstrap=50, published=(*shipped.published, synthetic)
    )
    out = tmp_path / "out"
    records = SuiteRunner(suite, RunOptions(out_dir=out, data_root=tmp_path)).run()
    protocols = {(r.backbone, r.protocol) for r in records}
    assert ("ImageNet ViT-B/16", "finetune_unfrozen") in protocols and ("DINOv2 ViT-B/14", "linear") in protocols
    write_report(records, out, title="huix", plots=False, published=suite.published, report_metrics=("accuracy",))
    markdown = (out / "results.md").read_text()
    header, rows = _cells(markdown, "## finetune_frozen · cls · 100% of training labels")
    assert header[0] == "backbone" and header[1:] == [
        "aptos2019 (auroc)",
        "cbis_ddsm_mass (auroc)",
        "cbis_ddsm_calc (auroc)",
        "isic2016 (auroc)",
        "isic2019 (auroc)",
        "chexpert (auroc)",
    ]
    names = [r[0] for r in rows]
    dino = names.index("DINOv2 ViT-B/14")
    # the paper's rows sit right under the measured row they belong to
    assert names[dino + 1].startswith("↳ published: DINOv2 (ViT-B) (Huix et al. 2024 (WACV))")
    # every cell empty, and says so, under the metric of the authors' code for that dataset
    assert rows[dino + 1][1:] == [
        f"– ({metric}: no published value)"
        for metric in ("kappa_quadratic", "auroc", "auroc", "auroc", "balanced_accuracy", "auroc")
    ]
    made_up = next(r for r in rows if r[0].startswith("↳ published: Made-up"))
    assert names.index(made_up[0]) > dino and "Synthetic 2099, Table 9, p. 99" in made_up[0]
    measured = next(
        r for r in records if (r.backbone, r.dataset, r.protocol) == ("DINOv2 ViT-B/14", "isic2016", "finetune_frozen")
    )
    column = header.index("isic2016 (auroc)")
    assert made_up[column] == f"0.625 accuracy · Δ {measured.metrics['accuracy'] - 0.625:+.3f}"
    assert [made_up[i] for i in range(1, len(header)) if i != column] == [""] * (len(header) - 2)
    vit = names.index("ImageNet ViT-B/16")
    assert names[vit + 1].startswith("↳ published: ImageNet (ViT-B/16)")
    # rows of backbones that did not run here are listed, not lost
    assert "## Published rows without a measured row" in markdown and "| SAM | SAM ViT-B | aptos2019 |" in markdown
    with open(out / "published.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(suite.published)
    row = next(r for r in table if r["model"] == "Made-up")
    assert float(row["difference"]) == pytest.approx(measured.metrics["accuracy"] - 0.625)
    empty = next(r for r in table if r["model"] == "SAM")
    assert empty["published"] == "" and math.isnan(float(empty["measured"]))


def test_huang_suite_end_to_end(tmp_path: Path):
    write_huang_data(tmp_path)
    shipped = load_suite(HUANG)
    amd = load_dataset(shipped.datasets[1], data_root=tmp_path)
    assert amd.label_names == ["Non-AMD", "AMD"] and {s: len(v) for s, v in amd.splits.items()} == {
        "train": 26,
        "val": 6,
        "test": 8,
    }
    ham = load_dataset(shipped.datasets[2], data_root=tmp_path)
    assert ham.task == "multiclass" and sum(len(v) for v in ham.splits.values()) == 120
    lesions = {s: {int(p.stem.removeprefix("ISIC_")) // 2 for p in v.images.paths} for s, v in ham.splits.items()}
    assert not (lesions["train"] & lesions["test"]) and not (lesions["val"] & lesions["test"])  # by lesion_id
    suite = dataclasses.replace(
        shipped, backbones=(BackboneEntry(spec="pixels:8", name="DINOv2 ViT-S/14"),), finetune=FAST, n_bootstrap=50
    )
    records = SuiteRunner(suite, RunOptions(out_dir=tmp_path / "out", data_root=tmp_path)).run()
    frozen = {r.dataset: r for r in records if r.protocol == "finetune_frozen"}
    assert set(frozen) == {"chest_xray", "ichallenge_amd", "ham10000"}
    assert all({"accuracy", "f1_weighted"} <= set(r.metrics) for r in frozen.values())
    assert frozen["chest_xray"].n_train == 32  # 80 % of 40 training images (no val/ folder)
    write_report(records, tmp_path / "out", title="huang", plots=False, published=suite.published)
    markdown = (tmp_path / "out" / "results.md").read_text()
    _, rows = _cells(markdown, "## finetune_frozen · cls · 100% of training labels")
    assert rows[0][0] == "DINOv2 ViT-S/14" and rows[1][0].startswith("↳ published: DINOv2 ViT-S/14 (Huang et al. 2024")


def test_add_backbone_keeps_the_suite_backbones_and_their_published_rows():
    import argparse

    from raddino.commands.eval import _suite_from_args, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--suite", str(HUANG), "--add-backbone", "ours:runs/cxr"])
    suite = _suite_from_args(args)
    shipped = load_suite(HUANG)
    assert suite.backbones == (*shipped.backbones, BackboneEntry(spec="ours:runs/cxr"))
    assert suite.published == shipped.published


def test_a_published_row_is_compared_with_each_feature_table_it_sits_in():
    from raddino.eval.report import markdown, summarise
    from raddino.eval.runner import EvalRecord

    def record(features: str, auroc: float) -> EvalRecord:
        return EvalRecord(
            backbone="b",
            dataset="d",
            task="binary",
            protocol="linear",
            features=features,
            fraction=1.0,
            seed=0,
            n_train=10,
            n_test=10,
            metrics={"auroc": auroc},
            ci={"auroc": (auroc - 0.1, auroc + 0.05)},
            param_name="C",
            best_param=1.0,
            threshold=0.5,
            seconds=0.1,
        )

    row = PublishedRow(  # test data, not a paper's number
        paper="Synthetic 2099",
        model="M",
        backbone="b",
        dataset="d",
        protocol="linear",
        metric="auroc",
        value=0.7,
        table="Table 1",
        page="2",
    )
    text = markdown(summarise([record("cls", 0.75), record("cls_mean", 0.65)]), title="t", published=[row])
    cls, cls_mean = text.split("## linear · cls_mean")
    assert "| ↳ published: M (Synthetic 2099, Table 1, p. 2) | 0.700 auroc · Δ +0.050 |" in cls
    assert "| ↳ published: M (Synthetic 2099, Table 1, p. 2) | 0.700 auroc · Δ -0.050 |" in cls_mean
    assert "without a measured row" not in text
