"""Reports from evaluation records: CSV files, a markdown comparison table and PNG plots.

* ``results.csv``: one row per record (metrics and their 95 % CI bounds as columns).
* ``summary.csv``: records grouped over seeds: mean, std and count of every metric.
* ``results.md``: for each protocol / feature protocol / label fraction, a backbones x datasets table of the primary
  metric (AUROC; R² for regression): ``value [CI]`` for a single seed, ``mean ± std (n)`` over several seeds; one
  more table per extra ``report_metrics`` entry. A suite's published rows (:mod:`raddino.eval.published`) appear
  under the backbone row they correspond to, marked "published", with the paper's value and measured − published.
* ``published.csv``: every published row with its source, the measured value of its metric and the difference (a
  row without ``features``: the suite's first feature protocol that ran).
* ``plots/bar_<protocol>_<features>.png``: primary metric on 100 % of the labels, bars per backbone and dataset with
  the CI (single seed) or ± std (several seeds) as error bars.
* ``plots/label_efficiency_<dataset>_<protocol>_<features>.png``: primary metric against the label fraction
  (log axis), mean ± std band over seeds, one line per backbone (when a suite has several fractions).

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raddino.eval.published import Comparison, PublishedRow, compare
from raddino.eval.runner import EvalRecord

log = logging.getLogger(__name__)


def primary_metric(task: str) -> str:
    return "r2" if task == "regression" else "auroc"


@dataclass(frozen=True)
class Summary:
    """Records of one (backbone, dataset, protocol, features, fraction) over seeds."""

    backbone: str
    dataset: str
    task: str
    protocol: str
    features: str
    fraction: float
    records: tuple[EvalRecord, ...]

    def values(self, metric: str) -> np.ndarray:
        return np.array([r.metrics.get(metric, math.nan) for r in self.records], dtype=np.float64)

    def mean(self, metric: str) -> float:
        v = self.values(metric)
        return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan

    def std(self, metric: str) -> float:
        v = self.values(metric)
        v = v[np.isfinite(v)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def cell(self, metric: str) -> str:
        if len(self.records) == 1:
            value = self.records[0].metrics.get(metric, math.nan)
            low, high = self.records[0].ci.get(metric, (math.nan, math.nan))
            if math.isnan(low):
                return f"{value:.3f}"
            return f"{value:.3f} [{low:.3f}, {high:.3f}]"
        return f"{self.mean(metric):.3f} ± {self.std(metric):.3f} (n={len(self.records)})"

    def error(self, metric: str) -> tuple[float, float]:
        """(below, above) error-bar lengths: CI for one seed, std for several."""
        if len(self.records) == 1:
            value = self.records[0].metrics.get(metric, math.nan)
            low, high = self.records[0].ci.get(metric, (math.nan, math.nan))
            if math.isnan(low):
                return 0.0, 0.0
            return max(0.0, value - low), max(0.0, high - value)
        std = self.std(metric)
        return std, std


def summarise(records: Sequence[EvalRecord]) -> list[Summary]:
    groups: dict[tuple, list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[(r.backbone, r.dataset, r.task, r.protocol, r.features, r.fraction)].append(r)
    return [
        Summary(backbone=b, dataset=d, task=t, protocol=p, features=f, fraction=fr, records=tuple(rs))
        for (b, d, t, p, f, fr), rs in groups.items()
    ]


def _metric_names(records: Sequence[EvalRecord]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [m for m in r.metrics if m not in names]
    return names


def write_csv(records: Sequence[EvalRecord], path: Path) -> None:
    metrics = _metric_names(records)
    columns = ["backbone", "dataset", "task", "protocol", "features", "fraction", "seed", "n_train", "n_test"]
    columns += [c for m in metrics for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
    columns += ["param_name", "best_param", "seconds"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in records:
            row = [r.backbone, r.dataset, r.task, r.protocol, r.features, r.fraction, r.seed, r.n_train, r.n_test]
            for m in metrics:
                low, high = r.ci.get(m, (math.nan, math.nan))
                row += [r.metrics.get(m, math.nan), low, high]
            row += [r.param_name, r.best_param, round(r.seconds, 3)]
            writer.writerow(row)


def write_summary_csv(summaries: Sequence[Summary], metrics: Sequence[str], path: Path) -> None:
    columns = ["backbone", "dataset", "task", "protocol", "features", "fraction", "n_seeds"]
    columns += [c for m in metrics for c in (f"{m}_mean", f"{m}_std")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for s in summaries:
            row = [s.backbone, s.dataset, s.task, s.protocol, s.features, s.fraction, len(s.records)]
            row += [v for m in metrics for v in (s.mean(m), s.std(m))]
            writer.writerow(row)


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _measured_at_full_labels(summaries: Sequence[Summary]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """``(backbone, dataset, protocol, features) -> {metric: mean over seeds}`` on 100 % of the labels."""
    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for s in summaries:
        if s.fraction == 1.0:
            metrics = _metric_names(s.records)
            out[(s.backbone, s.dataset, s.protocol, s.features)] = {m: s.mean(m) for m in metrics}
    return out


def _published_cell(comparison: Comparison) -> str:
    row = comparison.row
    if row.value is None:
        return f"– ({row.metric}: no published value)"
    delta = comparison.difference
    shown = f"{row.value:.3f} {row.metric}"
    return shown + (f" · Δ {delta:+.3f}" if math.isfinite(delta) else " · Δ – (not measured)")


def _published_lines(
    group: Sequence[Summary],
    published: Sequence[PublishedRow],
    *,
    backbone: str,
    protocol: str,
    features: str,
    datasets: Sequence[str],
) -> list[str]:
    """Table rows of the published values that sit under ``backbone`` in one (protocol, features) table, each
    compared with this table's measured value (a row without ``features`` appears in every features table)."""
    rows = [
        r
        for r in published
        if r.backbone == backbone
        and r.protocol == protocol
        and (r.features is None or r.features == features)
        and r.dataset in datasets
    ]
    measured = {k: v for k, v in _measured_at_full_labels(group).items() if k[3] == features}
    mine = compare([dataclasses.replace(r, features=features) for r in rows], measured)
    lines = []
    for paper, model in _ordered([(c.row.paper, c.row.model) for c in mine]):
        cells = {c.row.dataset: c for c in mine if (c.row.paper, c.row.model) == (paper, model)}
        sources = _ordered([c.row.source for c in cells.values()])
        label = f"↳ published: {model} ({'; '.join(sources)})"
        row = [label] + [_published_cell(cells[d]) if d in cells else "" for d in datasets]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _table(
    group: Sequence[Summary], *, metric: str | None, published: Sequence[PublishedRow], protocol: str, features: str
) -> list[str]:
    """One backbones x datasets table: ``metric`` (None: each dataset's primary metric) with the published rows."""
    datasets = _ordered([s.dataset for s in group])
    if metric is not None:
        datasets = [d for d in datasets if any(s.dataset == d and metric in _metric_names(s.records) for s in group)]
    if not datasets:
        return []
    backbones = _ordered([s.backbone for s in group])
    cells = {(s.backbone, s.dataset): s for s in group}
    header = ["backbone"] + [f"{d} ({metric or primary_metric(_dataset_task(group, d))})" for d in datasets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in backbones:
        row = [b] + [
            cells[(b, d)].cell(metric or primary_metric(cells[(b, d)].task)) if (b, d) in cells else "–"
            for d in datasets
        ]
        lines.append("| " + " | ".join(row) + " |")
        lines += _published_lines(group, published, backbone=b, protocol=protocol, features=features, datasets=datasets)
    return lines


def markdown(
    summaries: Sequence[Summary],
    *,
    title: str,
    published: Sequence[PublishedRow] = (),
    report_metrics: Sequence[str] = (),
) -> str:
    """Backbones x datasets tables of the primary metric (and of each ``report_metrics`` entry), one per (protocol,
    features, fraction); ``published`` rows sit under their backbone in the 100 % tables, marked "published"."""
    lines = [f"# {title}", ""]
    lines.append(
        "Primary metric: AUROC (macro for multi-class / multi-label; R² for regression) on the test split. "
        "One seed: value [95 % bootstrap CI]; several seeds: mean ± std (n)."
    )
    if published:
        lines.append(
            'Rows marked "↳ published" are the numbers the paper reports (its table and page), not measured here; '
            "Δ = measured − published for the same metric, on 100 % of the labels."
        )
    keys = _ordered([(s.protocol, s.features, s.fraction) for s in summaries])
    shown: set[int] = set()
    for protocol, features, fraction in keys:
        group = [s for s in summaries if (s.protocol, s.features, s.fraction) == (protocol, features, fraction)]
        rows = published if fraction == 1.0 else ()
        lines += ["", f"## {protocol} · {features} · {fraction * 100:g}% of training labels", ""]
        lines += _table(group, metric=None, published=rows, protocol=protocol, features=features)
        for metric in report_metrics:
            table = _table(group, metric=metric, published=(), protocol=protocol, features=features)
            if table:
                lines += ["", f"### {metric}", ""] + table
        backbones = {s.backbone for s in group}
        datasets = {s.dataset for s in group}
        shown |= {
            i
            for i, r in enumerate(rows)
            if r.protocol == protocol
            and r.backbone in backbones
            and r.dataset in datasets
            and (r.features is None or r.features == features)
        }
    unmatched = [Comparison(row=r, measured=math.nan) for i, r in enumerate(published) if i not in shown]
    if unmatched:
        lines += ["", "## Published rows without a measured row", ""]
        lines += ["| paper model | suite backbone | dataset | protocol | published | source |", "|---|" * 6]
        for c in unmatched:
            r = c.row
            value = f"{r.value:.3f} {r.metric}" if r.value is not None else f"– ({r.metric})"
            lines.append(f"| {r.model} | {r.backbone} | {r.dataset} | {r.protocol} | {value} | {r.source} |")
    return "\n".join(lines) + "\n"


def write_published_csv(comparisons: Sequence[Comparison], path: Path) -> None:
    columns = ["paper", "model", "backbone", "dataset", "protocol", "features", "metric", "published", "measured"]
    columns += ["difference", "table", "page", "note"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for c in comparisons:
            r = c.row
            published = "" if r.value is None else r.value
            writer.writerow(
                [r.paper, r.model, r.backbone, r.dataset, r.protocol, r.features or "", r.metric, published]
                + [c.measured, c.difference, r.table or "", r.page or "", r.note]
            )


def _dataset_task(group: Sequence[Summary], dataset: str) -> str:
    return next(s.task for s in group if s.dataset == dataset)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def bar_chart(summaries: Sequence[Summary], *, protocol: str, features: str, path: Path) -> bool:
    """Grouped bars (datasets on x, one bar per backbone) of the primary metric at 100 % labels."""
    group = [s for s in summaries if s.protocol == protocol and s.features == features and s.fraction == 1.0]
    if not group:
        return False
    datasets = _ordered([s.dataset for s in group])
    backbones = _ordered([s.backbone for s in group])
    cells = {(s.backbone, s.dataset): s for s in group}
    figure = _figure(max(5.0, 1.6 * len(datasets) * max(1, len(backbones)) ** 0.5 + 2), 4.2)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(backbones)
    x = np.arange(len(datasets))
    for i, backbone in enumerate(backbones):
        heights, errors = [], [[], []]
        for d in datasets:
            s = cells.get((backbone, d))
            metric = primary_metric(s.task) if s else "auroc"
            heights.append(s.mean(metric) if s else math.nan)
            below, above = s.error(metric) if s else (0.0, 0.0)
            errors[0].append(below)
            errors[1].append(above)
        axes.bar(x + (i - (len(backbones) - 1) / 2) * width, heights, width, yerr=errors, capsize=3, label=backbone)
    axes.set_xticks(x, datasets, rotation=20, ha="right")
    axes.set_ylabel("AUROC (R² for regression)")
    axes.set_title(f"{protocol} · {features} · 100% labels")
    finite = [s.mean(primary_metric(s.task)) for s in group if np.isfinite(s.mean(primary_metric(s.task)))]
    if finite:  # zoom on the range where the bars differ, staying inside [0, 1] for AUROC
        low, high = min(finite) - 0.1, max(finite) + 0.05
        axes.set_ylim(max(0.0, low) if min(finite) >= 0 else low, min(1.0, high) if max(finite) <= 1 else high)
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True


def label_efficiency_plot(
    summaries: Sequence[Summary], *, dataset: str, protocol: str, features: str, path: Path
) -> bool:
    """Primary metric vs label fraction (log x), mean ± std band over seeds, one line per backbone."""
    group = [s for s in summaries if (s.dataset, s.protocol, s.features) == (dataset, protocol, features)]
    if len({s.fraction for s in group}) < 2:
        return False
    figure = _figure(5.5, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    for backbone in _ordered([s.backbone for s in group]):
        points = sorted((s for s in group if s.backbone == backbone), key=lambda s: s.fraction)
        metric = primary_metric(points[0].task)
        fractions = np.array([s.fraction * 100 for s in points])
        means = np.array([s.mean(metric) for s in points])
        stds = np.array([s.std(metric) for s in points])
        axes.plot(fractions, means, marker="o", label=backbone)
        axes.fill_between(fractions, means - stds, means + stds, alpha=0.2)
    axes.set_xscale("log")
    ticks = sorted({s.fraction * 100 for s in group})
    axes.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    axes.minorticks_off()
    axes.set_xlabel("training labels")
    axes.set_ylabel(primary_metric(group[0].task).upper() if group[0].task != "regression" else "R²")
    axes.set_title(f"{dataset} · {protocol} · {features}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return True


def write_report(
    records: Sequence[EvalRecord],
    out_dir: Path,
    *,
    title: str,
    plots: bool = True,
    published: Sequence[PublishedRow] = (),
    report_metrics: Sequence[str] = (),
) -> list[Path]:
    """Write the CSVs, the markdown tables (with ``published`` rows) and the plots for ``records``; returns the
    written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not records:
        log.warning("no results to report")
        return written
    summaries = summarise(records)
    metrics = _metric_names(records)
    write_csv(records, out_dir / "results.csv")
    write_summary_csv(summaries, metrics, out_dir / "summary.csv")
    text = markdown(summaries, title=title, published=published, report_metrics=report_metrics)
    (out_dir / "results.md").write_text(text)
    written += [out_dir / "results.csv", out_dir / "summary.csv", out_dir / "results.md"]
    if published:
        write_published_csv(compare(published, _measured_at_full_labels(summaries)), out_dir / "published.csv")
        written.append(out_dir / "published.csv")
    if plots:
        try:
            import matplotlib  # noqa: F401  (a dependency; an environment may still lack it)
        except ImportError:
            log.warning("matplotlib is not installed (pip install matplotlib): no PNG plots")
            return written
        plot_dir = out_dir / "plots"
        plot_dir.mkdir(exist_ok=True)
        for protocol, features in _ordered([(s.protocol, s.features) for s in summaries]):
            path = plot_dir / f"bar_{_slug(protocol)}_{_slug(features)}.png"
            if bar_chart(summaries, protocol=protocol, features=features, path=path):
                written.append(path)
            for dataset in _ordered([s.dataset for s in summaries]):
                path = plot_dir / f"label_efficiency_{_slug(dataset)}_{_slug(protocol)}_{_slug(features)}.png"
                if label_efficiency_plot(summaries, dataset=dataset, protocol=protocol, features=features, path=path):
                    written.append(path)
    return written
