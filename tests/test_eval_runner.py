"""Suites, the protocol runner, fine-tuning and the ``raddino eval`` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raddino.cli import main
from raddino.errors import RaddinoError
from raddino.eval.adapters.registry import build_backbone_adapter
from raddino.eval.datasets.csv import CsvSpec
from raddino.eval.datasets.folder import FolderSpec
from raddino.eval.datasets.medmnist import MedmnistSpec
from raddino.eval.datasets.shards import ShardsSpec
from raddino.eval.finetune import TrainSchedule, param_groups, train_linear_head
from raddino.eval.runner import read_records
from raddino.eval.suite import load_suite, suite_from_dict

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted((REPO / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suites_parse(path: Path):
    suite = load_suite(path)
    assert suite.datasets and suite.backbones


def test_suite_unknown_keys_are_named():
    with pytest.raises(RaddinoError, match="unknown key\\(s\\) protocol"):
        suite_from_dict({"protocol": ["linear"]}, name="x")
    with pytest.raises(RaddinoError, match="dataset d: unknown key\\(s\\) lable_columns"):
        suite_from_dict({"datasets": [{"name": "d", "kind": "csv", "path": "a.csv", "lable_columns": ["y"]}]}, name="x")
    with pytest.raises(RaddinoError, match="unknown protocol 'svm'"):
        suite_from_dict({"protocols": ["svm"]}, name="x")


def test_dataset_entries_become_the_spec_of_their_kind():
    payload = {
        "datasets": [
            {"name": "pneu", "kind": "medmnist", "path": "p.npz", "classes": ["normal", "pneumonia"]},
            {"name": "kermany", "kind": "folder", "path": "chest_xray", "val_fraction": 0.2},
            {"name": "nih", "kind": "csv", "path": "n.csv", "label_columns": "Finding Labels", "where": {"v": 1}},
            {"name": "s", "kind": "shards", "path": "shards", "split_values": {"val": "dev"}},
        ]
    }
    pneu, kermany, nih, shards = suite_from_dict(payload, name="x").datasets
    assert pneu == MedmnistSpec(name="pneu", path="p.npz", classes=("normal", "pneumonia"))
    assert kermany == FolderSpec(name="kermany", path="chest_xray", val_fraction=0.2)
    assert nih == CsvSpec(name="nih", path="n.csv", label_columns=("Finding Labels",), where={"v": ("1",)})
    assert shards == ShardsSpec(name="s", path="shards", split_values={"val": ("dev",)})


def test_dataset_keys_are_checked_per_kind():
    def parse(**entry):
        return suite_from_dict({"datasets": [{"name": "d", **entry}]}, name="x")

    # a csv key on a folder dataset: the message names the dataset, the kind, the key and whose key it is
    with pytest.raises(RaddinoError, match="dataset d: unknown key\\(s\\) split_column for kind folder") as err:
        parse(kind="folder", path="f", split_column="split")
    assert "split_column belongs to csv / shards" in str(err.value) and "allowed: " in str(err.value)
    with pytest.raises(RaddinoError, match="unknown key\\(s\\) aggregate_by, val_fraction for kind medmnist"):
        parse(kind="medmnist", path="p.npz", val_fraction=0.2, aggregate_by="id")
    with pytest.raises(RaddinoError, match="unknown key\\(s\\) where for kind shards \\(where belongs to csv;"):
        parse(kind="shards", path="s", where={"view": ["PA"]})
    with pytest.raises(RaddinoError, match="dataset d: unknown kind 'dicom'; expected medmnist, folder, csv, shards"):
        parse(kind="dicom", path="x")
    assert parse(kind="shards", path="s", split_lists={"test": "t.txt"}, group_column="patient").datasets


def test_missing_public_dataset_names_the_file(tmp_path: Path, capsys):
    code = main(
        [
            "eval",
            "--suite",
            str(REPO / "eval" / "nih_cxr14.yaml"),
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Data_Entry_2017.csv" in err and "docs/EVAL.md" in err


def test_unknown_backbone_is_a_clear_cli_error(pneumoniamnist: Path, tmp_path: Path, capsys):
    code = main(["eval", "--dataset", str(pneumoniamnist), "--backbone", "dinov3:giant", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown backbone 'dinov3:giant'" in capsys.readouterr().err


def test_layer_wise_lr_decay_groups():
    backbone = build_backbone_adapter("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    head = torch.nn.Linear(192, 1)
    groups = param_groups(head=head, backbone=backbone.model, layer_decay=0.5, weight_decay=0.05)
    mult_of = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(backbone.model.named_parameters())
    depth = 12  # ViT-Ti blocks: block i gets 0.5 ** (12 + 1 - (i + 1)), the input layer 0.5 ** 13
    assert mult_of[id(named["blocks.11.mlp.fc1.weight"])] == 0.5
    assert mult_of[id(named["blocks.0.attn.qkv.weight"])] == 0.5**depth
    assert mult_of[id(named["patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert mult_of[id(named["norm.weight"])] == 1.0 and mult_of[id(head.weight)] == 1.0
    assert wd_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    assert wd_of[id(named["blocks.0.attn.qkv.bias"])] == 0.0 and wd_of[id(named["cls_token"])] == 0.0


def test_frozen_head_learns_and_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.normal(size=(300, 8)).astype(np.float32) + 3.0 * y[:, None]
    schedule = TrainSchedule(epochs=6, lr=1e-2, batch_size=32, patience=2)
    result = train_linear_head(
        train=(x[:200], y[:200]),
        val=(x[200:250], y[200:250]),
        test=(x[250:], y[250:]),
        task="binary",
        schedule=schedule,
        seed=0,
        n_bootstrap=0,
    )
    assert result.test_metrics["auroc"] > 0.99
    assert result.best_param == float(np.argmax(result.val_curve))
    again = train_linear_head(
        train=(x[:200], y[:200]),
        val=(x[200:250], y[200:250]),
        test=(x[250:], y[250:]),
        task="binary",
        schedule=schedule,
        seed=0,
        n_bootstrap=0,
    )
    np.testing.assert_array_equal(result.test_scores, again.test_scores)  # seeded


def test_every_protocol_end_to_end_on_pneumoniamnist(shared_data: Path, pneumoniamnist: Path, tmp_path: Path):
    """A random-init tiny ViT through the smoke suite: linear, both kNNs, frozen and unfrozen fine-tuning, label
    fractions and seeds; then the report files; then a cached re-run."""
    out = tmp_path / "run"
    args = [
        "eval",
        "--suite",
        str(REPO / "eval" / "smoke_cpu.yaml"),
        "--data-root",
        str(shared_data),
        "--limit",
        "160",
        "--features",
        "cls",
        "dinov2_linear",
        "--bootstrap",
        "100",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    records = read_records(out / "results.jsonl")
    # linear / kNN: 2 features x (0.1: 2 seeds + 1.0: 1 seed) each; fine-tuning: 1 feature x 4 runs each
    counts = {p: sum(r.protocol == p for r in records) for p in {r.protocol for r in records}}
    assert counts == {"linear": 6, "knn_cosine": 6, "knn_euclidean": 6, "finetune_frozen": 4, "finetune_unfrozen": 4}
    for record in records:
        assert 0.0 <= record.metrics["auroc"] <= 1.0 and record.n_test == 160
        # the validation metrics at the chosen hyper-parameter travel with the record (what readouts are chosen on)
        assert set(record.val_metrics) == set(record.metrics) and 0.0 <= record.val_metrics["auroc"] <= 1.0
        assert record.n_train == (16 if record.fraction == 0.1 else 160)
    markdown = (out / "results.md").read_text()
    assert "## finetune_unfrozen · cls · 10% of training labels" in markdown and "(n=2)" in markdown
    assert (out / "results.csv").read_text().count("\n") == len(records) + 1
    assert (out / "plots" / "bar_linear_cls.png").stat().st_size > 1000
    assert (out / "plots" / "label_efficiency_pneumoniamnist_knn_cosine_dinov2_linear.png").is_file()
    first_line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert set(first_line["ci"]) == set(first_line["metrics"])
    # A second run with the same cache recomputes nothing for the feature protocols and gives the same probes.
    again = tmp_path / "again"
    assert main([*args[:-4], "--protocol", "linear", "--out", str(again), "--cache-dir", str(tmp_path / "cache")]) == 0
    rerun = {(r.features, r.fraction, r.seed): r.metrics for r in read_records(again / "results.jsonl")}
    for r in records:
        if r.protocol == "linear":
            assert rerun[(r.features, r.fraction, r.seed)] == r.metrics


def test_runner_multilabel_and_regression_csv(tmp_path: Path):
    """Multi-label findings and a continuous target (age) through linear, kNN and the frozen head."""
    from PIL import Image

    from raddino.eval.report import write_report
    from raddino.eval.runner import RunOptions, SuiteRunner

    rng = np.random.default_rng(0)
    rows = ["path,a,b,age,split"]
    for i in range(90):
        a, b = int(rng.random() < 0.4), int(rng.random() < 0.3)
        image = rng.integers(0, 60, (24, 24)).astype(np.uint8) + 120 * a  # finding a = brighter image
        Image.fromarray(image.astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{a},{b},{40 + 30 * a + rng.normal(0, 3):.1f},{('train', 'val', 'test')[i % 3]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    common = {"kind": "csv", "path": "m.csv", "split_column": "split"}
    payload = {
        "datasets": [
            {"name": "findings", "label_columns": ["a", "b"], **common},
            {"name": "age", "label_columns": ["age"], "task": "regression", **common},
        ],
        "backbones": [{"spec": "timm:vit_tiny_patch16_224", "random_init": True, "img_size": 32}],
        "protocols": ["linear", "knn_cosine", "finetune_frozen"],
        "features": ["cls_mean"],
        "finetune_features": "cls_mean",
        "finetune": {"epochs": 3, "lr": 1.0e-2, "patience": 3},
        "n_bootstrap": 50,
    }
    suite = suite_from_dict(payload, name="csv")
    records = SuiteRunner(suite, RunOptions(out_dir=tmp_path / "out", data_root=tmp_path)).run()
    assert len(records) == 6
    by_key = {(r.dataset, r.protocol): r for r in records}
    assert by_key[("findings", "linear")].task == "multilabel"
    assert by_key[("findings", "linear")].metrics["auroc"] > 0.7  # finding a is visible in the pixels
    assert set(by_key[("age", "knn_cosine")].metrics) == {"r2", "mae", "pearson_r"}
    assert by_key[("age", "linear")].metrics["r2"] > 0.3
    write_report(records, tmp_path / "out", title="csv")
    assert "age (r2)" in (tmp_path / "out" / "results.md").read_text()


def _former_finetune_groups(
    head, backbone, *, layer_decay: float, weight_decay: float
) -> dict[int, tuple[float, float]]:
    """Fine-tuning's parameter rules as eval/finetune.py stated them before it used raddino.optim: id -> (lr_mult,
    weight_decay)."""
    import re

    patterns = (r"(?:^|\.)blocks\.(\d+)\.", r"(?:^|\.)layer(\d)\.")  # the ViT blocks / ResNet stages tested here
    inputs = re.compile(r"(?:^|\.)(patch_embed|pos_embed|cls_token|reg_token|conv1|bn1)(?:\.|$)")

    def index(name: str) -> int | None:
        if match := re.search(patterns[0], name):
            return int(match.group(1)) + 1
        if match := re.search(patterns[1], name):
            return int(match.group(1))
        return 0 if inputs.search(name) else None

    def no_decay(name: str, param) -> bool:
        return param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "token" in name or "pos_embed" in name

    out = {id(p): (1.0, 0.0 if no_decay(n, p) else weight_decay) for n, p in head.named_parameters()}
    depth = max((i for n, _ in backbone.named_parameters() if (i := index(n)) is not None), default=0)
    for name, param in backbone.named_parameters():
        i = index(name)
        i = depth + 1 if i is None else i
        out[id(param)] = (layer_decay ** (depth + 1 - i), 0.0 if no_decay(name, param) else weight_decay)
    return out


@pytest.mark.parametrize(("spec", "width"), [("timm:vit_tiny_patch16_224", 192), ("timm:resnet18", 512)])
def test_finetune_groups_from_optim_rules_match_the_former_rules(spec: str, width: int):
    backbone = build_backbone_adapter(spec, random_init=True, img_size=32)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2))
    groups = param_groups(head=head, backbone=backbone.model, layer_decay=0.65, weight_decay=0.05)
    got = {id(p): (g["lr_mult"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert got == _former_finetune_groups(head, backbone.model, layer_decay=0.65, weight_decay=0.05)


def test_finetune_lr_schedule_matches_the_former_formula():
    import math

    from raddino.schedules import warmup_cosine

    def former(step: int, total: int, *, peak: float, warmup: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))

    for total, warmup, peak in [(100, 10, 1e-3), (37, 0, 3e-4), (1, 0, 0.1), (50, 49, 2.5e-5), (7, 3, 1e-3)]:
        for step in range(total):
            assert warmup_cosine(step, peak=peak, total_steps=total, warmup_steps=warmup) == former(
                step, total, peak=peak, warmup=warmup
            )
