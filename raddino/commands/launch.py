"""``raddino launch``: submit pretraining / evaluation to SLURM (or run it here with ``--local``), and report on it."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

EPILOG = """examples:
  raddino launch pretrain --config vitb14_cxr --profile example_cluster --nodes 16 --gpus-per-node 4 \\
      --time 72:00:00 data.global_batch=1024 train.output_dir=/scratch/runs/cxr
  raddino launch pretrain --config tiny_cpu --local --ntasks-per-node 2 train.device=cpu
  raddino launch pretrain --config vitb14_cxr --profile example_cluster --dry-run     # print the sbatch script
  raddino launch eval --profile example_cluster --gpus-per-node 1 -- --suite eval/medmnist_chest.yaml --out runs/ev
  raddino launch status /scratch/runs/cxr

Profiles are YAML files in the repository's launch/ (or a path); every profile field is also a flag below, which
wins over the profile. Preempted or timed-out jobs requeue themselves and resume from the newest checkpoint of the
same run directory (docs/SLURM.md).
"""

# Profile field -> argparse options of its flag (the flag is --field-with-dashes).
_FLAGS: dict[str, dict[str, Any]] = {
    "partition": {"help": "SLURM partition"},
    "account": {"help": "SLURM account"},
    "qos": {"help": "quality of service"},
    "constraint": {"help": "node features, e.g. a100"},
    "nodes": {"type": int, "help": "number of nodes"},
    "gpus_per_node": {"type": int, "help": "GPUs per node (one task each)"},
    "ntasks_per_node": {"type": int, "help": "tasks per node (default: gpus per node, or 1)"},
    "cpus_per_task": {"type": int, "help": "CPU cores per task"},
    "mem": {"help": "memory per node, e.g. 480G (0: all)"},
    "time": {"help": "time limit, [D-]HH:MM:SS or minutes"},
    "exclusive": {"action": argparse.BooleanOptionalAction, "help": "whole nodes"},
    "setup": {"action": "append", "metavar": "LINE", "help": "shell line before srun (repeatable; replaces profile's)"},
    "signal_delay_s": {"type": int, "help": "seconds between SIGUSR2 (checkpoint hook) and the time limit"},
    "max_timeouts": {"type": int, "help": "requeues after time limits (preemptions: unlimited)"},
    "job_name": {"help": "SLURM job name"},
    "sbatch": {"action": "append", "metavar": "KEY=VALUE", "help": "any other sbatch option (repeatable)"},
}


def _add_resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", "-P", default=None, help="cluster profile: name in launch/ or a YAML path")
    group = parser.add_argument_group("resources (override the profile)")
    for name, options in _FLAGS.items():
        if options.get("action") is not argparse.BooleanOptionalAction:
            options = {"metavar": name.upper(), **options}
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"res_{name}", default=None, **options)
    parser.add_argument("--local", action="store_true", help="run on this machine (no SLURM), waiting for the end")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    parser.add_argument("--wait", action="store_true", help="after submitting, wait for the job to leave the queue")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="submit pretraining / eval to SLURM (requeue on preemption), or run it locally",
        description="Submit raddino jobs to SLURM with submitit; they checkpoint, requeue and resume on their own.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="launch_command", metavar="WHAT", required=True)

    pre = sub.add_parser(
        "pretrain", help="submit `raddino pretrain`", epilog=EPILOG, formatter_class=parser.formatter_class
    )
    pre.add_argument("--config", "-c", default=None, help="recipe YAML path or name in configs/")
    _add_resource_flags(pre)
    pre.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `raddino pretrain`")
    pre.set_defaults(func=run_pretrain)

    ev = sub.add_parser("eval", help="submit `raddino eval` (its arguments after --; --out is required)")
    _add_resource_flags(ev)
    ev.add_argument("eval_args", nargs=argparse.REMAINDER, metavar="-- EVAL_ARGS", help="arguments of `raddino eval`")
    ev.set_defaults(func=run_eval)

    st = sub.add_parser("status", help="job state, attempts, last step and losses of a launched run")
    st.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    st.set_defaults(func=run_status)


def _profile(args: argparse.Namespace):
    from raddino import launch
    from raddino.errors import RaddinoError

    given = {name: getattr(args, f"res_{name}") for name in _FLAGS}
    if given["sbatch"] is not None:
        pairs = {}
        for item in given["sbatch"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise RaddinoError(f"--sbatch '{item}' is not of the form KEY=VALUE")
            pairs[key] = value
        given["sbatch"] = pairs
    return launch.load_profile(args.profile, given)


def _submit(args: argparse.Namespace, task, profile) -> int:
    from raddino import launch

    run_dir = Path(task.run_dir)
    folder = launch.launch_dir(run_dir) / "submitit"
    if args.dry_run:
        if args.local:
            print(f"# --local: {launch.tasks_per_node(profile)} local task(s) would run:")
        else:
            print(launch.sbatch_script(profile, folder=folder))
        print(f"# each task runs: raddino {task.command} {' '.join(task.argv)}")
        return 0
    launch.ensure_not_active(run_dir)
    job = launch.submit(task, profile, local=args.local)
    where = "this machine" if args.local else "SLURM"
    print(f"submitted job {job.job_id} to {where}: {launch.world_size(profile)} task(s); run directory {run_dir}")
    print(f"task logs: {folder}/{job.job_id}_<task>_log.out|err;  status: raddino launch status {run_dir}")
    if args.local:
        try:
            job.results()  # the local tasks are children of this process: wait for all of them
        except Exception as err:  # the task's error, as submitit re-raises it
            print(launch.run_status(run_dir))
            print(f"job {job.job_id} failed: {str(err).strip().splitlines()[-1]}")
            return 1
        print(launch.run_status(run_dir))
        return 0
    if args.wait:
        state = launch.wait(run_dir)
        print(launch.run_status(run_dir))
        return 0 if state.split()[0] == "COMPLETED" else 1
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from raddino import launch
    from raddino.config import load_config, resolve_recipe

    profile = _profile(args)
    recipe = str(resolve_recipe(args.config).resolve()) if args.config else None
    # No progress bar in job logs (a line per refresh); the user's overrides come after and may turn it back on.
    base = ["train.progress=false", *args.overrides]
    run_dir = Path(load_config(recipe, base).train.output_dir).resolve()
    # Absolute: tasks may start in another directory.
    overrides = [*(o for o in base if not o.startswith("train.output_dir=")), f"train.output_dir={run_dir}"]
    cfg = load_config(recipe, overrides)
    launch.check_world_size(cfg, profile)
    launch.check_run_dir(run_dir, cfg)
    argv = (*(["--config", recipe] if recipe else []), *overrides)
    return _submit(args, launch.Task(command="pretrain", argv=argv, run_dir=str(run_dir)), profile)


def run_eval(args: argparse.Namespace) -> int:
    from raddino import launch
    from raddino.errors import RaddinoError

    profile = _profile(args)
    rest = list(args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args)
    # Checked with `raddino eval`'s own parser here, so a typo fails now rather than in the queue.
    parser = argparse.ArgumentParser(prog="raddino launch eval --")
    importlib.import_module("raddino.commands.eval").add_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["eval", *rest])
    if parsed.out is None:
        raise RaddinoError(
            "launch eval needs `--out DIR` among the eval arguments: the job's records and logs go there"
        )
    if launch.world_size(profile) != 1:
        raise RaddinoError(
            f"raddino eval runs in one process: use --nodes 1 --ntasks-per-node 1 (got {launch.world_size(profile)})"
        )
    run_dir = parsed.out.resolve()
    task = launch.Task(command="eval", argv=(*rest, "--out", str(run_dir)), run_dir=str(run_dir))
    return _submit(args, task, profile)


def run_status(args: argparse.Namespace) -> int:
    from raddino import launch

    print(launch.run_status(args.run_dir.resolve()))
    return 0
