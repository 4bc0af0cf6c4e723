"""FSDP2 collectives and step time per training step, crops packed into one student pass or not.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_collectives.py [--config tiny_cpu] [KEY=VALUE ...]

Each rank builds the configured training (synthetic data, FSDP2 on), runs ``--warmup`` steps, times ``--steps``
steps, then profiles one more step with ``torch.profiler`` and counts FSDP2's own ``FSDP::all_gather`` and
``FSDP::post_backward_reduce`` (reduce-scatter) ranges, for ``model.pack_crops=false`` and ``true`` in turn. Rank 0
prints a markdown table. The counts are exact on any device; the times are this machine's.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import raddino  # noqa: F401  (torchvision shim before timm)
from raddino import parallel
from raddino.config import load_config
from raddino.train import build_training

EVENTS = {"FSDP::all_gather": "all-gathers", "FSDP::post_backward_reduce": "reduce-scatters"}


def _measure(config: str, overrides: list[str], *, steps: int, warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="raddino-fsdp-coll-") as out:
        cfg = load_config(
            config,
            [
                "data.source=synthetic",
                "data.num_workers=0",
                "train.progress=false",
                "parallel.fsdp=true",
                f"train.output_dir={out}",
                *overrides,
            ],
        )
        t = build_training(cfg)
        batches = iter(t.make_loader(start_position=0))
        model = t.model.train()

        def step() -> None:
            model(next(batches).to(t.device).normalized(), teacher_temp=0.04).loss.backward()
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            model.update_teacher(0.99)

        times = []
        for i in range(warmup + steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            if t.device.type == "cuda":
                torch.cuda.synchronize(t.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
        names = collections.Counter(e.name.split(" (")[0] for e in prof.events())
        return {"step_ms": 1000 * statistics.median(times), **{label: names[e] for e, label in EVENTS.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    env = parallel.init_distributed(device="auto")
    try:
        rows = {}
        for packed in (False, True):
            overrides = [f"train.device={env.device.type}", *args.overrides, f"model.pack_crops={str(packed).lower()}"]
            rows[packed] = _measure(args.config, overrides, steps=args.steps, warmup=args.warmup)
        if env.is_main:
            setting = " ".join([args.config, *args.overrides])
            print(f"{setting}: {env.world_size} ranks, {env.device}, torch {torch.__version__}")
            print("| model.pack_crops | FSDP all-gathers / step | reduce-scatters / step | median step |")
            print("|---|---|---|---|")
            for packed, r in rows.items():
                print(f"| {packed} | {r['all-gathers']} | {r['reduce-scatters']} | {r['step_ms']:.0f} ms |")
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
