"""Run a suite: every dataset x backbone x protocol x feature protocol x label fraction x seed -> one record.

Features of each (backbone, dataset, split) are extracted once (cached on disk) and shared by the linear probe, kNN
and the frozen fine-tuning head; label-efficiency subsets index into the training features. Runs whose result cannot
depend on the seed (linear probe and kNN on 100 % of the labels: L-BFGS and kNN are deterministic) are done for the
first seed only. Records are appended to ``results.jsonl`` as they finish, so an interrupted run keeps its results.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone
from raddino.eval.adapters.registry import build_backbone_adapter
from raddino.eval.datasets.base import SPLITS, EvalDataset, EvalSplit, label_subset
from raddino.eval.datasets.registry import load_dataset
from raddino.eval.features import extract_features
from raddino.eval.finetune import finetune, train_linear_head
from raddino.eval.knn import knn_probe
from raddino.eval.linear import ProbeResult, linear_probe
from raddino.eval.suite import BackboneEntry, Suite

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
FEATURE_FREE = ("finetune_unfrozen",)  # protocols that train on images, not on extracted features


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation (a line of ``results.jsonl``)."""

    backbone: str
    dataset: str
    task: str
    protocol: str
    features: str
    fraction: float
    seed: int
    n_train: int
    n_test: int
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    param_name: str
    best_param: float
    threshold: float | list[float] | None
    seconds: float
    # the validation split's metrics at the chosen hyper-parameter: what a readout or recipe should be chosen on
    # (records written before 2026-12-02 lack them)
    val_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        payload = dataclasses.asdict(self)
        payload["ci"] = {k: list(v) for k, v in self.ci.items()}
        return json.dumps(payload, allow_nan=True)

    @classmethod
    def from_json(cls, line: str) -> EvalRecord:
        payload = json.loads(line)
        payload["ci"] = {k: tuple(v) for k, v in payload["ci"].items()}
        return cls(**payload)


