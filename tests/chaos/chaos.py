"""Chaos test: SIGKILL a pretraining run at random moments, resume it with ``train.resume=auto``, repeat.

    python tests/chaos/chaos.py                       # K=20 kills, one process
    python tests/chaos/chaos.py --kills 5 --nproc 2   # 2 ranks under torchrun (gloo on CPU)

Each attempt runs ``raddino pretrain`` on the same run directory (its own process group, so the kill takes every
rank and torchrun with it). After a kill the newest complete checkpoint is noted; the attempt that follows must
start exactly after it (its first metrics row is that step + 1), i.e. no step before the last complete checkpoint
is lost. A last attempt runs to the end. Then every checkpoint present must load (teacher tensors finite), the
final step count must be reached, and ``metrics.jsonl`` must hold each step once. Prints ``survived N/K`` and
exits 0 only if every kill was survived and the final checks pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# configs/micro_cpu.yaml: ~0.1 s per step on one CPU core.
OVERRIDES = ["train.device=cpu", "train.keep_last=3"]


def command(run: Path, *, steps: int, every: int, nproc: int) -> list[str]:
    # epochs x 1 step: the run's length is exactly `steps` (and warmups last a step or two).
    args = ["pretrain", "--config", "micro_cpu", *OVERRIDES, f"train.output_dir={run}", f"train.epochs={steps}"]
    args += ["train.steps_per_epoch=1", f"train.checkpoint_every={every}"]
    if nproc == 1:
        return [sys.executable, "-m", "raddino.cli", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "raddino.cli", *args]


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by the kill; the next attempt drops it
        if "refused" not in row:
            steps.append(row["step"])
    return steps


def latest_step(run: Path) -> int:
    from raddino.checkpoint import CheckpointManager

    latest = CheckpointManager(run / "checkpoints", keep_last=0).latest()
    return 0 if latest is None else int(json.loads((latest / "state.json").read_text())["step"])


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``). torchrun starts each rank in a session of its own, so a
    process-group kill of the launcher would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the attempt and every process it started, all at once (as a node failure or `scancel` would)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")


def resumed_from(log: Path) -> int:
    """The step an attempt resumed from, as its log says (0: it started from scratch)."""
    found = RESUMED.findall(log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", "-k", type=int, default=20, help="number of SIGKILLs (default 20)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) per attempt (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: enough for every kill)")
    parser.add_argument("--every", type=int, default=5, help="checkpoint interval in steps (default 5)")
    parser.add_argument("--min-wait", type=float, default=1.0, help="earliest kill after start-up, seconds")
    parser.add_argument("--max-wait", type=float, default=4.0, help="latest kill after start-up, seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    steps = args.steps or 40 * args.kills + 20
    run = args.out or Path(tempfile.mkdtemp(prefix="raddino-chaos-"))
    cmd = command(run, steps=steps, every=args.every, nproc=args.nproc)
    survived, problems = 0, []

    def resumed_right(attempt: str, before: int, log: Path) -> bool:
        if (at := resumed_from(log)) != before:
            problems.append(f"{attempt} resumed from step {at}, but the newest complete checkpoint was {before}")
            return False
        return True

    logs = run.with_name(run.name + ".logs")
    logs.mkdir(exist_ok=True)
    try:
        for kill in range(1, args.kills + 1):
            before, log = latest_step(run), logs / f"attempt{kill:03d}.log"
            proc = start(cmd, log)
            # Kill at a random moment after start-up (the trainer logs its derived values once it is built).
            deadline = time.monotonic() + 300
            while "derived values" not in log.read_text(errors="replace") and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            kill_at = time.monotonic() + rng.uniform(args.min_wait, args.max_wait)
            while time.monotonic() < kill_at and proc.poll() is None:
                time.sleep(0.02)
            if proc.poll() is not None:
                problems.append(f"attempt {kill} ended (exit {proc.returncode}) before its kill; see {log}")
                break
            tree = process_tree(proc.pid)
            kill_all(proc)
            for pid in tree:  # wait until every rank is gone before the next attempt touches the run
                while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
                    time.sleep(0.05)
            # This attempt resuming from the newest complete checkpoint means the previous kill was survived.
            if resumed_right(f"attempt {kill}", before, log) and kill > 1:
                survived += 1
            print(f"kill {kill}/{args.kills}: newest complete checkpoint now step {latest_step(run)}", flush=True)
        else:
            before, log = latest_step(run), logs / "final.log"
            code = start(cmd, log).wait(timeout=1800)
            if code != 0:
                problems.append(f"the final attempt failed with exit {code}; see {log}")
            elif resumed_right("the final attempt", before, log) and args.kills:
                survived += 1
            problems += final_checks(run, steps)
    finally:
        if args.out is None and not problems:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)
    print(f"survived {survived}/{args.kills}")
    for problem in problems:
        print(f"problem: {problem}")
    return 0 if survived == args.kills and not problems else 1


def final_checks(run: Path, steps: int) -> list[str]:
    import torch

    from raddino.checkpoint import CheckpointManager
    from raddino.interop.runs import read_run_teacher

    problems = []
    manager = CheckpointManager(run / "checkpoints", keep_last=0)
    if latest_step(run) != steps:
        problems.append(f"final checkpoint at step {latest_step(run)}, expected {steps}")
    for path in manager.complete():
        teacher = read_run_teacher(run, checkpoint=path)
        if not all(torch.isfinite(t).all() for t in teacher.backbone.values()):
            problems.append(f"{path.name}: non-finite teacher weights")
    logged = metric_steps(run)
    if logged != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps are not 1..{steps} once each ({len(logged)} rows)")
    if list((run / "checkpoints").glob(".tmp-*")):
        problems.append("a torn .tmp checkpoint was left after the final save")
    return problems


if __name__ == "__main__":
    sys.exit(main())
