"""Patient-attribute probes (sex, age, view from CSV metadata) with the shipped suite eval/cxr_covid_attributes.yaml,
on generated data in the COVID-19 image collection's layout: a planted signal is found, none is found without it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from raddino.errors import RaddinoError
from raddino.eval.datasets.registry import load_dataset
from raddino.eval.report import write_report
from raddino.eval.runner import RunOptions, SuiteRunner
from raddino.eval.suite import BackboneEntry, load_suite

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "eval" / "cxr_covid_attributes.yaml"
VIEWS = ("PA", "AP", "AP Supine", "L")
HEADER = "Patientid,offset,sex,age,finding,view,modality,filename"


def _write_sample(root: Path, *, signal: bool, n: int = 180, seed: int = 0) -> dict[str, int]:
    """``root/cxr-covid-sample/{metadata.csv, images/}`` with ``n`` X-ray rows plus rows the suite must drop (CT,
    no sex, no age, an image that is not there); with ``signal`` sex sets the brightness, age the left-right
    gradient and the view which quadrant is bright. Returns the usable rows per attribute."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "cxr-covid-sample"
    (folder / "images").mkdir(parents=True)
    lines = [HEADER]
    usable = {"sex": 0, "age": 0, "view": 0}
    for i in range(n):
        sex, age, view = "FM"[i % 2], int(rng.integers(20, 90)), VIEWS[int(rng.integers(0, 4))]
        image = rng.normal(100, 20, (16, 16))
        if signal:
            image += 40 * (sex == "M") + np.linspace(0, 1.5 * age - 60, 16)[None, :]
            quadrant = {"PA": (0, 0), "AP": (0, 8), "AP Supine": (0, 8), "L": (8, 0)}[view]
            image[quadrant[0] : quadrant[0] + 8, quadrant[1] : quadrant[1] + 8] += 60
        name = f"img{i:03d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / name)
        missing_sex, missing_age = i % 17 == 5, i % 13 == 4
        lines.append(
            f"{i // 2},0,{'' if missing_sex else sex},{'' if missing_age else age},COVID-19,{view},X-ray,{name}"
        )
        usable["sex"] += not missing_sex
        usable["age"] += not missing_age
        usable["view"] += 1
    lines += ["900,0,M,50,COVID-19,Axial,CT,ct.png", "901,0,F,40,COVID-19,PA,X-ray,absent.png"]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return usable


def _run(tmp_path: Path, suite_backbones: tuple[BackboneEntry, ...]) -> dict[str, object]:
    suite = dataclasses.replace(load_suite(SUITE), backbones=suite_backbones, n_bootstrap=200)
    out = tmp_path / "out"
    records = SuiteRunner(suite, RunOptions(out_dir=out, data_root=tmp_path)).run()
    write_report(records, out, title="attributes", plots=False, report_metrics=suite.report_metrics)
    return {r.dataset: r for r in records} | {"md": (out / "results.md").read_text()}


PIXELS = (BackboneEntry(spec="pixels:8", name="raw pixels"),)


def test_attribute_probes_find_a_planted_signal(tmp_path: Path):
    usable = _write_sample(tmp_path, signal=True)
    suite = load_suite(SUITE)
    for spec, attribute in zip(suite.datasets, ("sex", "age", "view"), strict=True):
        dataset = load_dataset(spec, data_root=tmp_path)  # CT rows, empty values and the absent image are dropped
        assert sum(len(s) for s in dataset.splits.values()) == usable[attribute], attribute
    view = load_dataset(suite.datasets[2], data_root=tmp_path)
    assert view.label_names == ["PA", "AP", "lateral"] and view.task == "multiclass"  # AP Supine counts as AP
    by = _run(tmp_path, PIXELS)
    sex, age, view_record = by["covid_sex"], by["covid_age"], by["covid_view"]
    assert sex.task == "binary" and sex.metrics["auroc"] > 0.9
    assert age.task == "regression" and age.metrics["pearson_r"] > 0.8
    assert age.ci["pearson_r"][0] > 0.5 and age.ci["mae"][0] < age.metrics["mae"] < age.ci["mae"][1]
    assert age.metrics["mae"] < 10  # ages span 20-89 (a constant guess: ~17)
    assert view_record.metrics["auroc"] > 0.9
    for table in ("### mae", "### pearson_r", "covid_age (r2)", "covid_sex (auroc)"):
        assert table in by["md"]


def test_attribute_probes_find_nothing_without_a_signal(tmp_path: Path):
    _write_sample(tmp_path, signal=False)
    by = _run(tmp_path, PIXELS)
    sex, age, view = by["covid_sex"], by["covid_age"], by["covid_view"]
    assert abs(sex.metrics["auroc"] - 0.5) < 0.2 and sex.ci["auroc"][0] < 0.5 < sex.ci["auroc"][1]
    assert abs(age.metrics["pearson_r"]) < 0.4 and age.ci["pearson_r"][0] < 0.3
    assert age.metrics["r2"] < 0.15
    assert abs(view.metrics["auroc"] - 0.5) < 0.2


def test_missing_images_are_an_error_unless_skipped(tmp_path: Path):
    _write_sample(tmp_path, signal=False, n=30)
    spec = dataclasses.replace(load_suite(SUITE).datasets[0], missing_images="error")
    with pytest.raises(RaddinoError, match="1 of .* image files not found, e.g. .*absent.png"):
        load_dataset(spec, data_root=tmp_path)
    with pytest.raises(RaddinoError, match="missing_images must be error or skip"):
        dataclasses.replace(spec, missing_images="ignore")
