"""Contract tests of the student-teacher meta-architecture on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raddino.build import meta_arch_from_config
from raddino.config import load_config
from raddino.data.batch import SSLBatch

TINY = [
    "model.img_size=28",
    "crops.global_size=28",
    "crops.local_size=14",
    "crops.n_local=2",
    "head.out_dim=128",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "model.drop_path_rate=0.1",
]


def _batch(b: int = 4, seed: int = 0) -> SSLBatch:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[3, 1:] = True
    return SSLBatch(
        global_crops=torch.randn(2 * b, 3, 28, 28, generator=g),
        local_crops=torch.randn(2 * b, 3, 14, 14, generator=g),
        masks=masks,
        labels=None,
    )


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
@pytest.mark.parametrize("separate", [False, True])
def test_every_student_param_gets_a_grad_teacher_none(centering, separate):
    torch.manual_seed(0)
    cfg = load_config("tiny_cpu", [*TINY, f"loss.centering={centering}", f"loss.ibot_separate_head={separate}"])
    model = meta_arch_from_config(cfg)
    out = model(_batch(), teacher_temp=0.04)
    for value in (out.loss, out.dino, out.ibot, out.koleo, out.teacher_entropy, out.student_entropy, out.student_std):
        assert torch.isfinite(value)
    assert out.ibot > 0 and out.dino > 0
    out.loss.backward()
    for name, p in model.student.named_parameters():
        assert p.grad is not None, f"student {name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, f"teacher {name} must not get gradients"
    if centering == "centering":
        assert model.dino_center.abs().sum() > 0  # EMA center moved
    else:
        assert model.dino_center.abs().sum() == 0  # unused with Sinkhorn-Knopp


def test_packed_crops_give_the_same_losses_and_gradients():
    """model.pack_crops=true (one student pass for global and local crops) is the same step as one pass per crop
    size: losses, monitors and every student gradient, at drop path 0 (with drop path the draws differ)."""
    runs = []
    for packed in (False, True):
        torch.manual_seed(0)
        cfg = load_config("tiny_cpu", [*TINY, "model.drop_path_rate=0", f"model.pack_crops={packed}"])
        model = meta_arch_from_config(cfg)
        assert model.pack_crops is packed
        out = model(_batch(), teacher_temp=0.04)
        out.loss.backward()
        runs.append((out.scalars(), {n: p.grad for n, p in model.student.named_parameters()}))
    (plain, plain_grads), (packed, packed_grads) = runs
    for name, value in plain.items():
        torch.testing.assert_close(packed[name], value, atol=1e-5, rtol=1e-5, msg=name)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_ema_moves_teacher_towards_student():
    torch.manual_seed(0)
    model = meta_arch_from_config(load_config("tiny_cpu", TINY))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1)
    t0 = [p.detach().clone() for p in model.teacher.parameters()]
    s = [p.detach().clone() for p in model.student.parameters()]
    model.update_teacher(0.9)
    for before, after, stud in zip(t0, model.teacher.parameters(), s, strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * stud)
    t1 = [p.detach().clone() for p in model.teacher.parameters()]  # taken before the update, so this can fail
    model.update_teacher(1.0)  # momentum 1 keeps the teacher fixed although the student differs
    for before, after in zip(t1, model.teacher.parameters(), strict=True):
        assert torch.equal(before, after)


def test_teacher_targets_are_deterministic_in_train_mode():
    """drop_path_rate=0.1, model.train(): the teacher is in eval mode without stochastic depth, so two target
    computations on the same batch agree exactly, while the student's drop path stays active."""
    torch.manual_seed(0)
    model = meta_arch_from_config(load_config("tiny_cpu", TINY)).train()
    batch = _batch()
    cls_a, patch_a = model.teacher_targets(batch, teacher_temp=0.04)
    cls_b, patch_b = model.teacher_targets(batch, teacher_temp=0.04)
    assert torch.equal(cls_a, cls_b) and torch.equal(patch_a, patch_b)  # old code: differ by ~0.07
    assert model.student.training and not any(m.training for m in model.teacher.modules())
    x = batch.global_crops
    with torch.no_grad():
        assert not torch.equal(model.student["backbone"](x), model.student["backbone"](x))  # student drop path on
    model.eval()
    model.train()  # switching back must not put the teacher in train mode
    assert not model.teacher.training
    # Even forced into train mode the teacher has no stochastic depth to draw (it was built without it).
    assert model.student["backbone"].drop_path_rates == [0.1] * 12
    assert model.teacher["backbone"].drop_path_rates == [0.0] * 12
    model.teacher.train()
    torch.testing.assert_close(model.teacher_targets(batch, teacher_temp=0.04)[0], cls_a, rtol=0, atol=0)
    # Same parameters, names and order in both towers (the EMA zips them; checkpoints name them)
    assert [(n, p.shape) for n, p in model.student.named_parameters()] == [
        (n, p.shape) for n, p in model.teacher.named_parameters()
    ]