def read_records(path: Path) -> list[EvalRecord]:
    if not path.is_file():
        return []
    return [EvalRecord.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def limit_dataset(dataset: EvalDataset, *, limit: int, seed: int = 0) -> EvalDataset:
    """At most ``limit`` images per split (stratified, seeded) for quick runs."""
    splits = {}
    for name, split in dataset.splits.items():
        if len(split) <= limit:
            splits[name] = split
            continue
        indices = label_subset(split.labels, fraction=limit / len(split), seed=seed, task=dataset.task)
        splits[name] = split.subset(indices[:limit])
    return dataclasses.replace(dataset, splits=splits)


def build_entry(entry: BackboneEntry, *, seed: int = 0) -> Backbone:
    return build_backbone_adapter(
        entry.spec, weights=entry.weights, random_init=entry.random_init, img_size=entry.img_size, seed=seed
    )


@dataclass(frozen=True)
class RunOptions:
    """Execution settings that do not change results (where to write, which device, how many workers)."""

    out_dir: Path
    cache_dir: Path | None = None
    device: str = "cpu"
    num_workers: int = 0
    data_root: Path | None = None


class SuiteRunner:
    """Executes a :class:`Suite`; :meth:`run` returns every record and appends each to ``results.jsonl``."""

    def __init__(self, suite: Suite, options: RunOptions) -> None:
        self.suite = suite
        self.options = options
        self.records: list[EvalRecord] = []
        options.out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = options.out_dir / RESULTS_FILE

    def _emit(self, record: EvalRecord) -> None:
        self.records.append(record)
        with open(self.results_path, "a") as handle:
            handle.write(record.to_json() + "\n")
        metric = "r2" if record.task == "regression" else "auroc"
        low, high = record.ci.get(metric, (float("nan"), float("nan")))
        log.info(
            "%s | %s | %s/%s | %g%% seed %d: %s %.4f [%.4f, %.4f]",
            record.backbone,
            record.dataset,
            record.protocol,
            record.features,
            record.fraction * 100,
            record.seed,
            metric,
            record.metrics.get(metric, float("nan")),
            low,
            high,
        )

    def _record(
        self,
        *,
        entry: BackboneEntry,
        dataset: EvalDataset,
        protocol: str,
        features: str,
        fraction: float,
        seed: int,
        result: ProbeResult,
    ) -> EvalRecord:
        return EvalRecord(
            backbone=entry.label,
            dataset=dataset.name,
            task=dataset.task,
            protocol=protocol,
            features=features,
            fraction=fraction,
            seed=seed,
            n_train=result.n_train,
            n_test=len(dataset.splits["test"]),
            metrics=result.test_metrics,
            ci=result.test_ci,
            param_name=result.param_name,
            best_param=result.best_param,
            threshold=result.threshold,
            seconds=result.seconds,
            val_metrics=result.val_metrics,
        )

    def _runs(self, protocol: str) -> Iterable[tuple[float, int]]:
        """(fraction, seed) pairs; seed repeats are skipped where the protocol is deterministic on all labels."""
        for fraction in self.suite.label_fractions:
            for i, seed in enumerate(self.suite.seeds):
                if fraction == 1.0 and i > 0 and protocol in ("linear", "knn_cosine", "knn_euclidean"):
                    continue
                yield fraction, seed

    def _feature_protocols(self, backbone: Backbone) -> list[str]:
        wanted = list(self.suite.features)
        if "finetune_frozen" in self.suite.protocols and self.suite.finetune_features not in wanted:
            wanted.append(self.suite.finetune_features)
        usable = []
        for protocol in wanted:
            try:
                backbone.check_protocol(protocol)
                usable.append(protocol)
            except RaddinoError as err:
                log.warning("skipping %s: %s", protocol, err)
        return usable

    def run_backbone(self, entry: BackboneEntry, dataset: EvalDataset) -> None:
        suite = self.suite
        backbone = build_entry(entry)
        feature_protocols = self._feature_protocols(backbone)
        needs_features = any(p not in FEATURE_FREE for p in suite.protocols)
        feats: dict[str, dict[str, np.ndarray]] = {}
        if needs_features and feature_protocols:
            for split in SPLITS:
                feats[split] = extract_features(
                    backbone,
                    dataset.splits[split].images,
                    protocols=feature_protocols,
                    resize=suite.resize,
                    batch_size=suite.batch_size,
                    num_workers=self.options.num_workers,
                    device=self.options.device,
                    cache_dir=self.options.cache_dir,
                    desc=f"{entry.label} {dataset.name}/{split}",
                )
        labels = {s: dataset.splits[s].labels for s in SPLITS}
        for protocol in suite.protocols:
            if protocol in FEATURE_FREE:
                self._finetune_unfrozen(entry, backbone, dataset)
                continue
            feature_list = [suite.finetune_features] if protocol == "finetune_frozen" else list(suite.features)
            for features in feature_list:
                if features not in feature_protocols:
                    continue
                for fraction, seed in self._runs(protocol):
                    subset = label_subset(labels["train"], fraction=fraction, seed=seed, task=dataset.task)
                    train = (feats["train"][features][subset], labels["train"][subset])
                    val = (feats["val"][features], labels["val"])
                    test = (feats["test"][features], labels["test"])
                    result = self._probe(protocol, train=train, val=val, test=test, task=dataset.task, seed=seed)
                    self._emit(
                        self._record(
                            entry=entry,
                            dataset=dataset,
                            protocol=protocol,
                            features=features,
                            fraction=fraction,
                            seed=seed,
                            result=result,
                        )
                    )
        backbone.to("cpu")

    def _probe(self, protocol: str, *, train, val, test, task: str, seed: int) -> ProbeResult:
        suite = self.suite
        if protocol == "linear":
            return linear_probe(
                train=train,
                val=val,
                test=test,
                Cs=suite.Cs,
                task=task,
                seed=seed,
                max_iter=suite.max_iter,
                n_bootstrap=suite.n_bootstrap,
            )
        if protocol in ("knn_cosine", "knn_euclidean"):
            metric = protocol.removeprefix("knn_")
            return knn_probe(
                train=train,
                val=val,
                test=test,
                metric=metric,
                k=suite.knn_k.get(metric),
                temperature=suite.knn_temperature,
                task=task,
                seed=seed,
                n_bootstrap=suite.n_bootstrap,
            )
        if protocol == "finetune_frozen":
            return train_linear_head(
                train=train,
                val=val,
                test=test,
                task=task,
                schedule=suite.finetune,
                seed=seed,
                device=self.options.device,
                n_bootstrap=suite.n_bootstrap,
            )
        raise RaddinoError(f"unknown protocol {protocol!r}")

    def _finetune_unfrozen(self, entry: BackboneEntry, backbone: Backbone, dataset: EvalDataset) -> None:
        suite = self.suite
        try:
            backbone.check_protocol(suite.finetune_features)
        except RaddinoError as err:
            log.warning("skipping finetune_unfrozen: %s", err)
            return
        for fraction, seed in self._runs("finetune_unfrozen"):
            subset = label_subset(dataset.splits["train"].labels, fraction=fraction, seed=seed, task=dataset.task)
            train: EvalSplit = dataset.splits["train"].subset(subset)
            result = finetune(
                backbone=copy.deepcopy(backbone),  # fine-tuning changes the weights; each run starts fresh
                train=train,
                val=dataset.splits["val"],
                test=dataset.splits["test"],
                task=dataset.task,
                protocol=suite.finetune_features,
                schedule=suite.finetune,
                resize=suite.resize,
                seed=seed,
                device=self.options.device,
                num_workers=self.options.num_workers,
                n_bootstrap=suite.n_bootstrap,
            )
            self._emit(
                self._record(
                    entry=entry,
                    dataset=dataset,
                    protocol="finetune_unfrozen",
                    features=suite.finetune_features,
                    fraction=fraction,
                    seed=seed,
                    result=result,
                )
            )

    def run(self) -> list[EvalRecord]:
        suite = self.suite
        if not suite.datasets:
            raise RaddinoError(f"suite {suite.name}: no datasets (add some, or pass --dataset)")
        if not suite.backbones:
            raise RaddinoError(f"suite {suite.name}: no backbones (add some, or pass --backbone)")
        started = time.perf_counter()
        data_root = self.options.data_root or suite.data_root_path(Path.cwd())
        for spec in suite.datasets:
            dataset = load_dataset(spec, data_root=data_root)
            if suite.limit is not None:
                dataset = limit_dataset(dataset, limit=suite.limit)
                log.info("limited to %s", dataset.summary())
            for entry in suite.backbones:
                self.run_backbone(entry, dataset)
        log.info("suite %s: %d results in %.0f s", suite.name, len(self.records), time.perf_counter() - started)
        return self.records


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
