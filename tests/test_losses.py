"""SSL losses against independent references: numpy re-implementations, explicit loops, hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raddino.losses import centered_softmax, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp, update_center


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sk_numpy(logits: np.ndarray, temp: float, n_iters: int, n_samples: float | None = None) -> np.ndarray:
    """DINOv2's SinkhornKnopp teacher, linear domain, float64, single process."""
    q = np.exp(logits.astype(np.float64) / temp).T  # (K, N): prototypes x samples
    k, n = q.shape
    b = n if n_samples is None else n_samples
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


# ---------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize(
    ("n", "k", "temp", "n_iters"), [(8, 5, 0.1, 3), (13, 32, 0.04, 3), (6, 4, 0.5, 0), (5, 7, 0.2, 10)]
)
def test_sinkhorn_matches_numpy_reference(n: int, k: int, temp: float, n_iters: int) -> None:
    logits = torch.randn(n, k, generator=_gen(n * k))
    probs = sinkhorn_knopp(logits, temp, n_iters=n_iters)
    assert probs.dtype == torch.float32 and probs.shape == (n, k)
    np.testing.assert_allclose(probs.numpy(), _sk_numpy(logits.numpy(), temp, n_iters), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rows_and_columns() -> None:
    n, k = 12, 4
    logits = torch.randn(n, k, generator=_gen(1)) * 2
    probs = sinkhorn_knopp(logits, 0.1, n_iters=3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(n))
    # Many iterations converge to the balanced assignment: every prototype receives B / K of the mass.
    converged = sinkhorn_knopp(logits, 0.1, n_iters=200)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(n))
    torch.testing.assert_close(converged.sum(dim=0), torch.full((k,), n / k), atol=1e-3, rtol=0)
    # Balancing changes the targets: a plain softmax is not balanced on these logits.
    assert (torch.softmax(logits / 0.1, dim=-1).sum(dim=0) - n / k).abs().max() > 0.5


def test_sinkhorn_hand_derived_symmetric_case() -> None:
    # Q = [[e, 1], [1, e]] with e = exp(a / temp) is already balanced up to scale, so every iteration keeps it.
    a, temp = 0.3, 0.1
    e = math.exp(a / temp)
    expected = torch.tensor([[e, 1.0], [1.0, e]]) / (e + 1.0)
    for n_iters in (0, 1, 3):
        torch.testing.assert_close(sinkhorn_knopp(torch.tensor([[a, 0.0], [0.0, a]]), temp, n_iters=n_iters), expected)
    # Equal logits give the uniform distribution.
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(3, 5), 0.07), torch.full((3, 5), 0.2))


def test_sinkhorn_invariant_to_prototype_offsets_and_stable_for_huge_logits() -> None:
    n, k, temp = 10, 6, 0.05
    logits = torch.randn(n, k, generator=_gen(2))
    reference = _sk_numpy(logits.numpy(), temp, 3)
    # The first step normalises each prototype over the samples, so per-prototype offsets cancel exactly; offsets
    # of +-1e3 make exp(logits / temp) overflow/underflow in float32 (and float64) without the log domain.
    offsets = torch.tensor([1e3, -1e3, 0.0, 500.0, -700.0, 2e3])
    shifted = sinkhorn_knopp(logits + offsets, temp, n_iters=3)
    assert torch.isfinite(shifted).all()
    np.testing.assert_allclose(shifted.numpy(), reference, rtol=2e-3, atol=1e-5)
    # A global shift cancels even without iterations.
    np.testing.assert_allclose(
        sinkhorn_knopp(logits + 1e3, temp, n_iters=0).numpy(), _sk_numpy(logits.numpy(), temp, 0), rtol=2e-3, atol=1e-5
    )


def test_sinkhorn_n_samples_and_dtypes() -> None:
    n, k, temp = 7, 5, 0.1
    logits = torch.randn(n, k, generator=_gen(3))
    # n_samples replaces B in the column normalisation and the final rescale.
    for n_samples in (20, torch.tensor([20.0]), torch.tensor(20)):
        got = sinkhorn_knopp(logits, temp, n_samples=n_samples)
        np.testing.assert_allclose(got.numpy(), _sk_numpy(logits.numpy(), temp, 3, n_samples=20), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.sum(dim=1), torch.ones(n))
    torch.testing.assert_close(sinkhorn_knopp(logits, temp, n_samples=n), sinkhorn_knopp(logits, temp))
    # Low-precision input is computed in float32 and does not modify the input.
    half = logits.bfloat16()
    before = half.clone()
    out = sinkhorn_knopp(half, temp)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_knopp(half.float(), temp))
    assert torch.equal(half, before)
    # Teacher targets carry no gradient; an empty batch gives an empty result.
    assert not sinkhorn_knopp(logits.requires_grad_(), temp).requires_grad
    assert sinkhorn_knopp(torch.zeros(0, k), temp, n_samples=4).shape == (0, k)


