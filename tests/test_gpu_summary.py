"""benchmarks/gpu_summary.py: the Performance goals judged from a device call's files (fabricated here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _train(images_per_s: float, mfu: float, peak_gib: float, *, compile: bool = False) -> dict:
    return {"images_per_s": images_per_s, "mfu": mfu, "peak_memory_gib": peak_gib, "compile": compile}


def _write(out: Path, name: str, record: dict) -> None:
    (out / name).write_text(json.dumps(record))


def test_every_goal_judged_from_the_files(tmp_path: Path):
    summary = _summary_module()
    _write(tmp_path, "train_vitb.json", _train(400.0, 0.41, 30.0))
    _write(tmp_path, "train_vitb_compile.json", _train(500.0, 0.52, 28.0, compile=True))  # the fastest counts
    _write(tmp_path, "train_vitb_fused.json", _train(420.0, 0.43, 30.0))
    peers = {
        "dinov2": {"status": "ok", "images_per_s": 250.0, "peak_mem_gib": 60.0},
        "dinov2-sdpa": {"status": "ok", "images_per_s": 400.0, "peak_mem_gib": 45.0},  # Meta's best of two
        "lightly": {"status": "ok", "images_per_s": 240.0, "peak_mem_gib": 50.0},
    }
    _write(tmp_path, "peers.json", {"peers": peers})
    _write(tmp_path, "train_vitl_ac.json", _train(150.0, 0.45, 70.0))  # 75.2 GB: fits
    loader = {
        "cores": 16,
        "data": {"8-bit 512 px": {"stream": {"0": {"images_per_s": 300.0}, "16": {"images_per_s": 650.0}}}},
    }
    _write(tmp_path, "loader.json", loader)
    goals = {g.name: g for g in summary.check_goals(tmp_path)}
    mfu = goals["MFU, ViT-B/14 batch 64 bf16"]
    assert mfu.met is True and mfu.measured == "52.0 % (compile)"
    official = goals["images/s vs Meta's DINOv2 code"]
    assert official.met is False and official.measured.startswith("1.25x (500.0 vs 400.0")  # needs 1.3x
    assert goals["images/s vs lightly"].met is True  # 500 / 240 = 2.08
    memory = goals["peak memory vs Meta's DINOv2 code"]
    assert memory.measured.startswith("0.62x (28.0 vs 45.0") and memory.met is True  # Meta's least memory: 45
    assert goals["ViT-L/14 batch 64 with activation checkpointing"].met is True
    assert goals["loader (16 cores) vs the trainer's images/s"].met is True  # 650 / 500 = 1.3 >= 1.2
    text = summary.write_summary(tmp_path, list(goals.values()))
    assert "| images/s vs Meta's DINOv2 code | ≥ 1.3x | 1.25x" in text and "**not met**" in text
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 6


def test_missing_or_failed_stages_are_not_measured_never_met(tmp_path: Path):
    summary = _summary_module()
    _write(tmp_path, "peers.json", {"peers": {"dinov2": {"status": "failed", "error": "OOM"}}})
    (tmp_path / "train_vitl_ac.json").write_text("{truncated")  # a stage killed while writing
    goals = summary.check_goals(tmp_path)
    assert len(goals) == 6 and all(g.met is None and g.measured == "not measured" for g in goals)
    assert summary.main([str(tmp_path)]) == 0 and "not measured" in (tmp_path / "summary.md").read_text()
    assert summary.main([str(tmp_path / "absent")]) == 2


@pytest.mark.parametrize(("peak_gib", "fits"), [(74.0, True), (75.0, False)])  # 80 GB = 74.5 GiB
def test_vitl_fits_in_80_gb_means_80e9_bytes(tmp_path: Path, peak_gib: float, fits: bool):
    summary = _summary_module()
    _write(tmp_path, "train_vitl_ac.json", _train(100.0, 0.4, peak_gib))
    goal = next(g for g in summary.check_goals(tmp_path) if g.name.startswith("ViT-L"))
    assert goal.met is fits


def test_gpu_perf_script_runs_every_stage_as_a_cpu_smoke(tmp_path: Path):
    """The device call's script itself (stages, flags, file names) on the CPU, so a typo never costs GPU time."""
    env = dict(os.environ, CPU_SMOKE="1", OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_perf.sh")], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = ("train_vitb.json", "train_vitb_fused.json", "train_vitb_compile.json", "train_vitl_ac.json")
    for name in (*stages, "loader.json", "peers.json"):
        assert json.loads((tmp_path / name).read_text()), name  # every stage wrote its numbers
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("CPU smoke run") and summary.count("\n| ") == 7  # header + 6 goals
    assert json.loads((tmp_path / "train_vitl_ac.json").read_text())["activation_checkpointing"] == 1


def test_the_fastest_training_variant_is_named(tmp_path: Path):
    summary = _summary_module()
    _write(tmp_path, "train_vitb.json", _train(400.0, 0.41, 30.0))
    _write(tmp_path, "train_vitb_fused.json", _train(430.0, 0.44, 30.0))
    mfu = summary.check_goals(tmp_path)[0]
    assert mfu.measured == "44.0 % (fused)" and mfu.met is False
