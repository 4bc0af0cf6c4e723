"""k-nearest-neighbour classifiers on frozen features.

* ``cosine`` (DINO's weighted kNN, ``k=20``, ``T=0.07``): features are L2-normalised, the ``k`` most similar
  training samples vote with weight ``exp(similarity / T)``.
* ``euclidean`` (MedMNIST+ protocol, ``k=11``): the ``k`` nearest training samples by Euclidean distance vote
  with equal weight (majority vote).

Scores are the weighted vote shares (they sum to 1 over classes), so AUROC / AUPRC can rank them; for multi-label
targets each label's score is the weighted share of neighbours carrying it, for regression the weighted mean target.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from raddino.errors import RaddinoError
from raddino.eval.linear import ProbeResult, Split, infer_task
from raddino.eval.metrics import Task, choose_thresholds, evaluate, selection_score

log = logging.getLogger(__name__)

KnnMetric = Literal["cosine", "euclidean"]
KNN_DEFAULTS: dict[str, int] = {"cosine": 20, "euclidean": 11}


def _targets(labels: np.ndarray, task: Task, n_classes: int) -> torch.Tensor:
    """Per-training-sample vote vectors ``(N, V)``: one-hot classes, 0/1 labels, or the target value."""
    labels = np.asarray(labels)
    if task in ("binary", "multiclass"):
        return F.one_hot(torch.from_numpy(labels.astype(np.int64)), n_classes).double()
    if task == "multilabel":
        return torch.from_numpy(labels.astype(np.float64))
    return torch.from_numpy(labels.astype(np.float64)).reshape(-1, 1)


@torch.no_grad()
def knn_scores(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    k: int,
    metric: KnnMetric = "cosine",
    temperature: float = 0.07,
    task: Task | None = None,
    n_classes: int | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Vote shares of ``query_x (M, D)`` from its ``k`` nearest rows of ``train_x (N, D)``.

    Returns ``(M,)`` positive-class share (binary), ``(M, C)`` class shares (multiclass), ``(M, K)`` label shares
    (multilabel) or ``(M,)`` weighted mean targets (regression).
    """
    if metric not in KNN_DEFAULTS:
        raise RaddinoError(f"unknown kNN metric {metric!r}; expected cosine or euclidean")
    if k < 1:
        raise RaddinoError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise RaddinoError(f"temperature must be > 0, got {temperature}")
    task = task or infer_task(train_y)
    if task in ("binary", "multiclass"):
        n_classes = n_classes or int(np.max(train_y)) + 1
    k = min(k, len(train_x))
    train = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    queries = torch.from_numpy(np.asarray(query_x, dtype=np.float32))
    if metric == "cosine":
        train, queries = F.normalize(train, dim=1), F.normalize(queries, dim=1)
    else:
        train_sq = (train.double() ** 2).sum(dim=1)
    votes = _targets(train_y, task, n_classes or 0)
    out = []
    for start in range(0, len(queries), chunk_size):
        q = queries[start : start + chunk_size]
        if metric == "cosine":
            similarity = q @ train.T  # (m, N)
            top, index = similarity.topk(k, dim=1)
            weights = (top.double() / temperature).exp()
        else:
            # Squared distances up to the per-query constant ||q||², which does not change the ranking.
            distance = train_sq.unsqueeze(0) - 2.0 * (q.double() @ train.double().T)
            _, index = distance.topk(k, dim=1, largest=False)
            weights = torch.ones(index.shape, dtype=torch.float64)
        weighted = (votes[index] * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        out.append(weighted)
    shares = torch.cat(out).numpy()
    if task == "binary":
        return shares[:, 1]
    if task == "regression":
        return shares[:, 0]
    return shares


def knn_probe(
    *,
    train: Split,
    val: Split,
    test: Split,
    metric: KnnMetric = "cosine",
    k: int | None = None,
    temperature: float = 0.07,
    task: Task | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """kNN evaluation: validation chooses the decision threshold(s); test metrics with bootstrap CIs.

    ``k`` defaults to 20 (cosine, DINO) or 11 (euclidean, MedMNIST+). The result's ``param_name`` is ``"k"``.
    """
    started = time.perf_counter()
    k = k or KNN_DEFAULTS.get(metric, 0)
    x_train, y_train = np.asarray(train[0]), np.asarray(train[1])
    task = task or infer_task(y_train)
    n_classes = None
    if task in ("binary", "multiclass"):
        n_classes = int(max(np.max(train[1]), np.max(val[1]), np.max(test[1]))) + 1
        n_classes = max(n_classes, 2)

    def run(split: Split) -> np.ndarray:
        return knn_scores(
            train_x=x_train,
            train_y=y_train,
            query_x=np.asarray(split[0]),
            k=k,
            metric=metric,
            temperature=temperature,
            task=task,
            n_classes=n_classes,
        )

    y_val, y_test = np.asarray(val[1]), np.asarray(test[1])
    val_scores, test_scores = run(val), run(test)
    threshold = choose_thresholds(task, y_val, val_scores)
    val_report = evaluate(task=task, y_true=y_val, scores=val_scores, threshold=threshold, n_bootstrap=0)
    test_report = evaluate(
        task=task, y_true=y_test, scores=test_scores, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed
    )
    seconds = time.perf_counter() - started
    log.info("kNN %s k=%d (%s): test %s in %.1f s", metric, k, task, test_report.values, seconds)
    return ProbeResult(
        task=task,
        param_name="k",
        best_param=float(k),
        params=[float(k)],
        val_curve=[selection_score(task, y_val, val_scores)],
        val_metrics=val_report.values,
        test_metrics=test_report.values,
        test_ci=test_report.ci,
        threshold=test_report.threshold,
        test_scores=test_scores,
        n_train=len(x_train),
        seconds=seconds,
    )
