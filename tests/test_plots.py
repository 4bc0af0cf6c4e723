"""Training curves (``raddino plot``, ``RUN/curves.png`` at the end of ``fit``) and optional TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raddino.cli import main
from raddino.errors import RaddinoError
from raddino.plots import log_k_from_rows, read_metrics, try_plot_run

TINY = [  # on top of configs/micro_cpu.yaml
    "head.out_dim=128",
    "head.hidden_dim=32",
    "head.bottleneck_dim=16",
    "data.synthetic_count=32",
    "data.batch_size=4",
    "train.steps_per_epoch=3",
    "train.epochs=1",
    "train.checkpoint_every=100",
    "optim.warmup_epochs=0",
    "teacher.temp_warmup_epochs=0",
]


def _rows(n: int, log_k: float = math.log(4096)) -> list[dict]:
    rows = []
    for step in range(1, n + 1):
        dino = log_k * (1.0 - 0.01 * step / n)
        row = {
            "step": step,
            "loss": 12.0 - step * 0.01,
            "dino": dino,
            "ibot": 4.0,
            "koleo": 0.5,
            "lr": 1e-3,
            "teacher_entropy": 8.0,
            "student_entropy": 8.2,
            "dino_rel": dino / log_k,
            "student_std": 0.06,
        }
        if step > n // 2:
            row["collapse"] = ["student_uniform"]
        rows.append(row)
    rows.insert(3, {"step": 3, "refused": ["grad_norm"]})
    return rows


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def test_plot_a_run_in_progress_with_a_torn_last_line(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    rows = _rows(40)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "loss": 11.'  # the trainer mid-write
    (run / "metrics.jsonl").write_text(text)
    assert read_metrics(run / "metrics.jsonl") == rows
    assert log_k_from_rows(rows) == pytest.approx(math.log(4096))
    assert main(["plot", str(run)]) == 0
    pixels = _png(run / "curves.png")
    assert pixels.shape[1] > 800 and pixels.std() > 10
    assert main(["plot", str(run), "--out", str(tmp_path / "x" / "c.png")]) == 0
    assert (tmp_path / "x" / "c.png").is_file()


def test_plot_user_errors(tmp_path: Path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "refused": ["loss"]}\n')
    assert main(["plot", str(tmp_path)]) == 2  # nothing completed yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "not found" in err[0] and "metrics.jsonl" in err[1] and "no completed" in err[2]


def test_a_plotting_failure_is_only_a_warning(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="raddino.plots"):
        assert try_plot_run(tmp_path, log_k=1.0) is None
    assert "could not write" in caplog.text


def _fit(out: Path, *extra: str):
    from raddino.config import load_config
    from raddino.train import build_training, fit

    return fit(build_training(load_config("micro_cpu", [*TINY, f"train.output_dir={out}", *extra])))


def test_fit_writes_curves_and_tensorboard_events(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _fit(run, "train.max_steps=3", "train.tensorboard=true")
    assert _png(run / "curves.png").std() > 10
    events = EventAccumulator(str(run))
    events.Reload()
    rows = read_metrics(run / "metrics.jsonl")
    for key in ("loss", "dino", "student_entropy", "dino_rel", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_tensorboard_missing_is_a_clear_error_at_start(tmp_path: Path, monkeypatch):
    from raddino.config import load_config
    from raddino.train import build_training

    # None in sys.modules makes `import` raise ImportError: TensorBoard as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config("micro_cpu", [*TINY, f"train.output_dir={tmp_path}", "train.tensorboard=true"])
    with pytest.raises(RaddinoError, match="pip install tensorboard"):
        build_training(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()
