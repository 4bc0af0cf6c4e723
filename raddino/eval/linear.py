"""Linear probes on frozen features: logistic regression (classification) and ridge regression (continuous targets).

Both standardise features with the training split's mean / std, sweep the regularisation strength on the validation
split, keep the model fitted **on the training split** at the best value (no refit on train + val: the validation
split also chooses the decision threshold, and refitting would make that threshold optimistic), and score the test
split with bootstrap CIs (:func:`raddino.eval.metrics.evaluate`).

Logistic regression follows DINOv2's log-regression protocol: ``C`` on a log grid (``10 ** linspace(-6, 5, 45)`` by
default), L-BFGS. The sweep goes from strong to weak regularisation with warm starts, so each fit starts from the
previous optimum (the whole 45-point path costs a few cold fits). Multi-label targets are one-vs-rest: one binary
problem per label, all sharing the ``C`` that maximises macro validation AUROC.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from raddino.errors import RaddinoError
from raddino.eval.metrics import Task, choose_thresholds, evaluate, selection_score

log = logging.getLogger(__name__)

# DINOv2 eval/log_regression.py: C_POWER_RANGE = torch.linspace(-6, 5, 45); C = 10 ** power.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in 10.0 ** np.linspace(-3, 6, 28))

Split = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe.

    Attributes:
        task: binary | multiclass | multilabel | regression.
        param_name: ``"C"`` (logistic regression) or ``"alpha"`` (ridge).
        best_param: the selected value; also available as :attr:`best_C`.
        params: the swept grid, in sweep order.
        val_curve: validation selection score (macro AUROC, or R² for regression) for each value of ``params``.
        val_metrics / test_metrics: point estimates (``auroc``, ``auprc``, ``accuracy``, ``balanced_accuracy``,
            ``f1_macro``, ``f1_weighted``; or ``r2``, ``mae``, ``pearson_r``).
        test_ci: 95 % bootstrap interval of every test metric.
        threshold: decision threshold(s) chosen on validation (binary: float; multilabel: one per label).
        test_scores: ``(N_test,)`` positive-class probability, ``(N_test, C)`` class probabilities, ``(N_test, K)``
            label probabilities or ``(N_test,)`` regression predictions.
        n_train: training samples used.
        seconds: wall time of the sweep + scoring.
    """

    task: Task
    param_name: str
    best_param: float
    params: list[float]
    val_curve: list[float]
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_ci: dict[str, tuple[float, float]]
    threshold: float | list[float] | None
    test_scores: np.ndarray = field(repr=False)
    n_train: int = 0
    seconds: float = 0.0

    @property
    def best_C(self) -> float:  # noqa: N802  (scikit-learn's spelling)
        """The selected regularisation value (``C`` for logistic regression, ``alpha`` for ridge)."""
        return self.best_param


def infer_task(labels: np.ndarray, *, multilabel: bool = False) -> Task:
    """``multilabel`` for ``(N, K)`` labels (or when asked), ``regression`` for float labels, ``binary`` for integer
    labels in {0, 1}, else ``multiclass``."""
    labels = np.asarray(labels)
    if multilabel or labels.ndim == 2:
        return "multilabel"
    if np.issubdtype(labels.dtype, np.floating):
        return "regression"
    return "binary" if labels.max(initial=0) <= 1 else "multiclass"


