"""Training curves: the rows of a run's ``metrics.jsonl`` as one PNG (``RUN/curves.png``, ``raddino plot``).

Panels: the loss terms (``loss``, ``dino``, ``ibot``, ``koleo``); teacher and student entropy against ``log K`` (the
entropy of the uniform distribution); ``dino_rel`` (DINO cross-entropy / log K, 1 = uniform student); the student's
feature std; the learning rate; and the steps at which each collapse flag was raised (or a step refused).

Works on a run in progress: unparseable lines (a torn last line while the trainer writes) are skipped. Rendering uses
matplotlib's object API (``Figure`` + ``savefig``), not ``pyplot``: no global figure state, no GUI backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "dino", "ibot", "koleo")
CURVES_FILE = "curves.png"


def read_metrics(path: Path) -> list[dict]:
    """The JSON rows of ``metrics.jsonl``; lines that are not JSON objects (a torn last line) are skipped."""
    if not path.is_file():
        raise RaddinoError(f"{path} not found (is it a `raddino pretrain` output directory?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def log_k_from_rows(rows: list[dict]) -> float | None:
    """``log K`` recovered from a row's ``dino / dino_rel`` (``None`` when no row has both)."""
    for row in rows:
        if row.get("dino_rel"):
            return float(row["dino"]) / float(row["dino_rel"])
    return None


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_curves(rows: list[dict], *, out: Path, log_k: float | None = None, title: str = "") -> Path:
    """Render ``rows`` (``metrics.jsonl`` rows; refused steps have ``refused`` and no losses) to ``out`` (PNG)."""
    from matplotlib.figure import Figure

    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise RaddinoError(f"no completed training steps to plot{f' in {title}' if title else ''}")
    fig = Figure(figsize=(13, 9), layout="constrained")
    (ax_loss, ax_ent), (ax_rel, ax_std), (ax_lr, ax_flags) = fig.subplots(3, 2, squeeze=False)

    for key in LOSS_TERMS:
        x, y = _series(steps, key)
        if x:
            ax_loss.plot(x, y, label=key, lw=1)
    ax_loss.set_title("loss terms")
    ax_loss.legend(fontsize=8)

    for key, label in (("teacher_entropy", "teacher"), ("student_entropy", "student")):
        x, y = _series(steps, key)
        if x:
            ax_ent.plot(x, y, label=label, lw=1)
    if log_k is not None:
        ax_ent.axhline(log_k, color="k", ls="--", lw=0.8, label=f"log K = {log_k:.2f} (uniform)")
    ax_ent.set_title("entropy of the CLS prototype distribution (nats)")
    ax_ent.legend(fontsize=8)

    x, y = _series(steps, "dino_rel")
    ax_rel.plot(x, y, lw=1, color="tab:purple")
    ax_rel.axhline(1.0, color="k", ls="--", lw=0.8)
    ax_rel.set_title("dino_rel = DINO CE / log K (1 = uniform student)")

    x, y = _series(steps, "student_std")
    ax_std.plot(x, y, lw=1, color="tab:green")
    ax_std.set_title("student feature std")

    x, y = _series(steps, "lr")
    ax_lr.plot(x, y, lw=1, color="tab:orange")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    # one row of markers per flag: the steps at which the collapse monitor raised it
    events: dict[str, list[int]] = {}
    for row in rows:
        for name in row.get("collapse", []):
            events.setdefault(name, []).append(row["step"])
        if "refused" in row:
            events.setdefault("refused step", []).append(row["step"])
    for i, (_name, at) in enumerate(sorted(events.items())):
        ax_flags.scatter(at, [i] * len(at), marker="|", s=80, color="tab:red")
    ax_flags.set_yticks(range(len(events)), sorted(events), fontsize=8)
    ax_flags.set_ylim(-0.5, max(len(events), 1) - 0.5)
    ax_flags.set_title("collapse flags raised" if events else "collapse flags: none raised")
    last = steps[-1]["step"]
    for ax in (ax_loss, ax_ent, ax_rel, ax_std, ax_lr, ax_flags):
        ax.set_xlim(0, max(last, 1))
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    flagged = sum(1 for r in rows if r.get("collapse"))
    fig.suptitle(f"{title + ': ' if title else ''}step {last}: loss {steps[-1]['loss']:.3f}, {flagged} flagged steps")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def plot_run(run_dir: Path, *, out: Path | None = None, log_k: float | None = None) -> Path:
    """``run_dir/metrics.jsonl`` -> ``out`` (default ``run_dir/curves.png``); ``log_k`` from the rows if not given."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    log_k = log_k if log_k is not None else log_k_from_rows(rows)
    return plot_curves(rows, out=out or Path(run_dir) / CURVES_FILE, log_k=log_k, title=Path(run_dir).name)


def try_plot_run(run_dir: Path, *, log_k: float) -> Path | None:
    """:func:`plot_run` for the end of a training run: a plotting failure is a warning, never a failed run."""
    try:
        path = plot_run(run_dir, log_k=log_k)
    except Exception as err:  # noqa: BLE001  (a finished run must not fail because of its figure)
        log.warning("could not write %s: %s: %s", Path(run_dir) / CURVES_FILE, type(err).__name__, err)
        return None
    log.info("training curves: %s", path)
    return path
