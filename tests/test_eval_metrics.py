"""Metrics and bootstrap CIs of raddino.eval.metrics against scikit-learn and hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from raddino.errors import RaddinoError
from raddino.eval import metrics as M


def _binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + 1.2 * y, 1)  # rounding creates ties
    return y, scores


def test_weighted_auroc_and_ap_match_sklearn_sample_weight():
    y, s = _binary(400, 0)
    w = np.random.default_rng(1).integers(0, 4, size=(3, len(y))).astype(np.float64)
    auc = M.weighted_auroc(y, s, w)
    ap = M.weighted_average_precision(y, s, w)
    for b in range(3):
        assert auc[b] == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        assert ap[b] == pytest.approx(skm.average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)


def test_binary_metrics_match_sklearn():
    y, s = _binary(500, 2)
    report = M.evaluate(task="binary", y_true=y, scores=s, threshold=0.4, n_bootstrap=0)
    pred = (s >= 0.4).astype(int)
    assert report.values["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert report.values["auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert report.values["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert report.values["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert report.values["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert report.values["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    assert report.threshold == 0.4


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    n, c = 600, 4
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = M.evaluate(task="multiclass", y_true=y, scores=proba, n_bootstrap=0)
    pred = proba.argmax(axis=1)
    onehot = label_binarize(y, classes=range(c))
    assert report.values["auroc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"), abs=1e-12)
    assert report.values["auprc"] == pytest.approx(skm.average_precision_score(onehot, proba), abs=1e-12)
    assert report.values["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert report.values["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert report.values["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    kappa = skm.cohen_kappa_score(y, pred, weights="quadratic", labels=range(c))
    assert report.values["kappa_quadratic"] == pytest.approx(kappa, abs=1e-12)
    # class 3 never predicted: its F1 is 0 and still weighs by its support
    pred[pred == 3] = 0
    report = M.evaluate(task="multiclass", y_true=y, scores=np.eye(c)[pred], n_bootstrap=0)
    assert report.values["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)


def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(4)
    n, k = 500, 5
    y = (rng.random((n, k)) < [0.05, 0.2, 0.3, 0.5, 0.1]).astype(int)
    scores = np.round(rng.normal(size=(n, k)) + y, 2)
    thresholds = np.array([0.2, 0.4, 0.5, 0.6, 0.1])
    report = M.evaluate(task="multilabel", y_true=y, scores=scores, threshold=thresholds, n_bootstrap=0)
    pred = (scores >= thresholds).astype(int)
    assert report.values["auroc"] == pytest.approx(skm.roc_auc_score(y, scores, average="macro"), abs=1e-12)
    assert report.values["auprc"] == pytest.approx(skm.average_precision_score(y, scores, average="macro"), abs=1e-12)
    assert report.values["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    kappas = [skm.cohen_kappa_score(y[:, j], pred[:, j], weights="quadratic", labels=[0, 1]) for j in range(k)]
    assert report.values["kappa_quadratic"] == pytest.approx(np.mean(kappas), abs=1e-12)
    assert report.values["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    label_accuracy = np.mean([skm.accuracy_score(y[:, j], pred[:, j]) for j in range(k)])
    label_balanced = np.mean([skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(k)])
    assert report.values["accuracy"] == pytest.approx(label_accuracy, abs=1e-12)
    assert report.values["balanced_accuracy"] == pytest.approx(label_balanced, abs=1e-12)


def test_multilabel_macro_auroc_constructed_case():
    # label 0 perfectly ranked (1.0), label 1 perfectly reversed (0.0), label 2: positives {0.9, 0.3}, negatives
    # {0.5, 0.1}: pairs (0.9>0.5, 0.9>0.1, 0.3<0.5, 0.3>0.1) -> 3/4; label 3 has no positive and is skipped.
    y = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]])
    s = np.array([[0.9, 0.9, 0.9, 0.1], [0.8, 0.8, 0.5, 0.2], [0.2, 0.2, 0.3, 0.3], [0.1, 0.1, 0.1, 0.4]])
    assert M.auroc(y, s) == pytest.approx((1.0 + 0.0 + 0.75) / 3)
    report = M.evaluate(task="multilabel", y_true=y, scores=s, n_bootstrap=0)
    assert report.values["auroc"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    y = rng.normal(50, 10, 300)
    pred = y + rng.normal(0, 5, 300)
    report = M.evaluate(task="regression", y_true=y, scores=pred, n_bootstrap=0)
    assert report.values["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-12)
    assert report.values["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-12)
    assert report.values["pearson_r"] == pytest.approx(pearsonr(y, pred).statistic, abs=1e-12)


def test_regression_bootstrap_equals_explicit_resampling():
    """MAE and Pearson r CIs are the percentile bootstrap of scipy / sklearn over index resamples."""
    rng = np.random.default_rng(12)
    y = rng.normal(50, 10, 120)
    pred = 0.5 * y + rng.normal(0, 6, 120)
    n_boot, seed = 300, 3
    report = M.evaluate(task="regression", y_true=y, scores=pred, n_bootstrap=n_boot, seed=seed)
    draws = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    rs = [pearsonr(y[idx], pred[idx]).statistic for idx in draws]
    maes = [skm.mean_absolute_error(y[idx], pred[idx]) for idx in draws]
    assert report.ci["pearson_r"] == pytest.approx(tuple(np.quantile(rs, [0.025, 0.975])), abs=1e-9)
    assert report.ci["mae"] == pytest.approx(tuple(np.quantile(maes, [0.025, 0.975])), abs=1e-9)
    low, high = report.ci["pearson_r"]
    assert low < report.values["pearson_r"] < high
    constant = M.evaluate(task="regression", y_true=y, scores=np.full_like(y, 3.0), n_bootstrap=0)
    assert np.isnan(constant.values["pearson_r"])  # undefined, not 0


def test_bootstrap_equals_explicit_resampling_with_sklearn():
    """The vectorised bootstrap is the percentile bootstrap of sklearn metrics over index resamples."""
    y, s = _binary(150, 6)
    n_boot, seed = 200, 11
    report = M.evaluate(task="binary", y_true=y, scores=s, threshold=0.5, n_bootstrap=n_boot, seed=seed)
    draws = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))  # same stream, one chunk
    aucs, f1s = [], []
    for idx in draws:
        if y[idx].min() != y[idx].max():
            aucs.append(skm.roc_auc_score(y[idx], s[idx]))
        f1s.append(skm.f1_score(y[idx], (s[idx] >= 0.5).astype(int), average="macro"))
    assert report.ci["auroc"] == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)
    assert report.ci["f1_macro"] == pytest.approx(tuple(np.quantile(f1s, [0.025, 0.975])), abs=1e-9)


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    y_small, s_small = _binary(200, 7)
    y_large, s_large = _binary(3000, 8)
    small = M.evaluate(task="binary", y_true=y_small, scores=s_small, threshold=0.6, n_bootstrap=1000, seed=0)
    large = M.evaluate(task="binary", y_true=y_large, scores=s_large, threshold=0.6, n_bootstrap=1000, seed=0)
    for report in (small, large):
        for name, value in report.values.items():
            low, high = report.ci[name]
            assert low <= value <= high, name
    for name in M.CLASSIFICATION_METRICS:
        width_small = small.ci[name][1] - small.ci[name][0]
        width_large = large.ci[name][1] - large.ci[name][0]
        assert width_large < 0.6 * width_small, name  # ~ sqrt(200 / 3000) = 0.26 expected
    again = M.evaluate(task="binary", y_true=y_small, scores=s_small, threshold=0.6, n_bootstrap=1000, seed=0)
    other = M.evaluate(task="binary", y_true=y_small, scores=s_small, threshold=0.6, n_bootstrap=1000, seed=1)
    assert again.ci == small.ci
    assert other.ci["auroc"] != small.ci["auroc"]


def test_choose_threshold_maximises_balanced_accuracy():
    y, s = _binary(300, 9)
    threshold = M.choose_threshold(y, s)
    best = max(skm.balanced_accuracy_score(y, (s >= t).astype(int)) for t in np.unique(s))
    assert skm.balanced_accuracy_score(y, (s >= threshold).astype(int)) == pytest.approx(best)
    assert M.choose_threshold(np.zeros(5, dtype=int), np.arange(5.0)) == 0.5  # one class: fallback


def test_shape_errors_are_user_errors():
    with pytest.raises(RaddinoError, match="labels but"):
        M.evaluate(task="binary", y_true=np.zeros(3), scores=np.zeros(4))
    with pytest.raises(RaddinoError, match="unknown task"):
        M.evaluate(task="ordinal", y_true=np.zeros(3), scores=np.zeros(3))
    with pytest.raises(RaddinoError, match="multiclass"):
        M.evaluate(task="multiclass", y_true=np.zeros(3), scores=np.zeros(3))


def test_quadratic_kappa_weighs_grade_distance_and_bootstraps_like_sklearn():
    y = np.array([0, 1, 2, 3, 4] * 20)
    near = np.clip(y + np.tile([0, 1, -1, 0, 1], 20), 0, 4)  # off by one grade
    far = (y + 2) % 5  # off by two or more grades
    reports = [M.evaluate(task="multiclass", y_true=y, scores=np.eye(5)[p], n_bootstrap=0) for p in (near, far)]
    assert reports[0].values["kappa_quadratic"] > 0.8 > 0.0 > reports[1].values["kappa_quadratic"]
    rng = np.random.default_rng(5)
    w = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=3).astype(float)
    cm = M.weighted_confusion(y, near, 5, w)
    for b in range(3):
        expected = skm.cohen_kappa_score(y, near, weights="quadratic", labels=range(5), sample_weight=w[b])
        assert M.confusion_kappa_quadratic(cm)[b] == pytest.approx(expected, abs=1e-12)
