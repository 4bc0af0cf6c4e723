"""Centering and Sinkhorn-Knopp on 2 gloo ranks equal the single-process result on all rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raddino.losses import sinkhorn_knopp, update_center

WORLD = 2
TEMP = 0.07
MOMENTUM = 0.8
N_ROWS, K = 10, 6
UNEQUAL = (7, 3)  # rows per rank when ranks hold different numbers of rows (iBOT masked patches)
EMPTY = (6, 0)  # one rank without any row


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Same seeded data in the parent and in every rank."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(N_ROWS, K, generator=gen) * 2, torch.randn(1, K, generator=gen)


def _rows(logits: torch.Tensor, counts: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return logits[start : start + counts[rank]]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        logits, center = _data()
        half = _rows(logits, (N_ROWS // 2,) * WORLD, rank)
        unequal = _rows(logits, UNEQUAL, rank)
        # The global count as the model computes it: the local count all-reduced, passed as a tensor.
        n_unequal = torch.tensor([float(unequal.shape[0])])
        dist.all_reduce(n_unequal)
        group = dist.new_group(list(range(WORLD)))
        results = {
            "center": update_center(center, half, MOMENTUM),
            "center_unequal": update_center(center, unequal, MOMENTUM),
            "sk": sinkhorn_knopp(half, TEMP),
            "sk_group": sinkhorn_knopp(half, TEMP, n_iters=5, group=group),
            "sk_unequal": sinkhorn_knopp(unequal, TEMP, n_samples=n_unequal),
            "sk_empty": sinkhorn_knopp(_rows(logits, EMPTY, rank), TEMP, n_samples=sum(EMPTY)),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo missing")
def test_two_ranks_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    logits, center = _data()
    assert not dist.is_initialized()  # the references below are single-process

    expected_center = update_center(center, logits, MOMENTUM)
    # Independent of update_center: the EMA of the mean of all rows.
    torch.testing.assert_close(expected_center, MOMENTUM * center + (1 - MOMENTUM) * logits.mean(0, keepdim=True))
    for results in per_rank:  # every rank ends with the same, global center
        torch.testing.assert_close(results["center"], expected_center)
        torch.testing.assert_close(results["center_unequal"], expected_center)

    expected = {
        "sk": sinkhorn_knopp(logits, TEMP),
        "sk_group": sinkhorn_knopp(logits, TEMP, n_iters=5),
        "sk_unequal": sinkhorn_knopp(logits, TEMP),
        "sk_empty": sinkhorn_knopp(logits[: sum(EMPTY)], TEMP),
    }
    for name, reference in expected.items():
        gathered = torch.cat([results[name] for results in per_rank])
        torch.testing.assert_close(gathered, reference, msg=lambda m, name=name: f"{name}: {m}")
    # The local result differs from the distributed one (the test would notice missing all-reduces).
    assert not torch.allclose(sinkhorn_knopp(logits[: N_ROWS // 2], TEMP), expected["sk"][: N_ROWS // 2], atol=1e-3)