def test_sinkhorn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, n_iters=-1)
    with pytest.raises(ValueError, match="N, K"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)


# ---------------------------------------------------------------- centering


def test_centered_softmax_hand_computed() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    center = torch.tensor([[0.5, 1.0, -1.0]])
    temp = 0.5
    got = centered_softmax(logits, center, temp)
    for i, row in enumerate(logits.tolist()):
        z = [(x - c) / temp for x, c in zip(row, center[0].tolist(), strict=True)]
        denom = sum(math.exp(v) for v in z)
        expected = torch.tensor([math.exp(v) / denom for v in z])
        torch.testing.assert_close(got[i], expected)
    assert not centered_softmax(logits.requires_grad_(), center, temp).requires_grad


def test_update_center_hand_computed() -> None:
    center = torch.tensor([[1.0, 2.0]])
    logits = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    # batch mean [2, 2]; 0.9 * [1, 2] + 0.1 * [2, 2] = [1.1, 2.0]
    new = update_center(center, logits, 0.9)
    torch.testing.assert_close(new, torch.tensor([[1.1, 2.0]]))
    assert not new.requires_grad and new.shape == (1, 2)
    torch.testing.assert_close(update_center(center, logits, 0.0), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(update_center(center, logits, 1.0), center)
    # No rows anywhere: the center stays; dtype of the center is kept.
    torch.testing.assert_close(update_center(center, torch.zeros(0, 2), 0.5), center)
    assert update_center(center.double(), logits.detach(), 0.9).dtype == torch.float64
    with pytest.raises(ValueError, match="momentum"):
        update_center(center, logits, 1.5)


# ---------------------------------------------------------------- DINO


def _dino_reference(student: np.ndarray, teacher: np.ndarray, temp: float) -> float:
    n_student, batch, _ = student.shape
    n_teacher = teacher.shape[0]
    total, pairs = 0.0, 0
    for s in range(n_student):
        for t in range(n_teacher):
            if s == t:
                continue
            pair = 0.0
            for b in range(batch):
                z = student[s, b].astype(np.float64) / temp
                log_sm = z - z.max() - math.log(np.exp(z - z.max()).sum())
                pair += -(teacher[t, b] * log_sm).sum()
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize(("n_student", "n_teacher"), [(2, 2), (6, 2), (5, 3)])
def test_dino_loss_matches_explicit_loops(n_student: int, n_teacher: int) -> None:
    batch, k, temp = 4, 9, 0.1
    gen = _gen(10 + n_student)
    student = torch.randn(n_student, batch, k, generator=gen, requires_grad=True)
    teacher = torch.softmax(torch.randn(n_teacher, batch, k, generator=gen) / 0.05, dim=-1)
    loss = dino_loss(student, teacher, temp)
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), _dino_reference(student.detach().numpy(), teacher.numpy(), temp), rtol=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dino_loss_skips_same_crop_pairs() -> None:
    # Each student crop agrees with the *other* global crop and strongly disagrees with its own one; only the
    # skipped pairs (s == t) would make the loss large. Per kept pair CE = log(1 + exp(-2L)) (temp 1).
    big = 5.0
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, B=1, K=2)
    student = torch.tensor([[[-big, big]], [[big, -big]]])  # crop 0 predicts class 1, crop 1 predicts class 0
    expected = math.log1p(math.exp(-2 * big))
    torch.testing.assert_close(dino_loss(student, teacher, 1.0), torch.tensor(expected))
    # Swapping the student crops makes the kept pairs the disagreeing ones.
    swapped = dino_loss(student.flip(0), teacher, 1.0)
    torch.testing.assert_close(swapped, torch.tensor(math.log1p(math.exp(2 * big))))


def test_dino_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="S >= T"):
        dino_loss(torch.zeros(1, 2, 3), torch.zeros(2, 2, 3), 0.1)
    with pytest.raises(ValueError, match="pair"):
        dino_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 0.1)


# ---------------------------------------------------------------- iBOT


def _ibot_reference(student: np.ndarray, teacher: np.ndarray, masks: np.ndarray, temp: float) -> float:
    total, row = 0.0, 0
    for image in range(masks.shape[0]):
        count = int(masks[image].sum())
        for patch in range(masks.shape[1]):
            if not masks[image, patch]:
                continue
            z = student[row].astype(np.float64) / temp
            log_sm = z - z.max() - math.log(np.exp(z - z.max()).sum())
            total += -(teacher[row] * log_sm).sum() / max(count, 1)
            row += 1
    assert row == student.shape[0]
    return total / masks.shape[0]


