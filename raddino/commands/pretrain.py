"""``raddino pretrain``: DINOv2-style self-supervised (continued) pretraining."""

from __future__ import annotations

import argparse
import logging

from raddino.config import load_config

log = logging.getLogger(__name__)

EPILOG = """examples:
  raddino pretrain --config tiny_cpu data.source=npz data.path=../shared/data/pneumoniamnist.npz
  raddino pretrain --config configs/vitb14_cxr.yaml optim.base_lr=1e-3 train.output_dir=runs/cxr
  torchrun --nproc_per_node 8 -m raddino.cli pretrain --config vitb14_cxr data.global_batch=1024 ...

Under torchrun (or SLURM with one task per GPU) every process runs this same command: it joins the process group,
FSDP2 shards student and teacher, and rank 0 alone writes metrics and logs (docs/TRAINING.md, "Distributed").

Overrides are OmegaConf dotlist items (key=value) applied after the recipe; unknown keys are errors.
The resolved config and derived values (scaled lr, step counts) are written to train.output_dir.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining (DINO + iBOT + KoLeo)",
        description="Pretrain or continue pretraining a ViT with the DINOv2 student-teacher recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="recipe YAML path or name in configs/ (e.g. tiny_cpu, vitb14_cxr); default: built-in defaults",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raddino import parallel
    from raddino.config import to_yaml
    from raddino.errors import RaddinoError
    from raddino.train import build_training, fit

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    env = parallel.init_distributed(
        device=cfg.train.device, backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s
    )
    try:
        summary = fit(build_training(cfg, env=env))
    except RaddinoError as err:
        if env.distributed:  # every rank reports; say which one
            err.args = (f"{env.describe()}: {err}",)
        raise
    except Exception as err:
        if env.distributed:  # a failing rank says which rank and why before its traceback
            log.error("%s failed: %s: %s", env.describe(), type(err).__name__, err)
        raise
    finally:
        parallel.shutdown()
    if env.is_main:
        print(
            f"done: {summary.steps} steps in {summary.seconds:.0f} s, {summary.refused_steps} refused; "
            f"checkpoint: {summary.last_checkpoint}"
        )
    return 0