class Standardizer:
    """Per-feature ``(x - mean) / std`` with the statistics of the training split (std 0 -> 1), float64 output."""

    def __init__(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std


def _check_split(name: str, split: Split, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(split[0]), np.asarray(split[1])
    if x.ndim != 2:
        raise RaddinoError(f"{name} features must be 2-D (N, D), got shape {x.shape}")
    if len(x) != len(y):
        raise RaddinoError(f"{name}: {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise RaddinoError(f"{name} split is empty")
    if dim is not None and x.shape[1] != dim:
        raise RaddinoError(f"{name} features have dimension {x.shape[1]}, train features {dim}")
    if not np.all(np.isfinite(x)):
        raise RaddinoError(f"{name} features contain NaN or infinite values")
    return x, y


class _BinaryPath:
    """One warm-started logistic regression along the C path (or a constant when train has a single class)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, max_iter: int, tol: float, seed: int) -> None:
        self.x, self.y = x, y
        self.constant = float(y.mean()) if y.min() == y.max() else None
        self.model = LogisticRegression(
            C=1.0, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=True, random_state=seed
        )

    def fit(self, c: float) -> None:
        if self.constant is None:
            self.model.set_params(C=c)
            self.model.fit(self.x, self.y)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` probability of the positive class."""
        if self.constant is not None:
            return np.full(len(x), self.constant)
        return self.model.predict_proba(x)[:, 1]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.constant is not None:
            return None
        return self.model.coef_.copy(), self.model.intercept_.copy()

    def proba_from(self, snapshot: tuple[np.ndarray, np.ndarray] | None, x: np.ndarray) -> np.ndarray:
        if snapshot is None:
            return np.full(len(x), self.constant)
        coef, intercept = snapshot
        return 1.0 / (1.0 + np.exp(-(x @ coef[0] + intercept[0])))


class _MulticlassPath:
    """Multinomial logistic regression along the C path; probabilities for classes absent from train are 0."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, n_classes: int, max_iter: int, tol: float, seed: int) -> None:
        self.x, self.y, self.n_classes = x, y, n_classes
        self.present = np.unique(y)
        if len(self.present) < 2:
            raise RaddinoError(f"multiclass probe: the training split has a single class ({self.present[0]})")
        self.model = LogisticRegression(
            C=1.0, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=True, random_state=seed
        )

    def fit(self, c: float) -> None:
        self.model.set_params(C=c)
        self.model.fit(self.x, self.y)

    def _expand(self, proba: np.ndarray) -> np.ndarray:
        out = np.zeros((len(proba), self.n_classes))
        out[:, self.present] = proba
        return out

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self._expand(self.model.predict_proba(x))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        return self.model.coef_.copy(), self.model.intercept_.copy()

    def proba_from(self, snapshot: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
        coef, intercept = snapshot
        if len(self.present) == 2:  # scikit-learn stores one row for two classes: logit of the second
            p1 = 1.0 / (1.0 + np.exp(-(x @ coef[0] + intercept[0])))
            return self._expand(np.stack([1.0 - p1, p1], axis=1))
        logits = x @ coef.T + intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return self._expand(exp / exp.sum(axis=1, keepdims=True))


def linear_probe(
    *,
    train: Split,
    val: Split,
    test: Split,
    Cs: Sequence[float] | None = None,  # noqa: N803  (scikit-learn's spelling)
    multilabel: bool = False,
    task: Task | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """Logistic-regression probe with ``C`` chosen on validation; see the module docstring.

    Args:
        train / val / test: ``(features (N, D), labels)``; labels ``(N,)`` integers (binary / multiclass) or
            ``(N, K)`` 0/1 (multilabel). Continuous labels are routed to :func:`ridge_probe`.
        Cs: inverse regularisation strengths, swept in increasing order (default :data:`DEFAULT_CS`).
        multilabel: treat ``(N, K)`` labels as independent binary problems (also inferred from 2-D labels).
        task: force the task instead of inferring it.
        seed: seed of the solver (L-BFGS is deterministic; kept for API symmetry) and of the bootstrap.
        max_iter / tol: L-BFGS limits per fit.
        n_bootstrap: resamples for the test CIs.
    """
    started = time.perf_counter()
    x_train, y_train = _check_split("train", train, None)
    x_val, y_val = _check_split("val", val, x_train.shape[1])
    x_test, y_test = _check_split("test", test, x_train.shape[1])
    task = task or infer_task(y_train, multilabel=multilabel)
    if task == "regression":
        return ridge_probe(train=train, val=val, test=test, seed=seed, n_bootstrap=n_bootstrap)
    grid = sorted(float(c) for c in (Cs if Cs is not None else DEFAULT_CS))
    if not grid or min(grid) <= 0:
        raise RaddinoError(f"Cs must be positive values, got {list(Cs or [])}")
    scaler = Standardizer(x_train)
    x_train, x_val, x_test = scaler(x_train), scaler(x_val), scaler(x_test)

    if task == "multilabel":
        y_train, y_val, y_test = (np.asarray(y, dtype=np.int64) for y in (y_train, y_val, y_test))
        paths = [
            _BinaryPath(x_train, y_train[:, k], max_iter=max_iter, tol=tol, seed=seed) for k in range(y_train.shape[1])
        ]
    elif task == "binary":
        paths = [_BinaryPath(x_train, y_train.astype(np.int64), max_iter=max_iter, tol=tol, seed=seed)]
    elif task == "multiclass":
        n_classes = int(max(y_train.max(), y_val.max(), y_test.max())) + 1
        paths = [
            _MulticlassPath(
                x_train, y_train.astype(np.int64), n_classes=n_classes, max_iter=max_iter, tol=tol, seed=seed
            )
        ]
    else:
        raise RaddinoError(f"linear_probe: unknown task {task!r}")

    def scores(path_probas: list[np.ndarray]) -> np.ndarray:
        return np.stack(path_probas, axis=1) if task == "multilabel" else path_probas[0]

    curve: list[float] = []
    best_score, best_index, best_snapshots = -math.inf, 0, None
    n_unconverged = 0
    for index, c in enumerate(grid):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            for path in paths:
                path.fit(c)
        n_unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        score = selection_score(task, y_val, scores([p.proba(x_val) for p in paths]))
        curve.append(score)
        if score > best_score:  # strict: ties keep the stronger regularisation
            best_score, best_index = score, index
            best_snapshots = [p.snapshot() for p in paths]
    if n_unconverged:
        log.warning("linear probe: %d fits hit max_iter=%d before converging", n_unconverged, max_iter)
    if best_snapshots is None:  # every score was NaN (e.g. a single class in val)
        raise RaddinoError("linear probe: the validation metric is undefined (does the val split have both classes?)")
    val_scores = scores([p.proba_from(s, x_val) for p, s in zip(paths, best_snapshots, strict=True)])
    test_scores = scores([p.proba_from(s, x_test) for p, s in zip(paths, best_snapshots, strict=True)])
    threshold = choose_thresholds(task, y_val, val_scores)
    val_report = evaluate(task=task, y_true=y_val, scores=val_scores, threshold=threshold, n_bootstrap=0)
    test_report = evaluate(
        task=task, y_true=y_test, scores=test_scores, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed
    )
    seconds = time.perf_counter() - started
    log.info(
        "linear probe (%s): best C=%.3g (val %.4f) test AUROC %.4f in %.1f s",
        task,
        grid[best_index],
        best_score,
        test_report.values["auroc"],
        seconds,
    )
    return ProbeResult(
        task=task,
        param_name="C",
        best_param=grid[best_index],
        params=grid,
        val_curve=curve,
        val_metrics=val_report.values,
        test_metrics=test_report.values,
        test_ci=test_report.ci,
        threshold=test_report.threshold,
        test_scores=test_scores,
        n_train=len(x_train),
        seconds=seconds,
    )


class RidgePath:
    """Ridge regression ``min ||X w + b - y||² + alpha ||w||²`` for many ``alpha`` from one eigendecomposition.

    ``X (N, D)`` is centred (the intercept is the target mean, as in scikit-learn's ``Ridge``). With ``N >= D`` the
    primal ``w = V diag(1 / (l + alpha)) V^T X^T y`` uses ``X^T X = V diag(l) V^T``; with ``N < D`` the dual
    ``w = X^T U diag(1 / (l + alpha)) U^T y`` uses ``X X^T = U diag(l) U^T`` (cheaper and identical).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.x_mean = x.mean(axis=0)
        self.y_mean = float(y.mean())
        xc, yc = x - self.x_mean, y - self.y_mean
        self.primal = xc.shape[0] >= xc.shape[1]
        if self.primal:
            self.eigvals, self.eigvecs = np.linalg.eigh(xc.T @ xc)
            self.projected = self.eigvecs.T @ (xc.T @ yc)  # (D,)
        else:
            self.eigvals, self.eigvecs = np.linalg.eigh(xc @ xc.T)
            self.projected = self.eigvecs.T @ yc  # (N,)
            self.xc = xc
        self.eigvals = np.clip(self.eigvals, 0.0, None)  # round-off can make tiny eigenvalues negative

    def coef(self, alpha: float) -> np.ndarray:
        """Weights ``(D,)`` for one ``alpha > 0``."""
        if self.primal:
            return self.eigvecs @ (self.projected / (self.eigvals + alpha))
        return self.xc.T @ (self.eigvecs @ (self.projected / (self.eigvals + alpha)))

    def predict(self, alpha: float, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.x_mean) @ self.coef(alpha) + self.y_mean


def ridge_probe(
    *,
    train: Split,
    val: Split,
    test: Split,
    alphas: Sequence[float] | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """Ridge probe for a continuous target (e.g. age): ``alpha`` maximising validation R², test R² / MAE + CIs."""
    started = time.perf_counter()
    x_train, y_train = _check_split("train", train, None)
    x_val, y_val = _check_split("val", val, x_train.shape[1])
    x_test, y_test = _check_split("test", test, x_train.shape[1])
    for name, y in (("train", y_train), ("val", y_val), ("test", y_test)):
        if y.ndim != 1:
            raise RaddinoError(f"ridge probe: {name} targets must be 1-D, got shape {y.shape}")
    grid = sorted((float(a) for a in (alphas if alphas is not None else DEFAULT_ALPHAS)), reverse=True)
    if not grid or min(grid) <= 0:
        raise RaddinoError(f"alphas must be positive values, got {list(alphas or [])}")
    scaler = Standardizer(x_train)
    x_train, x_val, x_test = scaler(x_train), scaler(x_val), scaler(x_test)
    path = RidgePath(x_train, y_train)
    curve = [selection_score("regression", y_val, path.predict(alpha, x_val)) for alpha in grid]
    finite = [(score, -i) for i, score in enumerate(curve) if np.isfinite(score)]
    if not finite:
        raise RaddinoError("ridge probe: validation R² is undefined (constant validation targets?)")
    best_index = -max(finite)[1]
    alpha = grid[best_index]
    val_report = evaluate(task="regression", y_true=y_val, scores=path.predict(alpha, x_val), n_bootstrap=0)
    test_scores = path.predict(alpha, x_test)
    test_report = evaluate(task="regression", y_true=y_test, scores=test_scores, n_bootstrap=n_bootstrap, seed=seed)
    seconds = time.perf_counter() - started
    log.info("ridge probe: best alpha=%.3g test R² %.4f in %.1f s", alpha, test_report.values["r2"], seconds)
    return ProbeResult(
        task="regression",
        param_name="alpha",
        best_param=alpha,
        params=grid,
        val_curve=curve,
        val_metrics=val_report.values,
        test_metrics=test_report.values,
        test_ci=test_report.ci,
        threshold=None,
        test_scores=test_scores,
        n_train=len(x_train),
        seconds=seconds,
    )