def test_student_entropy_is_the_mean_entropy_of_the_student_softmax():
    torch.manual_seed(0)
    model = meta_arch_from_config(load_config("tiny_cpu", [*TINY, "model.drop_path_rate=0.0"])).eval()
    batch = _batch()
    out = model(batch, teacher_temp=0.04)
    # independent recomputation: every crop of every image through the student, softmax at T = 0.1, entropy by hand
    with torch.no_grad():
        crops = [batch.global_crops, batch.local_crops]
        feats = [
            model.student["backbone"].forward_features(c, masks=batch.masks if i == 0 else None).cls
            for i, c in enumerate(crops)
        ]
        p = torch.softmax(model.student["dino_head"](torch.cat(feats)) / 0.1, dim=-1).double()
        expected = -(p * p.log()).sum(-1).mean()
    assert out.student_entropy.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < out.student_entropy.item() < math.log(128)


def test_no_masks_gives_zero_ibot_but_still_backprops():
    torch.manual_seed(0)
    model = meta_arch_from_config(load_config("tiny_cpu", TINY))
    batch = _batch()
    batch.masks[:] = False
    out = model(batch, teacher_temp=0.04)
    assert out.ibot == 0
    out.loss.backward()
    assert model.student["backbone"].blocks[0].attn.qkv.weight.grad is not None


def test_demo_probe_table_compares_backbones_and_raw_pixels():
    """The demo's probe: one row per backbone plus raw pixels, AUROCs in [0, 1], a markdown table."""
    from raddino.build import backbone_from_config
    from raddino.eval.adapters.base import Preprocess
    from raddino.probe import compare_backbones

    cfg = load_config("tiny_cpu", TINY)
    torch.manual_seed(0)
    report = compare_backbones(
        backbones={"random init": backbone_from_config(cfg.model)},
        transform=Preprocess(
            size=cfg.crops.global_size, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std), gray=True
        ),
        image_size=32,
        splits={"train": (40, 1), "val": (30, 2), "test": (40, 3)},
        cs=(0.1, 1.0),
    )
    assert [r.name for r in report.rows] == ["random init", "raw pixels"]
    assert all(0.0 <= r.auroc <= 1.0 and r.best_c in (0.1, 1.0) for r in report.rows)
    assert all(r.auroc_ci[0] <= r.auroc <= r.auroc_ci[1] and r.auroc_ci[0] < r.auroc_ci[1] for r in report.rows)
    assert report.table().count("\n") == 3 and report.auroc("raw pixels") == report.rows[1].auroc


def test_demo_probe_embeds_the_requested_readout():
    """``cls_grid4`` on a 56-px view of ViT-Ti/14: the CLS token next to each of the 4 x 4 patch tokens."""
    from raddino.build import backbone_from_config
    from raddino.eval.adapters.base import Preprocess
    from raddino.eval.adapters.ours import OursBackbone
    from raddino.probe import embed

    cfg = load_config("tiny_cpu", TINY)
    torch.manual_seed(0)
    model = backbone_from_config(cfg.model).eval()
    views = torch.randn(3, 3, 56, 56)
    adapter = OursBackbone(spec="t", model=model, preprocess=Preprocess(size=56))
    grid = embed(adapter, views, protocol="cls_grid4", batch_size=2)
    out = model.forward_features(views)
    dim = model.embed_dim
    assert grid.shape == (3, 17 * dim)
    np.testing.assert_allclose(grid[:, :dim], out.cls.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grid[:, dim:], out.patch.detach().reshape(3, 16 * dim).numpy(), rtol=1e-5, atol=1e-6)
    cls_mean = embed(adapter, views, protocol="cls_mean")
    np.testing.assert_allclose(cls_mean[:, dim:], out.patch.detach().mean(1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("random_ci", "random_auroc", "expected"),
    [
        ((0.83, 0.87), 0.85, "above random init and raw pixels with non-overlapping 95 % intervals"),
        ((0.86, 0.885), 0.87, "overlaps that of random init: no clear gain shown"),
        ((0.90, 0.94), 0.92, "is not above random init (test AUROC 0.900 vs 0.920): no gain shown"),
    ],
)
def test_demo_verdict_needs_non_overlapping_intervals(random_ci, random_auroc, expected):
    from raddino.probe import ProbeReport, ProbeRow

    report = ProbeReport(
        rows=[
            ProbeRow(name="pretrained teacher", auroc=0.90, auroc_ci=(0.88, 0.92), accuracy=0.8, best_c=1.0),
            ProbeRow(name="random init", auroc=random_auroc, auroc_ci=random_ci, accuracy=0.8, best_c=1.0),
            ProbeRow(name="raw pixels", auroc=0.53, auroc_ci=(0.50, 0.56), accuracy=0.5, best_c=1.0),
        ]
    )
    assert expected in report.verdict("pretrained teacher")
