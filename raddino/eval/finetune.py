"""Supervised heads: frozen backbone + linear head, or the whole network fine-tuned with layer-wise lr decay.

The "freezing mechanism" comparison of the seed papers: both modes train the same head (``BatchNorm1d`` without
affine parameters + ``Linear``, MAE's linear-probe head) with the same AdamW schedule (linear warm-up, cosine decay)
and early stopping on the validation selection score (macro AUROC, or R²), restoring the best epoch before scoring
the test split.

* ``frozen``: the head trains on cached features (:mod:`raddino.eval.features`); the backbone never runs again.
* ``unfrozen``: backbone + head train end to end on images; the backbone's learning rate decays by
  ``layer_decay`` per block from the top (``lr * layer_decay ** (L + 1 - layer)``, layer 0 = input embedding).

Neither mode augments images (both see the same deterministic inputs, so the comparison isolates freezing).
All randomness (head init, shuffling, dropout / drop-path) comes from ``seed``; the caller's RNG state is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from raddino.errors import RaddinoError
from raddino.eval.adapters.base import Backbone, Preprocess, layer_index, torch_seed
from raddino.eval.datasets.base import EvalSplit
from raddino.eval.linear import ProbeResult
from raddino.eval.metrics import Task, choose_thresholds, evaluate, selection_score
from raddino.optim import layer_decay_lr_mult, no_weight_decay
from raddino.schedules import warmup_cosine

log = logging.getLogger(__name__)

FINETUNE_MODES = ("frozen", "unfrozen")


@dataclass(frozen=True)
class TrainSchedule:
    """Optimisation settings shared by both modes.

    Attributes:
        epochs: maximum passes over the training split.
        lr: peak learning rate of the head (and of the top of the backbone, before layer decay).
        weight_decay: AdamW weight decay (not applied to biases, norms and tokens).
        batch_size: training batch size.
        patience: stop after this many epochs without a better validation score.
        warmup_fraction: share of the steps with a linear warm-up.
        layer_decay: per-block lr decay of the backbone (unfrozen mode).
    """

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    patience: int = 5
    warmup_fraction: float = 0.1
    layer_decay: float = 0.75

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise RaddinoError("fine-tuning needs epochs, batch_size and patience >= 1")
        if self.lr <= 0 or not 0 < self.layer_decay <= 1 or not 0 <= self.warmup_fraction < 1:
            raise RaddinoError("fine-tuning needs lr > 0, 0 < layer_decay <= 1 and 0 <= warmup_fraction < 1")


def output_dim(task: Task, labels: np.ndarray) -> int:
    """Head width: 1 (binary, regression), C (multiclass), K (multilabel)."""
    if task in ("binary", "regression"):
        return 1
    if task == "multilabel":
        return labels.shape[1]
    return int(labels.max()) + 1


class TaskLoss:
    """Loss on head outputs and the conversion of outputs to scores, for one task.

    Regression targets are standardised with the training mean / std (predictions are mapped back)."""

    def __init__(self, task: Task, train_labels: np.ndarray) -> None:
        self.task = task
        self.mean, self.std = 0.0, 1.0
        if task == "regression":
            self.mean = float(np.mean(train_labels))
            self.std = float(np.std(train_labels)) or 1.0

    def targets(self, labels: np.ndarray) -> Tensor:
        if self.task == "multiclass":
            return torch.from_numpy(labels.astype(np.int64))
        if self.task == "regression":
            return torch.from_numpy(((labels - self.mean) / self.std).astype(np.float32))
        return torch.from_numpy(labels.astype(np.float32))

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.task == "multiclass":
            return F.cross_entropy(logits, target)
        if self.task == "regression":
            return F.mse_loss(logits[:, 0], target)
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], target)
        return F.binary_cross_entropy_with_logits(logits, target)

    def scores(self, logits: Tensor) -> np.ndarray:
        logits = logits.float()
        if self.task == "multiclass":
            return logits.softmax(dim=1).numpy()
        if self.task == "regression":
            return logits[:, 0].numpy() * self.std + self.mean
        if self.task == "binary":
            return logits[:, 0].sigmoid().numpy()
        return logits.sigmoid().numpy()


def make_head(in_dim: int, out_dim: int) -> nn.Module:
    """``BatchNorm1d(in_dim, affine=False)`` + ``Linear(in_dim, out_dim)`` (weights N(0, 0.01), zero bias)."""
    linear = nn.Linear(in_dim, out_dim)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), linear)


def param_groups(
    *, head: nn.Module, backbone: nn.Module | None, layer_decay: float, weight_decay: float
) -> list[dict[str, object]]:
    """AdamW groups with ``lr_mult`` (layer-wise decay over the backbone's blocks) and per-group weight decay."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    named: list[tuple[str, nn.Parameter, float]] = [(n, p, 1.0) for n, p in head.named_parameters()]
    if backbone is not None:
        layers = {name: layer_index(name) for name, _ in backbone.named_parameters()}
        depth = max((i for i in layers.values() if i is not None), default=0)
        for name, param in backbone.named_parameters():
            index = layers[name]
            index = depth + 1 if index is None else index
            named.append((name, param, layer_decay_lr_mult(index, num_layers=depth, layer_decay=layer_decay)))
    for name, param, mult in named:
        if param.requires_grad:
            wd = 0.0 if no_weight_decay(name, param) else weight_decay
            groups.setdefault((mult, wd), []).append(param)
    return [{"params": ps, "lr_mult": m, "weight_decay": wd} for (m, wd), ps in groups.items()]


class _LabelledImages(Dataset):
    """(preprocessed image ``(3, S, S)``, target) pairs; holds the preprocessing only, not the model, so worker
    processes do not receive a copy of the weights."""

    def __init__(self, split: EvalSplit, preprocess: Preprocess, resize: str, targets: Tensor) -> None:
        self.split, self.preprocess, self.resize, self.targets = split, preprocess, resize, targets

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.preprocess(self.split.images.load(index), resize=self.resize)
        return image, self.targets[index]


@dataclass
class _Fit:
    """Training state shared by both modes."""

    forward: Callable[[Tensor], Tensor]  # inputs -> logits (B, out)
    modules: list[nn.Module]
    train_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]
    predict: Callable[[str], Tensor]  # split name -> logits of every sample (eval mode, no grad)
    n_steps_per_epoch: int


