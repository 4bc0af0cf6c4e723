"""Linear (logistic / ridge) probes of raddino.eval.linear against scikit-learn and the PneumoniaMNIST floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score

from raddino.errors import RaddinoError
from raddino.eval.linear import RidgePath, Standardizer, linear_probe, ridge_probe


def _blobs(n: int, d: int, seed: int, n_classes: int = 2, shift: float = 0.6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.normal(size=(n_classes, d))
    x = rng.normal(size=(n, d)) + shift * centers[y]
    return x.astype(np.float32), y


def _splits(x, y):
    n = len(x)
    a, b = int(0.6 * n), int(0.8 * n)
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def test_binary_probe_is_sklearn_at_the_selected_C():
    train, val, test = _splits(*_blobs(600, 20, 0))
    result = linear_probe(train=train, val=val, test=test, n_bootstrap=100, tol=1e-8)
    assert result.best_C == result.params[int(np.argmax(result.val_curve))]
    assert len(result.params) == 45 and result.params[0] == pytest.approx(1e-6) and result.params[-1] == 1e5
    scaler = Standardizer(train[0])
    reference = LogisticRegression(C=result.best_C, max_iter=5000, tol=1e-10).fit(scaler(train[0]), train[1])
    expected = reference.predict_proba(scaler(test[0]))[:, 1]
    np.testing.assert_allclose(result.test_scores, expected, atol=1e-4)  # warm-started path vs cold fit
    assert result.test_metrics["auroc"] == pytest.approx(roc_auc_score(test[1], result.test_scores))
    assert set(result.test_metrics) == {
        "auroc",
        "auprc",
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "f1_weighted",
        "kappa_quadratic",
    }
    assert result.test_metrics["auroc"] > 0.8
    low, high = result.test_ci["auroc"]
    assert low <= result.test_metrics["auroc"] <= high


def test_multilabel_probe_is_one_vs_rest_with_shared_C():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    y = np.stack([x[:, 0] > 0.3, x[:, 1] + x[:, 2] > 0, x[:, 3] < -1.0], axis=1).astype(int)
    y[:300, 2] = 0  # third label: rare in train, still present
    y[299, 2] = 1
    train, val, test = _splits(x, y)
    result = linear_probe(train=train, val=val, test=test, Cs=[0.01, 0.1, 1.0, 10.0], n_bootstrap=50, tol=1e-8)
    assert result.task == "multilabel" and result.test_scores.shape == (len(test[0]), 3)
    scaler = Standardizer(train[0])
    for k in range(3):
        reference = LogisticRegression(C=result.best_C, max_iter=5000, tol=1e-10).fit(scaler(train[0]), train[1][:, k])
        np.testing.assert_allclose(result.test_scores[:, k], reference.predict_proba(scaler(test[0]))[:, 1], atol=1e-4)
    for k in range(2):  # the well-represented labels are learned
        assert roc_auc_score(test[1][:, k], result.test_scores[:, k]) > 0.9
    assert isinstance(result.threshold, list) and len(result.threshold) == 3


def test_multilabel_label_constant_in_train_scores_its_prevalence():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, np.zeros(300, dtype=int)], axis=1)
    y[250:260, 1] = 1  # positives only in val / test
    train, val, test = (x[:200], y[:200]), (x[200:255], y[200:255]), (x[255:], y[255:])
    result = linear_probe(train=train, val=val, test=test, Cs=[0.1, 1.0], n_bootstrap=0)
    np.testing.assert_allclose(result.test_scores[:, 1], 0.0)


def test_multiclass_probe_probabilities():
    train, val, test = _splits(*_blobs(900, 10, 3, n_classes=3, shift=1.5))
    result = linear_probe(train=train, val=val, test=test, Cs=[0.01, 0.1, 1.0], n_bootstrap=0, tol=1e-8)
    assert result.task == "multiclass" and result.test_scores.shape == (len(test[0]), 3)
    np.testing.assert_allclose(result.test_scores.sum(axis=1), 1.0, atol=1e-9)
    scaler = Standardizer(train[0])
    reference = LogisticRegression(C=result.best_C, max_iter=5000, tol=1e-10).fit(scaler(train[0]), train[1])
    np.testing.assert_allclose(result.test_scores, reference.predict_proba(scaler(test[0])), atol=1e-4)
    assert result.test_metrics["accuracy"] > 0.8


def test_probe_input_errors():
    train, val, test = _splits(*_blobs(100, 4, 4))
    with pytest.raises(RaddinoError, match="val features have dimension 3"):
        linear_probe(train=train, val=(val[0][:, :3], val[1]), test=test)
    with pytest.raises(RaddinoError, match="NaN"):
        linear_probe(train=(np.full_like(train[0], np.nan), train[1]), val=val, test=test)


@pytest.mark.parametrize("n", [200, 30])  # primal (N >= D) and dual (N < D) solutions
def test_ridge_path_matches_sklearn(n):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 50))
    y = x @ rng.normal(size=50) + rng.normal(size=n)
    path = RidgePath(x, y)
    for alpha in (0.1, 10.0, 1000.0):
        reference = Ridge(alpha=alpha).fit(x, y)
        np.testing.assert_allclose(path.coef(alpha), reference.coef_, atol=1e-8)
        np.testing.assert_allclose(path.predict(alpha, x[:5]), reference.predict(x[:5]), atol=1e-8)


def test_ridge_probe_recovers_a_linear_target():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    age = 50 + 8 * x[:, 0] - 5 * x[:, 1] + rng.normal(0, 2, 800)
    train, val, test = _splits(x, age)
    result = linear_probe(train=train, val=val, test=test, task="regression", n_bootstrap=100)
    assert result.task == "regression" and result.param_name == "alpha"
    assert result.test_metrics["r2"] > 0.9 and result.test_metrics["mae"] < 2.5
    direct = ridge_probe(train=train, val=val, test=test, n_bootstrap=100)
    assert direct.test_metrics == result.test_metrics


def test_raw_pixel_probe_reproduces_the_pneumoniamnist_floor(pneumoniamnist: Path):
    data = np.load(pneumoniamnist)

    def split(name: str):
        images = data[f"{name}_images"]
        return images.reshape(len(images), -1).astype(np.float32) / 255.0, data[f"{name}_labels"][:, 0]

    result = linear_probe(train=split("train"), val=split("val"), test=split("test"), n_bootstrap=200)
    assert 0.915 <= result.test_metrics["auroc"] <= 0.935  # known raw-pixel logistic-regression floor
