"""kNN classifiers of raddino.eval.knn: separable data, reference loops, multi-label and regression votes."""

from __future__ import annotations

import numpy as np
import pytest

from raddino.errors import RaddinoError
from raddino.eval.knn import knn_probe, knn_scores


def test_knn_separable_features_are_classified_perfectly():
    rng = np.random.default_rng(7)
    centers = np.eye(4, 16) * 10.0
    y_train, y_test = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
    x_train = centers[y_train] + rng.normal(0, 0.5, (200, 16))
    x_test = centers[y_test] + rng.normal(0, 0.5, (80, 16))
    for metric in ("cosine", "euclidean"):
        result = knn_probe(
            train=(x_train, y_train), val=(x_test, y_test), test=(x_test, y_test), metric=metric, n_bootstrap=0
        )
        assert result.test_metrics["accuracy"] == 1.0
        assert result.test_metrics["auroc"] == 1.0
        assert result.best_param == (20 if metric == "cosine" else 11)


def test_knn_scores_match_reference_loops():
    rng = np.random.default_rng(8)
    x_train, y_train = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    queries = rng.normal(size=(7, 5))
    cosine = knn_scores(train_x=x_train, train_y=y_train, query_x=queries, k=5, metric="cosine", temperature=0.1)
    euclid = knn_scores(train_x=x_train, train_y=y_train, query_x=queries, k=5, metric="euclidean")
    unit_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    for i, q in enumerate(queries):
        similarity = unit_train @ (q / np.linalg.norm(q))
        top = np.argsort(-similarity)[:5]
        votes = np.zeros(3)
        for j in top:
            votes[y_train[j]] += np.exp(similarity[j] / 0.1)
        np.testing.assert_allclose(cosine[i], votes / votes.sum(), rtol=1e-5)
        nearest = np.argsort(np.linalg.norm(x_train - q, axis=1))[:5]
        np.testing.assert_allclose(euclid[i], np.bincount(y_train[nearest], minlength=3) / 5)


def test_knn_multilabel_and_regression_scores():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(100, 4))
    multi = (x[:, :3] > 0).astype(int)
    scores = knn_scores(train_x=x, train_y=multi, query_x=x[:10], k=1, metric="euclidean", task="multilabel")
    np.testing.assert_array_equal(scores, multi[:10])  # the nearest neighbour of a training point is itself
    target = x[:, 0] * 3.0
    pred = knn_scores(train_x=x, train_y=target, query_x=x[:10], k=1, metric="euclidean", task="regression")
    np.testing.assert_allclose(pred, target[:10])
    with pytest.raises(RaddinoError, match="unknown kNN metric"):
        knn_scores(train_x=x, train_y=target, query_x=x, k=3, metric="manhattan")