def _train(
    fit: _Fit,
    *,
    loss: TaskLoss,
    optimizer: torch.optim.Optimizer,
    schedule: TrainSchedule,
    y_val: np.ndarray,
    device: torch.device,
) -> tuple[int, list[float]]:
    """Epochs with early stopping; restores the best modules' state. Returns (best epoch, val curve)."""
    total = schedule.epochs * fit.n_steps_per_epoch
    warmup = int(schedule.warmup_fraction * total)
    best_score, best_epoch, best_state, curve, step = -math.inf, -1, None, [], 0
    for epoch in range(schedule.epochs):
        for module in fit.modules:
            module.train()
        for inputs, target in fit.train_batches():
            lr = warmup_cosine(step, peak=schedule.lr, total_steps=total, warmup_steps=warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = fit.forward(inputs)
            else:
                logits = fit.forward(inputs)
            value = loss(logits.float(), target)
            if not torch.isfinite(value):
                raise RaddinoError(f"fine-tuning diverged (loss {value.item()}) at epoch {epoch}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            step += 1
        score = selection_score(loss.task, y_val, loss.scores(fit.predict("val")))
        curve.append(score)
        log.info("fine-tune epoch %d: val score %.4f (lr %.2e)", epoch, score, lr)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = [copy.deepcopy({k: v.detach().cpu() for k, v in m.state_dict().items()}) for m in fit.modules]
        elif epoch - best_epoch >= schedule.patience:
            log.info("early stopping after epoch %d (best %d)", epoch, best_epoch)
            break
    if best_state is None:
        raise RaddinoError("fine-tuning: the validation score is undefined (does val have both classes?)")
    for module, state in zip(fit.modules, best_state, strict=True):
        module.load_state_dict(state)
    return best_epoch, curve


def _result(
    *,
    task: Task,
    loss: TaskLoss,
    fit: _Fit,
    val: np.ndarray,
    test: np.ndarray,
    best_epoch: int,
    curve: list[float],
    n_train: int,
    seed: int,
    n_bootstrap: int,
    started: float,
) -> ProbeResult:
    val_scores = loss.scores(fit.predict("val"))
    test_scores = loss.scores(fit.predict("test"))
    threshold = choose_thresholds(task, val, val_scores)
    val_report = evaluate(task=task, y_true=val, scores=val_scores, threshold=threshold, n_bootstrap=0)
    test_report = evaluate(
        task=task, y_true=test, scores=test_scores, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed
    )
    return ProbeResult(
        task=task,
        param_name="epoch",
        best_param=float(best_epoch),
        params=[float(e) for e in range(len(curve))],
        val_curve=curve,
        val_metrics=val_report.values,
        test_metrics=test_report.values,
        test_ci=test_report.ci,
        threshold=test_report.threshold,
        test_scores=test_scores,
        n_train=n_train,
        seconds=time.perf_counter() - started,
    )


def train_linear_head(
    *,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    task: Task,
    schedule: TrainSchedule,
    seed: int = 0,
    device: str | torch.device = "cpu",
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """Frozen mode: a linear head trained on frozen features ``(N, D)`` with early stopping on validation."""
    started = time.perf_counter()
    device = torch.device(device)
    loss = TaskLoss(task, train[1])
    features = {
        name: torch.from_numpy(np.asarray(s[0], dtype=np.float32))
        for name, s in zip(("train", "val", "test"), (train, val, test), strict=True)
    }
    with torch_seed(seed):
        head = make_head(features["train"].shape[1], output_dim(task, train[1])).to(device)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            TensorDataset(features["train"], loss.targets(np.asarray(train[1]))),
            batch_size=schedule.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=len(train[0]) > schedule.batch_size,
        )

        @torch.no_grad()
        def predict(split: str) -> Tensor:
            head.eval()
            return torch.cat([head(x.to(device)).float().cpu() for x in features[split].split(4096)])

        fit = _Fit(
            forward=head,
            modules=[head],
            train_batches=lambda: iter(loader),
            predict=predict,
            n_steps_per_epoch=len(loader),
        )
        groups = param_groups(head=head, backbone=None, layer_decay=1.0, weight_decay=schedule.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=schedule.lr)
        best_epoch, curve = _train(
            fit, loss=loss, optimizer=optimizer, schedule=schedule, y_val=np.asarray(val[1]), device=device
        )
        return _result(
            task=task,
            loss=loss,
            fit=fit,
            val=np.asarray(val[1]),
            test=np.asarray(test[1]),
            best_epoch=best_epoch,
            curve=curve,
            n_train=len(train[0]),
            seed=seed,
            n_bootstrap=n_bootstrap,
            started=started,
        )


def finetune(
    *,
    backbone: Backbone,
    train: EvalSplit,
    val: EvalSplit,
    test: EvalSplit,
    task: Task,
    protocol: str,
    schedule: TrainSchedule,
    resize: str = "resize",
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """Unfrozen mode: backbone + linear head on ``protocol`` features trained end to end (layer-wise lr decay).

    The backbone is modified in place (pass a fresh copy when it is reused afterwards)."""
    started = time.perf_counter()
    device = torch.device(device)
    backbone.check_protocol(protocol)
    loss = TaskLoss(task, train.labels)
    backbone.to(device)
    for param in backbone.parameters():
        param.requires_grad_(True)
    with torch_seed(seed):
        head = make_head(backbone.feature_dim(protocol), output_dim(task, train.labels)).to(device)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            _LabelledImages(train, backbone.preprocess, resize, loss.targets(train.labels)),
            batch_size=schedule.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=len(train) > schedule.batch_size,
            num_workers=num_workers,
        )
        splits = {"val": val, "test": test}

        def forward(x: Tensor) -> Tensor:
            return head(backbone.features(x, [protocol])[protocol])

        @torch.inference_mode()
        def predict(split: str) -> Tensor:
            backbone.eval()
            head.eval()
            data = splits[split]
            dummy = torch.zeros(len(data))
            batches = DataLoader(
                _LabelledImages(data, backbone.preprocess, resize, dummy),
                batch_size=max(64, schedule.batch_size),
                num_workers=num_workers,
            )
            outs = []
            for x, _ in batches:
                x = x.to(device)
                if device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        outs.append(forward(x).float().cpu())
                else:
                    outs.append(forward(x).float().cpu())
            return torch.cat(outs)

        fit = _Fit(
            forward=forward,
            modules=[backbone, head],
            train_batches=lambda: iter(loader),
            predict=predict,
            n_steps_per_epoch=len(loader),
        )
        groups = param_groups(
            head=head, backbone=backbone.model, layer_decay=schedule.layer_decay, weight_decay=schedule.weight_decay
        )
        optimizer = torch.optim.AdamW(groups, lr=schedule.lr)
        best_epoch, curve = _train(
            fit, loss=loss, optimizer=optimizer, schedule=schedule, y_val=val.labels, device=device
        )
        backbone.eval()
        for param in backbone.parameters():
            param.requires_grad_(False)
        return _result(
            task=task,
            loss=loss,
            fit=fit,
            val=val.labels,
            test=test.labels,
            best_epoch=best_epoch,
            curve=curve,
            n_train=len(train),
            seed=seed,
            n_bootstrap=n_bootstrap,
            started=started,
        )
