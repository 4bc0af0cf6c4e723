"""Distributed training on CPU (gloo, 2 ranks): FSDP2-sharded training equals one process on the same global batch,
checkpoints resume on a different world size, gradient accumulation equals the full batch, and a rank killed during
a checkpoint save leaves the previous checkpoint complete and chosen by ``resume=auto``.

KoLeo is per rank by design (each rank's nearest neighbours are among its own images, as in DINOv2) and drop path
draws per rank, so the equivalence runs switch both off; every other term is reduced over ranks and must match.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import MICRO, SMALL

from raddino.checkpoint import CheckpointManager
from raddino.cli import main
from raddino.config import ConfigError, batch_split, load_config
from raddino.eval.adapters.ours import build_ours
from raddino.interop.files import read_tensors
from raddino.interop.runs import read_run_teacher
from raddino.train import build_training, fit

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo missing"),
]

WORLD = 2
# Same global batch (16) on 1 and 2 processes; no per-rank terms (KoLeo, drop path), so the runs must agree.
EQUIV = [
    *SMALL,
    "loss.koleo_weight=0",
    "model.drop_path_rate=0",
    "data.batch_size=16",
    "data.global_batch=16",
    "train.checkpoint_every=2",
    "train.keep_last=5",
]
TERMS = ("loss", "dino", "ibot", "grad_norm", "teacher_entropy", "lr", "momentum", "teacher_temp")


def _cfg(out: Path, *extra: str):
    return load_config(MICRO, [*EQUIV, f"train.output_dir={out}", *extra])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _worker(rank: int, init_file: str, out: str, extra: list[str], kill_on_save: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        training = build_training(_cfg(Path(out), *extra))
        from torch.distributed.tensor import DTensor

        params = list(training.model.student.parameters()) + list(training.model.teacher.parameters())
        assert all(isinstance(p, DTensor) for p in params), "every parameter must be an FSDP2 DTensor shard"
        local = sum(p.to_local().numel() for p in params)
        if kill_on_save:
            _die_inside_save(rank, kill_on_save)
        summary = fit(training)
        (Path(out) / f"rank{rank}.json").write_text(
            json.dumps({"steps": summary.steps, "local": local, "full": sum(p.numel() for p in params)})
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _die_inside_save(rank: int, nth: int) -> None:
    """Rank 1 SIGKILLs itself inside the ``nth`` DCP save, after rank 0 has started writing (test-only hook)."""
    import raddino.checkpoint as ckpt

    real_save, calls = ckpt.dcp.save, []

    def save(state_dict, *, checkpoint_id):
        calls.append(checkpoint_id)
        if rank == 1 and len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state_dict, checkpoint_id=checkpoint_id)

    ckpt.dcp.save = save


def _two_ranks(tmp: Path, out: Path, *extra: str, kill_on_save: int = 0) -> None:
    init = tmp / f"store-{out.name}-{len(list(tmp.iterdir()))}"
    mp.spawn(_worker, args=(str(init), str(out), list(extra), kill_on_save), nprocs=WORLD, join=True)


def _one_rank(out: Path, *extra: str):
    training = build_training(_cfg(out, *extra))
    return training, fit(training)


def _assert_same_run(a: Path, b: Path, steps: range) -> None:
    ra = {r["step"]: r for r in _rows(a)}
    rb = {r["step"]: r for r in _rows(b)}
    for step in steps:
        for key in TERMS:
            assert rb[step][key] == pytest.approx(ra[step][key], rel=2e-4, abs=1e-5), (step, key)
    ta, tb = read_run_teacher(a), read_run_teacher(b)  # one process reads (sharded) DCP checkpoints
    assert ta.step == tb.step == steps[-1]
    flat_a = {**ta.backbone, **{f"{h}.{k}": v for h, sd in ta.heads.items() for k, v in sd.items()}}
    flat_b = {**tb.backbone, **{f"{h}.{k}": v for h, sd in tb.heads.items() for k, v in sd.items()}}
    assert flat_a.keys() == flat_b.keys()
    for name, value in flat_a.items():
        torch.testing.assert_close(flat_b[name], value, rtol=2e-4, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """4 steps on one process, global batch 16, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    _one_rank(out, "train.max_steps=4")
    return out


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(tmp_path, reference):
    out = tmp_path / "two"
    _two_ranks(tmp_path, out, "train.max_steps=4")
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(i["steps"] == 4 for i in info)
    assert sum(i["local"] for i in info) == info[0]["full"]  # the shards partition the parameters
    assert max(i["local"] for i in info) < info[0]["full"]
    assert len(_rows(out)) == 4  # rank 0 alone writes metrics
    assert json.loads((out / "derived.json").read_text())["world_size"] == WORLD
    _assert_same_run(reference, out, range(1, 5))
    # The other readers of a 2-rank (sharded) checkpoint on one process: `ours:` eval backbones and `raddino export`.
    teacher = read_run_teacher(out).backbone
    ours = build_ours(str(out), weights=None, random_init=False, img_size=None, seed=0)
    for name, value in ours.model.state_dict().items():
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0, msg=name)
    assert main(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "export")]) == 0
    exported = read_tensors(next((tmp_path / "export").glob("*.safetensors")))
    assert {k: v.shape for k, v in exported.items()} == {k: teacher[k].shape for k in exported}