def test_ibot_loss_matches_explicit_loop_with_varying_mask_counts() -> None:
    k, temp = 7, 0.1
    masks = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # 1 masked
            [0, 0, 0, 0, 0, 0],  # none: still counts as an image in the denominator
            [1, 1, 1, 0, 1, 1],  # 5 masked
            [0, 1, 0, 1, 0, 0],  # 2 masked
        ],
        dtype=torch.bool,
    )
    m = int(masks.sum())
    gen = _gen(20)
    student = torch.randn(m, k, generator=gen, requires_grad=True)
    teacher = torch.softmax(torch.randn(m, k, generator=gen) / 0.05, dim=-1)
    loss = ibot_loss(student, teacher, masks, temp)
    expected = _ibot_reference(student.detach().numpy(), teacher.numpy(), masks.numpy(), temp)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    # Each image's patches share a total weight: with identical rows, the single patch of image 0 (row 0) gets 5x
    # the gradient of each of image 2's five patches (rows 1..5) and 2x that of image 3's two (rows 6, 7).
    same = torch.randn(1, k, generator=gen).expand(m, k).clone().requires_grad_()
    ibot_loss(same, teacher[:1].expand(m, k), masks, temp).backward()
    norms = same.grad.norm(dim=-1)
    torch.testing.assert_close(norms[1:6] * 5, norms[0].expand(5))
    torch.testing.assert_close(norms[6:] * 2, norms[0].expand(2))


def test_ibot_loss_hand_derived_normalisation() -> None:
    # Two images; image 0 has two masked patches with one-hot targets, image 1 none. With uniform student logits the
    # per-patch CE is log(K), so the loss is (log K / 2 + log K / 2) / 2 = log(K) / 2.
    k = 4
    masks = torch.tensor([[True, False, True], [False, False, False]])
    loss = ibot_loss(torch.zeros(2, k), torch.eye(k)[:2], masks, 0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(k) / 2))


def test_ibot_loss_without_masked_patches_backpropagates() -> None:
    weight = torch.randn(3, 5, generator=_gen(21), requires_grad=True)
    features = torch.zeros(0, 3)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    loss = ibot_loss(features @ weight, torch.zeros(0, 5), masks, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(3, 5))


def test_ibot_loss_rejects_inconsistent_masks() -> None:
    masks = torch.tensor([[True, True], [False, True]])
    with pytest.raises(ValueError, match="3 patches"):
        ibot_loss(torch.zeros(2, 4), torch.zeros(2, 4), masks, 0.1)
    with pytest.raises(ValueError, match="bool"):
        ibot_loss(torch.zeros(3, 4), torch.zeros(3, 4), masks.float(), 0.1)


# ---------------------------------------------------------------- KoLeo


def _on_circle(degrees: list[float], radii: list[float]) -> torch.Tensor:
    return torch.tensor(
        [[r * math.cos(math.radians(d)), r * math.sin(math.radians(d))] for d, r in zip(degrees, radii, strict=True)]
    )


def test_koleo_loss_hand_built_points() -> None:
    # Angles 0, 10, 100 degrees (radii differ: rows are L2-normalised first). Nearest neighbours: 0<->10 and
    # 100->10; chord lengths 2 sin(5 deg), 2 sin(5 deg), 2 sin(45 deg).
    x = _on_circle([0.0, 10.0, 100.0], [1.0, 3.0, 0.5])
    chord = [2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(45))]
    expected = -sum(math.log(c) for c in chord) / 3
    torch.testing.assert_close(koleo_loss(x), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # Square on the circle: every nearest neighbour is at distance sqrt(2).
    square = _on_circle([0.0, 90.0, 180.0, 270.0], [1.0] * 4)
    torch.testing.assert_close(koleo_loss(square), torch.tensor(-math.log(math.sqrt(2))), atol=1e-5, rtol=1e-5)
    # Two antipodal points: the neighbour of each is the other one (never itself), at distance 2.
    torch.testing.assert_close(koleo_loss(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])), torch.tensor(-math.log(2.0)))


def test_koleo_loss_gradient_finite_and_spreads_points() -> None:
    x = torch.randn(8, 5, generator=_gen(30))
    x[1] = x[0]  # a duplicate: zero distance must not give inf/nan gradients
    x = x.bfloat16().requires_grad_()
    loss = koleo_loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()
    # A gradient step moves two close points apart (increasing their distance lowers the loss).
    pts = _on_circle([0.0, 5.0, 120.0, 240.0], [1.0] * 4).requires_grad_()
    koleo_loss(pts).backward()
    moved = (pts - 0.01 * pts.grad).detach()
    assert koleo_loss(moved) < koleo_loss(pts.detach())
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
