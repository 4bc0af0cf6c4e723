"""Classification and regression metrics with seeded, vectorised bootstrap confidence intervals.

Every metric is computed from per-sample **weights** ``w (B, N)``: the point estimate uses one row of ones, and a
bootstrap resample is a row of multinomial counts (how often each sample was drawn), so all ``B`` resamples are
evaluated together with array operations instead of a Python loop. Weighted formulas equal scikit-learn's with
``sample_weight`` (which is what the tests check), and counts as weights equal evaluating the resampled set.

Conventions (``task``):

* ``binary``: ``y (N,)`` in {0, 1}, ``scores (N,)`` (probability or any score increasing with class 1). Accuracy,
  balanced accuracy and macro F1 use ``scores >= threshold``; the threshold is chosen on the validation split by
  :func:`choose_threshold` (Youden's J, i.e. the balanced-accuracy optimum).
* ``multiclass``: ``y (N,)`` in {0..C-1}, ``scores (N, C)``; AUROC / AUPRC are macro one-vs-rest, predictions are
  the arg-max (no threshold).
* ``multilabel``: ``y (N, K)`` in {0, 1}, ``scores (N, K)``; AUROC / AUPRC are macro over labels; accuracy,
  balanced accuracy and F1 are per-label binary metrics (per-label thresholds) averaged over labels (F1 equals
  scikit-learn's ``f1_score(average="macro")`` on indicator matrices; accuracy is the mean label-wise accuracy,
  not the subset accuracy).
* ``regression``: ``y (N,)`` float, ``scores (N,)`` predictions; R², MAE and Pearson's r.

``f1_weighted`` is scikit-learn's ``f1_score(average="weighted")``: per-class F1 weighted by the true support (the
metric Huang et al. 2024 report); for multi-label, per-label F1 weighted by each label's positives.

``kappa_quadratic`` is Cohen's kappa with quadratic weights (scikit-learn's ``cohen_kappa_score(weights=
"quadratic", labels=range(C))``), the usual score of ordinal grades such as APTOS2019's diabetic retinopathy
grades 0-4; in [-1, 1]; for multi-label, the mean over labels (each a 2-class kappa).

Classes or labels with a single class present in ``y`` are skipped in macro AUROC / AUPRC (they are undefined);
in a resample where a class is missing the macro average is over the classes present.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from sklearn.metrics import roc_curve

from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "multilabel", "regression"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel", "regression")
CLASSIFICATION_METRICS = (
    "auroc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "kappa_quadratic",
)
REGRESSION_METRICS = ("r2", "mae", "pearson_r")
# Cap on B * N elements per bootstrap chunk (float32: 4 MB per array; small arrays stay in cache, measured faster).
_CHUNK_ELEMENTS = 1_000_000


# --------------------------------------------------------------------------------------------------------------
# weighted cores: y (N,), scores (N,), w (B, N) -> (B,)
# --------------------------------------------------------------------------------------------------------------


class RankedScores:
    """Samples of one binary problem grouped by tied score: the sort is done once, every weight row reuses it.

    ``matrix`` is a sparse ``(2G, N)`` 0/1 map from sample ``i`` to row ``group(i)`` (positives) or ``G + group(i)``
    (negatives), groups ordered by ascending score, so ``matrix @ w.T`` gives the positive / negative weight of
    every tie group for all weight rows in one sparse product.
    """

    def __init__(self, y: np.ndarray, scores: np.ndarray) -> None:
        y = np.asarray(y).astype(bool)
        _, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
        self.n_groups = int(group.max()) + 1 if len(group) else 0
        rows = group.ravel() + self.n_groups * (~y)
        self.matrix = sparse.csr_matrix((np.ones(len(y)), (rows, np.arange(len(y)))), shape=(2 * self.n_groups, len(y)))

    def group_weights(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``w (B, N)`` -> positive and negative weight per tie group, each ``(G, B)``, ascending score."""
        both = np.asarray(self.matrix @ np.ascontiguousarray(w.T))
        return both[: self.n_groups], both[self.n_groups :]

    def auroc(self, w: np.ndarray) -> np.ndarray:
        """Mann-Whitney AUROC with ties counted 1/2: ``sum_pos w_i (W_neg[s < s_i] + W_neg[s == s_i] / 2) /
        (W_pos W_neg)`` per weight row ``(B,)``; NaN where a row has no positive or no negative weight."""
        return self.both(w)[0]

    def average_precision(self, w: np.ndarray) -> np.ndarray:
        """scikit-learn's average precision ``sum_t (R_t - R_{t-1}) P_t`` over distinct thresholds from high to low,
        per weight row ``(B,)``; NaN where a row has no positive weight."""
        return self.both(w)[1]

    def both(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(AUROC, average precision), each ``(B,)``, from one sparse product and two cumulative sums.

        Group ``g`` (ascending score) has positive / negative weight ``p_g`` / ``n_g`` and prefix sums ``P_g`` /
        ``N_g``. AUROC numerator: ``sum_g p_g (N_g - n_g / 2)``. Thresholding at group ``g`` from the top predicts
        every group ``>= g``: ``TP = P_tot - P_g + p_g``, ``FP = N_tot - N_g + n_g``; recall rises by ``p_g / P_tot``
        there, so ``AP = sum_g p_g TP / (TP + FP) / P_tot``.
        """
        pos, neg = self.group_weights(w)
        cum_pos, cum_neg = np.cumsum(pos, axis=0), np.cumsum(neg, axis=0)
        total_pos, total_neg = cum_pos[-1], cum_neg[-1]
        auc_num = (pos * (cum_neg - 0.5 * neg)).sum(axis=0, dtype=np.float64)
        tp = total_pos - cum_pos + pos
        predicted = tp + (total_neg - cum_neg + neg)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        ap_num = (pos * precision).sum(axis=0, dtype=np.float64)
        total_pos, total_neg = total_pos.astype(np.float64), total_neg.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.where(total_pos * total_neg > 0, auc_num / (total_pos * total_neg), np.nan)
            ap = np.where(total_pos > 0, ap_num / total_pos, np.nan)
        return auc, ap


def weighted_auroc(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per weight row: ``y (N,)`` {0, 1}, ``scores (N,)``, ``w (B, N)`` -> ``(B,)`` (:class:`RankedScores`)."""
    return RankedScores(y, scores).auroc(w)


def weighted_average_precision(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision for each weight row ``(B,)`` (see :meth:`RankedScores.average_precision`)."""
    return RankedScores(y, scores).average_precision(w)


def weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices ``(B, C, C)`` (rows = true class, columns = predicted) for ``(N,)`` int labels."""
    cells = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    onehot = np.zeros((len(cells), n_classes * n_classes))
    onehot[np.arange(len(cells)), cells] = 1.0
    return (w @ onehot).reshape(len(w), n_classes, n_classes)


def confusion_accuracy(cm: np.ndarray) -> np.ndarray:
    """``(B, C, C)`` -> accuracy ``(B,)``."""
    total = cm.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(cm, axis1=1, axis2=2) / total


def confusion_balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in the true labels (scikit-learn's ``balanced_accuracy_score``)."""
    support = cm.sum(axis=2)  # (B, C) true counts
    diag = np.diagonal(cm, axis1=1, axis2=2)
    present = support > 0
    recall = np.divide(diag, support, out=np.zeros_like(diag), where=present)
    with np.errstate(invalid="ignore", divide="ignore"):
        return recall.sum(axis=1) / present.sum(axis=1)


def confusion_f1_macro(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over classes seen in the true or predicted labels (scikit-learn's macro F1)."""
    diag = np.diagonal(cm, axis1=1, axis2=2)
    denominator = cm.sum(axis=2) + cm.sum(axis=1)  # 2TP + FN + FP
    seen = denominator > 0
    f1 = np.divide(2.0 * diag, denominator, out=np.zeros_like(diag), where=seen)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f1.sum(axis=1) / seen.sum(axis=1)


def confusion_f1_weighted(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 weighted by true support ``(B,)`` (scikit-learn's weighted F1; classes never true weigh 0)."""
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    denominator = support + cm.sum(axis=1)
    f1 = np.divide(2.0 * diag, denominator, out=np.zeros_like(diag), where=denominator > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (f1 * support).sum(axis=1) / support.sum(axis=1)


def confusion_kappa_quadratic(cm: np.ndarray) -> np.ndarray:
    """Quadratic-weighted Cohen's kappa ``(B,)`` from ``(B, C, C)`` (NaN when chance agreement is perfect)."""
    n_classes = cm.shape[1]
    grades = np.arange(n_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2  # disagreement cost grows with the grade distance
    total = cm.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / total[:, None, None]
        return 1.0 - (cm * weights).sum(axis=(1, 2)) / (expected * weights).sum(axis=(1, 2))


def _class_metrics(cm: np.ndarray, auroc: np.ndarray, auprc: np.ndarray) -> dict[str, np.ndarray]:
    """The single-label classification metrics from confusion matrices ``(B, C, C)`` and ranking scores ``(B,)``."""
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": confusion_accuracy(cm),
        "balanced_accuracy": confusion_balanced_accuracy(cm),
        "f1_macro": confusion_f1_macro(cm),
        "f1_weighted": confusion_f1_weighted(cm),
        "kappa_quadratic": confusion_kappa_quadratic(cm),
    }


def binary_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of the positive class from ``(B, 2, 2)`` confusion matrices (0 when there is no positive at all)."""
    tp, fp, fn = cm[:, 1, 1], cm[:, 0, 1], cm[:, 1, 0]
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def weighted_r2(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Coefficient of determination per weight row (``(B,)``; NaN where the weighted target variance is 0)."""
    total = w.sum(axis=1, keepdims=True)
    mean = (w * y).sum(axis=1, keepdims=True) / total
    ss_tot = (w * (y - mean) ** 2).sum(axis=1)
    ss_res = (w * (y - pred) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def weighted_mae(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean absolute error per weight row ``(B,)``."""
    return (w * np.abs(y - pred)).sum(axis=1) / w.sum(axis=1)


def weighted_pearson(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``y (N,)`` and ``pred (N,)`` per weight row ``(B,)`` (NaN where either is constant).

    With counts as weights this is ``scipy.stats.pearsonr`` of the resampled set."""
    total = w.sum(axis=1, keepdims=True)
    dy = y - (w * y).sum(axis=1, keepdims=True) / total
    dp = pred - (w * pred).sum(axis=1, keepdims=True) / total
    cov = (w * dy * dp).sum(axis=1)
    var = (w * dy**2).sum(axis=1) * (w * dp**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, cov / np.sqrt(var), np.nan)


# --------------------------------------------------------------------------------------------------------------
# task-level metric sets
# --------------------------------------------------------------------------------------------------------------


def _macro(values: list[np.ndarray], n_rows: int) -> np.ndarray:
    """Nan-aware mean over classes of per-class ``(B,)`` values (NaN where every class is undefined)."""
    if not values:
        return np.full(n_rows, np.nan)
    stacked = np.stack(values, axis=1)
    counts = np.isfinite(stacked).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.nansum(stacked, axis=1) / counts, np.nan)


def _support_weighted(values: list[np.ndarray], support: list[np.ndarray]) -> np.ndarray:
    """Per-label ``(B,)`` values averaged with per-label ``(B,)`` weights (NaN where every weight is 0)."""
    weights = np.stack(support, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.stack(values, axis=1) * weights).sum(axis=1) / weights.sum(axis=1)


def _valid_columns(y: np.ndarray) -> list[int]:
    """Columns of a ``(N, K)`` indicator matrix that contain both classes (macro AUROC / AUPRC are defined)."""
    return [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]


def _macro_pair(ranked: list[RankedScores], w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro AUROC and macro average precision ``(B,)`` over one-vs-rest problems."""
    pairs = [r.both(w) for r in ranked]
    return _macro([p[0] for p in pairs], len(w)), _macro([p[1] for p in pairs], len(w))


MetricFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def _metric_fn(task: Task, y: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray | None) -> MetricFn:
    """A function ``w (B, N) -> {metric: (B,)}`` for one task, with everything independent of ``w`` precomputed."""
    if task == "regression":
        y64, pred = y.astype(np.float64), scores.astype(np.float64)
        return lambda w: {
            "r2": weighted_r2(y64, pred, w),
            "mae": weighted_mae(y64, pred, w),
            "pearson_r": weighted_pearson(y64, pred, w),
        }

    if task == "binary":
        yb = y.astype(np.int64)
        pred = (scores >= threshold).astype(np.int64)
        ranked = RankedScores(yb, scores)

        def binary(w: np.ndarray) -> dict[str, np.ndarray]:
            cm = weighted_confusion(yb, pred, 2, w)
            auc, ap = ranked.both(w)
            return _class_metrics(cm, auc, ap)

        return binary

    if task == "multiclass":
        n_classes = scores.shape[1]
        yi = y.astype(np.int64)
        onehot = np.eye(n_classes, dtype=np.int64)[yi]
        ranked_classes = [RankedScores(onehot[:, k], scores[:, k]) for k in _valid_columns(onehot)]
        pred = scores.argmax(axis=1)

        def multiclass(w: np.ndarray) -> dict[str, np.ndarray]:
            cm = weighted_confusion(yi, pred, n_classes, w)
            auc, ap = _macro_pair(ranked_classes, w)
            return _class_metrics(cm, auc, ap)

        return multiclass

    if task == "multilabel":
        yi = y.astype(np.int64)
        ranked_labels = [RankedScores(yi[:, k], scores[:, k]) for k in _valid_columns(yi)]
        preds = (scores >= np.asarray(threshold).reshape(1, -1)).astype(np.int64)

        def multilabel(w: np.ndarray) -> dict[str, np.ndarray]:
            cms = [weighted_confusion(yi[:, k], preds[:, k], 2, w) for k in range(yi.shape[1])]
            auc, ap = _macro_pair(ranked_labels, w)
            return {
                "auroc": auc,
                "auprc": ap,
                "accuracy": np.mean([confusion_accuracy(cm) for cm in cms], axis=0),
                "balanced_accuracy": np.mean([confusion_balanced_accuracy(cm) for cm in cms], axis=0),
                "f1_macro": np.mean([binary_f1(cm) for cm in cms], axis=0),
                "f1_weighted": _support_weighted([binary_f1(cm) for cm in cms], [cm[:, 1].sum(axis=1) for cm in cms]),
                "kappa_quadratic": np.mean([confusion_kappa_quadratic(cm) for cm in cms], axis=0),
            }

        return multilabel
    raise RaddinoError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def check_predictions(task: Task, y: np.ndarray, scores: np.ndarray) -> None:
    """Raise :class:`RaddinoError` when the shapes of ``y`` and ``scores`` do not fit ``task``."""
    if task not in TASKS:
        raise RaddinoError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if len(y) != len(scores):
        raise RaddinoError(f"{len(y)} labels but {len(scores)} predictions")
    if len(y) == 0:
        raise RaddinoError("no samples to evaluate")
    wanted_y, wanted_s = {"binary": (1, 1), "multiclass": (1, 2), "multilabel": (2, 2), "regression": (1, 1)}[task]
    if y.ndim != wanted_y or scores.ndim != wanted_s:
        raise RaddinoError(
            f"task {task}: labels must be {wanted_y}-D and scores {wanted_s}-D, got {y.shape} and {scores.shape}"
        )
    if task == "multilabel" and y.shape != scores.shape:
        raise RaddinoError(f"multilabel: labels {y.shape} and scores {scores.shape} differ")


def choose_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """Decision threshold maximising Youden's J (= TPR - FPR, the balanced-accuracy optimum) on ``(N,)`` data.

    Predictions are ``scores >= threshold``. Falls back to 0.5 (with a warning) when ``y`` has a single class.
    """
    y = np.asarray(y).astype(np.int64)
    if y.min() == y.max():
        log.warning("threshold selection: only class %d present in the validation labels; using 0.5", y[0])
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], np.max(scores)))  # roc_curve's first threshold is +inf


def choose_thresholds(task: Task, y: np.ndarray, scores: np.ndarray) -> float | np.ndarray | None:
    """Validation-chosen thresholds: a float (binary), one per label ``(K,)`` (multilabel) or None."""
    if task == "binary":
        return choose_threshold(y, scores)
    if task == "multilabel":
        return np.array([choose_threshold(y[:, k], scores[:, k]) for k in range(y.shape[1])])
    return None


# --------------------------------------------------------------------------------------------------------------
# evaluation + bootstrap
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricReport:
    """Point estimates and percentile-bootstrap confidence intervals of one set of predictions.

    Attributes:
        values: metric name -> point estimate (NaN when undefined, e.g. AUROC with a single class).
        ci: metric name -> (low, high) of the ``confidence`` interval; NaN when ``n_bootstrap == 0``.
        n: number of evaluated samples.
        n_bootstrap: number of resamples the intervals come from.
        threshold: the decision threshold(s) used for binary / multilabel predictions.
    """

    values: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n: int
    n_bootstrap: int
    confidence: float = 0.95
    threshold: float | list[float] | None = None


def bootstrap_weights(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n)`` counts: how often each sample is drawn in each resample (with replacement).

    float32 (exact for counts and their sums below 2**24 samples; halves the memory traffic of the bootstrap)."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    flat = (draws + (np.arange(n_resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float32)


def evaluate(
    *,
    task: Task,
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> MetricReport:
    """All metrics of ``task`` with percentile bootstrap CIs (resamples drawn from ``numpy.random.default_rng(seed)``).

    Args:
        task: ``binary`` | ``multiclass`` | ``multilabel`` | ``regression`` (shapes in the module docstring).
        y_true: labels ``(N,)`` or ``(N, K)``.
        scores: scores / probabilities / predictions ``(N,)`` or ``(N, C)``.
        threshold: decision threshold(s) for binary (float) / multilabel (``(K,)``); default 0.5. Choose them on
            the validation split with :func:`choose_thresholds`.
        n_bootstrap: resamples of the evaluated set (0 = no intervals).
        seed: seed of the resampling generator (same seed -> same intervals).
        confidence: coverage of the intervals.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    check_predictions(task, y_true, scores)
    if not 0.0 < confidence < 1.0:
        raise RaddinoError(f"confidence must be in (0, 1), got {confidence}")
    if threshold is None and task in ("binary", "multilabel"):
        threshold = 0.5 if task == "binary" else np.full(y_true.shape[1], 0.5)
    fn = _metric_fn(task, y_true, scores, threshold)
    n = len(y_true)
    point = {name: float(value[0]) for name, value in fn(np.ones((1, n))).items()}
    ci = {name: (math.nan, math.nan) for name in point}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // n))
        samples: dict[str, list[np.ndarray]] = {name: [] for name in point}
        for start in range(0, n_bootstrap, chunk):
            values = fn(bootstrap_weights(n, min(chunk, n_bootstrap - start), rng))
            for name, value in values.items():
                samples[name].append(value)
        alpha = (1.0 - confidence) / 2.0
        for name, parts in samples.items():
            finite = np.concatenate(parts)
            finite = finite[np.isfinite(finite)]
            if len(finite):
                low, high = np.quantile(finite, [alpha, 1.0 - alpha])
                ci[name] = (float(low), float(high))
    if threshold is None:
        threshold_out = None
    elif np.ndim(threshold) == 0:
        threshold_out = float(threshold)
    else:
        threshold_out = [float(t) for t in np.asarray(threshold)]
    return MetricReport(
        values=point, ci=ci, n=n, n_bootstrap=n_bootstrap, confidence=confidence, threshold=threshold_out
    )


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC of ``(N,)`` labels and scores; macro over columns for ``(N, K)`` indicator labels."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y_true.ndim == 1:
        return float(weighted_auroc(y_true, scores, np.ones((1, len(y_true))))[0])
    ones = np.ones((1, len(y_true)))
    return float(_macro([weighted_auroc(y_true[:, k], scores[:, k], ones) for k in _valid_columns(y_true)], 1)[0])


def auprc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ``(N,)`` labels and scores; macro over columns for ``(N, K)`` indicator labels."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    ones = np.ones((1, len(y_true)))
    if y_true.ndim == 1:
        return float(weighted_average_precision(y_true, scores, ones)[0])
    columns = _valid_columns(y_true)
    return float(_macro([weighted_average_precision(y_true[:, k], scores[:, k], ones) for k in columns], 1)[0])


def selection_score(task: Task, y_true: np.ndarray, scores: np.ndarray) -> float:
    """The validation criterion used to pick hyper-parameters: macro AUROC (classification) or R² (regression)."""
    if task == "regression":
        y, pred = np.asarray(y_true, np.float64), np.asarray(scores, np.float64)
        return float(weighted_r2(y, pred, np.ones((1, len(y))))[0])
    if task == "multiclass":
        return auroc(np.eye(scores.shape[1], dtype=np.int64)[np.asarray(y_true, np.int64)], scores)
    return auroc(y_true, scores)