@pytest.mark.timeout(300)
def test_resume_two_ranks_to_one(tmp_path, reference):
    out = tmp_path / "2to1"
    # asynchronous checkpoint writes on 2 ranks (their own gloo group) resume like synchronous ones
    _two_ranks(tmp_path, out, "train.max_steps=2", "train.async_checkpoint=true")
    assert json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())["world_size"] == WORLD
    _, summary = _one_rank(out, "train.max_steps=4")
    assert summary.steps == 4
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    _assert_same_run(reference, out, range(1, 5))


@pytest.mark.timeout(300)
def test_resume_one_rank_to_two(tmp_path, reference):
    out = tmp_path / "1to2"
    _one_rank(out, "train.max_steps=2")
    _two_ranks(tmp_path, out, "train.max_steps=4")
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    _assert_same_run(reference, out, range(1, 5))


@pytest.mark.timeout(300)
def test_gradient_accumulation_equals_full_batch(tmp_path):
    """2 micro-batches of 8 == 1 batch of 16, with targets that do not depend on the batch (a fixed center:
    Sinkhorn-Knopp and an updated center normalise over the micro-batch, which accumulation cannot change)."""
    fixed = ["loss.centering=centering", "loss.center_momentum=1.0", "train.max_steps=3"]
    full, _ = _one_rank(tmp_path / "full", *fixed)
    accum, _ = _one_rank(tmp_path / "accum", *fixed, "data.batch_size=8")
    assert (full.derived.micro_batch, full.derived.accumulation_steps) == (16, 1)
    assert (accum.derived.micro_batch, accum.derived.accumulation_steps) == (8, 2)
    _assert_same_run(tmp_path / "full", tmp_path / "accum", range(1, 4))


@pytest.mark.timeout(300)
def test_rank_killed_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(mp.ProcessExitedException):
        _two_ranks(tmp_path, out, "train.max_steps=4", kill_on_save=2)  # dies saving step 4
    manager = CheckpointManager(out / "checkpoints", keep_last=5)
    assert [p.name for p in manager.complete()] == ["step_0000002"]
    assert manager.resolve_resume("auto") == out / "checkpoints" / "step_0000002"
    _, summary = _one_rank(out, "train.max_steps=4")  # resume=auto picks step 2 and finishes
    assert summary.steps == 4
    assert [p.name for p in manager.complete()] == ["step_0000002", "step_0000004"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the torn save was cleared when step 4 was saved again
    steps = [r["step"] for r in _rows(out)]
    assert steps[-2:] == [3, 4] and steps.count(1) == 1


def test_global_batch_split():
    assert batch_split(batch_size=64, global_batch=None, world_size=8) == (512, 64, 1)
    assert batch_split(batch_size=64, global_batch=512, world_size=4) == (512, 64, 2)
    assert batch_split(batch_size=64, global_batch=96, world_size=2) == (96, 48, 1)
    with pytest.raises(ConfigError, match="data.global_batch"):
        batch_split(batch_size=8, global_batch=10, world_size=4)
    with pytest.raises(ConfigError, match="data.batch_size"):
        batch_split(batch_size=48, global_batch=128, world_size=2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("reshard", "packed"), [(True, False), (False, False), (True, True)], ids=["zero3", "zero2", "zero3-packed"]
)
def test_fsdp_on_one_process_equals_plain(tmp_path, reference, reshard, packed):
    """parallel.fsdp=true on one process (the single-GPU bf16 path, here fp32 on CPU) trains like no sharding, also
    with the student's gathered weights kept for backward (ZeRO-2; the teacher still reshards, else the EMA met its
    full tensors beside the student's shards and failed), and with the crops packed into one student pass
    (``forward_features_packed``, registered with FSDP2 like ``forward_features``)."""
    from raddino import parallel

    try:
        training, summary = _one_rank(
            tmp_path / "fsdp1",
            "train.max_steps=4",
            "parallel.fsdp=true",
            f"parallel.reshard_after_forward={reshard}",
            f"model.pack_crops={packed}",
        )
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in training.model.student.parameters())
        assert summary.steps == 4
    finally:
        parallel.shutdown()
    assert not dist.is_initialized()
    _assert_same_run(reference, tmp_path / "fsdp1", range(1, 5))


@pytest.mark.timeout(300)
def test_two_ranks_with_packed_crops_equal_one_process(tmp_path, reference):
    """model.pack_crops=true on 2 FSDP2 ranks (each block gathered once per student pass instead of once per crop
    size) trains like the unpacked single process."""
    out = tmp_path / "packed"
    _two_ranks(tmp_path, out, "train.max_steps=4", "model.pack_crops=true")
    assert "pack_crops: true" in (out / "config.yaml").read_text()
    _assert_same_run(reference, out, range(1, 5))


def test_fsdp_off_with_several_processes_is_an_error(tmp_path):
    from raddino.errors import RaddinoError
    from raddino.parallel import ParallelEnv

    env = ParallelEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(RaddinoError, match="parallel.fsdp=false"):
        build_training(_cfg(tmp_path, "parallel.fsdp=false"), env=env)


def test_sharded_backbone_root_is_gathered_again_for_backward():
    """The backbone's root FSDP2 unit (patch embedding, tokens, position embedding, final norm), resharded after
    forward, is gathered again for backward: gradients equal the unsharded backbone's.

    FSDP2 finds a unit's outputs to hook the pre-backward all-gather on by walking them; torch before 2.13 walks only
    pytree containers (tuple / list / dict), so ``forward_features`` returns a NamedTuple. With a dataclass output
    every FSDP2 run failed in backward on torch 2.11 ("data is not allocated yet"), the GPU machines' torch."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from raddino.models.vit import BackboneOutput, build_backbone
    from raddino.parallel import ParallelPlan, _shard_tower

    assert issubclass(BackboneOutput, tuple)  # the container every torch's FSDP2 walks
    torch.manual_seed(0)
    plain = build_backbone(arch="tiny", img_size=28, layerscale=1.0)
    sharded = build_backbone(arch="tiny", img_size=28, layerscale=1.0)
    sharded.load_state_dict(plain.state_dict())
    x, local = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14)
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[:, 1] = True

    def loss(model):
        glob = model.forward_features(x, masks=masks)
        return (glob.cls.square().sum() + glob.patch[masks].sum() + model.forward_features(local).cls.sum()) / 4

    loss(plain).backward()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # the trainer's sharding of a tower: blocks, then the root, resharded after forward (ZeRO-3)
        _shard_tower(
            nn.ModuleDict({"backbone": sharded}), mesh=mesh, plan=ParallelPlan(fsdp=True), reshard_after_forward=True
        )
        loss(sharded).backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    finally:
        dist.destroy_process_group()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(300)
def test_packed_crops_gather_each_student_block_once_per_pass():
    """benchmarks/fsdp_collectives.py on 2 gloo ranks: with the crops packed the step makes 2 x depth + 1 fewer
    FSDP2 all-gathers (each student block once in forward and once in backward instead of once per crop size, the
    backbone root once fewer) and the same reduce-scatters. Counts come from FSDP2's profiler ranges."""
    import re
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fsdp_collectives.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + ["--steps", "1", "--warmup", "0", "data.batch_size=4"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = dict(re.findall(r"^\| (False|True) \| (\d+ \| \d+) \|", done.stdout, flags=re.M))
    (gathers, scatters), (packed_gathers, packed_scatters) = (map(int, rows[k].split(" | ")) for k in ("False", "True"))
    from raddino.models.vit import ARCHS

    depth = ARCHS[load_config("tiny_cpu").model.arch].depth
    assert packed_scatters == scatters > 0
    assert gathers - packed_gathers == 2 * depth + 1, done.stdout
