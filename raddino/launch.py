"""Submitting pretraining / evaluation to SLURM (or to this machine) with submitit, and surviving preemption.

What runs where:

- The submitting process (``raddino launch pretrain ...``) resolves the recipe and the cluster profile, checks them
  (resources, the global batch over ``nodes x tasks`` processes, the run directory) and submits a :class:`Task`.
  Nothing is submitted when a check fails.
- Every SLURM task unpickles the same :class:`Task`; it exports torch.distributed's variables from the SLURM
  environment (submitit's :class:`~submitit.helpers.TorchDistributedEnvironment`) and runs the ordinary
  ``raddino pretrain`` command in-process -- the same trainer as on a workstation or under torchrun.
- On preemption or the time limit SLURM sends ``SIGUSR2`` (``--signal=USR2@signal_delay_s``); submitit calls
  :meth:`Task.checkpoint` on rank 0, which confirms the newest complete checkpoint and returns the same task with
  ``train.resume=auto``; submitit requeues the job (same job id, ``SLURM_RESTART_COUNT`` + 1) and the next attempt
  resumes from that checkpoint. A job requeued from outside (``scontrol requeue``, a preempting scheduler) runs the
  same pickled task again and resumes the same way.
- Rank 0 of every attempt appends to ``RUN/launch/attempts.jsonl``; :func:`run_status` reads it back with the
  scheduler's view of the job, the newest checkpoint and the last row of ``metrics.jsonl``.

Why the checkpoint hook does not save a new checkpoint: the signal arrives in the middle of a step, between
collectives that the other ranks are inside of; saving there (DCP is itself collective) can deadlock or write a
half-stepped state. Checkpoints are atomic and frequent (``train.checkpoint_every``), so the hook confirms the
newest complete one and at most ``checkpoint_every`` steps are trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raddino.errors import ConfigError, RaddinoError

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "launch"
LAUNCH_SUBDIR = "launch"  # RUN/launch/: attempts.jsonl, submitit/ (pickles, per-task logs)
ATTEMPTS_FILE = "attempts.jsonl"

# Keys that may change between attempts of one run without making it a different run: where and how it is
# written, how long it goes on (max_steps: schedules follow epochs x steps_per_epoch, so raising it continues the
# same run), and how data is read. Everything else must match the run directory's config.yaml.
RESUMABLE_KEYS = frozenset(
    {
        "train.output_dir",
        "train.resume",
        "train.progress",
        "train.max_steps",
        "train.log_every",
        "train.keep_last",
        "train.checkpoint_every",
        "data.num_workers",
        "parallel.timeout_s",
    }
)

# sbatch options raddino/submitit set themselves; a profile's `sbatch:` table may not replace them.
_MANAGED_SBATCH = frozenset({"output", "error", "signal", "open-mode", "job-name", "nodes", "ntasks-per-node", "time"})
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$")


@dataclass
class Profile:
    """A cluster profile (``launch/NAME.yaml``): the sbatch request of a launch. Every field is also a flag."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # default: one task per GPU (gpus_per_node), or 1 without GPUs
    cpus_per_task: int | None = None  # data.num_workers + 1 is a good start
    mem: str | None = None  # sbatch --mem per node, e.g. 480G; 0 = all of the node's memory
    time: str = "01:00:00"  # [D-]HH:MM:SS, or minutes
    exclusive: bool = False
    setup: list[str] = field(default_factory=list)  # shell lines before srun: module loads, venv activation
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit (the checkpoint hook runs then)
    max_timeouts: int = 3  # requeues after hitting the time limit; preemptions requeue without limit
    job_name: str = "raddino"
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {gres: "gpu:a100:4"}


PROFILE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Profile))


def resolve_profile(name: str) -> Path:
    """A profile is a YAML path, or the name of one in the repository's ``launch/`` (``example_cluster``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = PROFILES_DIR / f"{name}.yaml"
    if named.is_file():
        return named
    available = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) if PROFILES_DIR.is_dir() else ""
    raise RaddinoError(
        f"unknown launch profile '{name}' (profiles in {PROFILES_DIR}: {available or 'none'}; or pass a YAML path)"
    )


def load_profile(name: str | None, overrides: dict[str, Any] | None = None) -> Profile:
    """Built-in defaults <- profile YAML <- command-line values (``None`` values are not overrides), validated."""
    cfg = OmegaConf.structured(Profile)
    origin = "defaults"
    try:
        if name is not None:
            path = resolve_profile(name)
            origin = str(path)
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        origin = "command line"
        cfg = OmegaConf.merge(cfg, given)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise RaddinoError(f"{origin}: invalid launch profile key '{key}': {msg}") from None
    except RaddinoError:
        raise
    except Exception as err:  # YAML syntax errors come from the yaml parser
        raise RaddinoError(f"{origin}: cannot parse YAML: {str(err).splitlines()[0]}") from None
    profile = Profile(**OmegaConf.to_container(cfg))  # type: ignore[arg-type]
    validate_profile(profile)
    return profile


def time_minutes(value: str) -> int:
    """``[D-]HH:MM:SS`` or whole minutes -> minutes (rounded up: SLURM's limit granularity is a minute)."""
    value = str(value).strip()
    if value.isdigit():
        return int(value)
    m = _TIME.match(value)
    if m is None or int(m["m"]) > 59 or int(m["s"]) > 59:
        raise RaddinoError(f"bad --time '{value}': use HH:MM:SS, D-HH:MM:SS or minutes (e.g. 72:00:00)")
    seconds = ((int(m["d"] or 0) * 24 + int(m["h"])) * 60 + int(m["m"])) * 60 + int(m["s"])
    return math.ceil(seconds / 60)


def tasks_per_node(profile: Profile) -> int:
    if profile.ntasks_per_node is not None:
        return profile.ntasks_per_node
    return max(profile.gpus_per_node, 1)


def validate_profile(p: Profile) -> None:
    """Resource requests that SLURM would reject late (or accept and then waste) are errors now."""
    if p.nodes < 1:
        raise RaddinoError(f"bad resource request: --nodes {p.nodes} (need at least 1)")
    if p.gpus_per_node < 0:
        raise RaddinoError(f"bad resource request: --gpus-per-node {p.gpus_per_node} (need 0 or more)")
    ntasks = tasks_per_node(p)
    if ntasks < 1:
        raise RaddinoError(f"bad resource request: --ntasks-per-node {ntasks} (need at least 1)")
    if p.gpus_per_node and ntasks != p.gpus_per_node:
        # The trainer drives one GPU per process (cuda:LOCAL_RANK); other ratios leave GPUs idle or oversubscribed.
        raise RaddinoError(
            f"bad resource request: --ntasks-per-node {ntasks} with --gpus-per-node {p.gpus_per_node}: raddino runs "
            "one task per GPU, so they must be equal"
        )
    if p.cpus_per_task is not None and p.cpus_per_task < 1:
        raise RaddinoError(f"bad resource request: --cpus-per-task {p.cpus_per_task} (need at least 1)")
    if p.mem is not None and not _MEM.match(str(p.mem)):
        raise RaddinoError(f"bad resource request: --mem '{p.mem}' (use e.g. 64G, 500M, or 0 for the whole node)")
    minutes = time_minutes(p.time)
    if minutes < 1:
        raise RaddinoError(f"bad resource request: --time {p.time} (need at least one minute)")
    if not 0 <= p.signal_delay_s < minutes * 60:
        raise RaddinoError(
            f"bad resource request: --signal-delay-s {p.signal_delay_s} must be below the time limit ({minutes * 60} s)"
        )
    if p.max_timeouts < 0:
        raise RaddinoError(f"bad resource request: --max-timeouts {p.max_timeouts} (need 0 or more)")
    if clash := sorted(_MANAGED_SBATCH & {k.replace("_", "-") for k in p.sbatch}):
        raise RaddinoError(f"launch profile 'sbatch' may not set {', '.join(clash)}: use the matching field or flag")


def world_size(profile: Profile) -> int:
    return profile.nodes * tasks_per_node(profile)


def sbatch_parameters(profile: Profile) -> dict[str, Any]:
    """The profile as submitit's SlurmExecutor parameters (sbatch option names, underscores for dashes)."""
    params: dict[str, Any] = {
        "job_name": profile.job_name,
        "nodes": profile.nodes,
        "ntasks_per_node": tasks_per_node(profile),
        "time": time_minutes(profile.time),  # submitit also uses it (minutes) to tell a timeout from a preemption
        "signal_delay_s": profile.signal_delay_s,
    }
    optional = {
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "constraint": profile.constraint,
        "cpus_per_task": profile.cpus_per_task,
        "gpus_per_node": profile.gpus_per_node or None,
        "mem": profile.mem,
        "setup": list(profile.setup) or None,
        "exclusive": True if profile.exclusive else None,
        "additional_parameters": {k.replace("_", "-"): v for k, v in profile.sbatch.items()} or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def check_world_size(cfg: DictConfig, profile: Profile) -> None:
    """The global batch must split over ``nodes x tasks`` processes (and into whole micro-batches)."""
    from raddino.config import batch_split

    world = world_size(profile)
    try:
        batch_split(batch_size=cfg.data.batch_size, global_batch=cfg.data.global_batch, world_size=world)
    except ConfigError as err:
        raise RaddinoError(
            f"--nodes {profile.nodes} x {tasks_per_node(profile)} tasks per node = {world} processes: {err}"
        ) from None


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory holds one run: its ``config.yaml`` (written by the trainer) must match, up to
    :data:`RESUMABLE_KEYS`, or the new job would resume another run's checkpoints with different settings."""
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(existing)))
    except Exception as err:
        raise RaddinoError(f"{existing}: cannot read the run directory's config: {str(err).splitlines()[0]}") from None
    new = _flat(OmegaConf.to_container(cfg))
    differ = sorted(k for k in old.keys() | new.keys() if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise RaddinoError(
            f"run directory {run_dir} was used by a different config ({shown}{more}); choose a new "
            "train.output_dir, or launch with the run's own config to continue it"
        )


@dataclass(frozen=True)
class Task:
    """What every SLURM task runs: ``raddino COMMAND ARGV...`` in-process, after exporting the process group's
    variables. Pickled by submitit; :meth:`checkpoint` is submitit's preemption / timeout hook."""

    command: str  # a raddino sub-command: pretrain | eval
    argv: tuple[str, ...]
    run_dir: str

    def __call__(self) -> int:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        from raddino import cli

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (first node) / MASTER_PORT (from the job id), for
            # raddino.parallel.init_distributed. CUDA_VISIBLE_DEVICES is left alone: the trainer takes
            # cuda:LOCAL_RANK of the node's GPUs. Overwrite: the job's own values beat ones inherited from sbatch.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = job.global_rank == 0
        if main:
            record_attempt(
                Path(self.run_dir),
                event="started",
                job_id=job.job_id,
                restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                host=socket.gethostname(),
                tasks=job.num_tasks,
                nodes=job.num_nodes,
                from_step=latest_checkpoint_step(Path(self.run_dir)),
            )
        code = cli.main([self.command, *self.argv])
        if main:
            event = "finished" if code == 0 else "failed"
            record_attempt(Path(self.run_dir), event=event, job_id=job.job_id, exit_code=code)
        if code != 0:  # submitit marks the job failed and keeps the message in the result pickle
            raise RuntimeError(f"raddino {self.command} exited with code {code}; see the task logs")
        return code

    def checkpoint(self) -> Any:
        """Preempted or out of time (rank 0, inside submitit's SIGUSR2 handler): the newest complete checkpoint is
        the one the next attempt resumes from (see the module docstring); requeue this task with resume=auto."""
        from submitit import JobEnvironment
        from submitit.helpers import DelayedSubmission

        step = latest_checkpoint_step(Path(self.run_dir))
        log.warning("preempted or out of time: requeueing; the next attempt resumes from checkpoint step %s", step)
        record_attempt(Path(self.run_dir), event="requeue", job_id=JobEnvironment().job_id, checkpoint_step=step)
        return DelayedSubmission(self.resumed())

    def resumed(self) -> Task:
        if self.command != "pretrain":
            return self
        return dataclasses.replace(self, argv=(*self.argv, "train.resume=auto"))


def launch_dir(run_dir: Path) -> Path:
    return run_dir / LAUNCH_SUBDIR


def record_attempt(run_dir: Path, *, event: str, **fields: Any) -> None:
    """Append one line to ``RUN/launch/attempts.jsonl`` (one writer: the submitting process or rank 0)."""
    path = launch_dir(run_dir) / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = launch_dir(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return rows


def latest_checkpoint_step(run_dir: Path) -> int | None:
    from raddino.checkpoint import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoints", keep_last=0).latest()
    if latest is None:
        return None
    return int(json.loads((latest / "state.json").read_text())["step"])


def last_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last complete training row of ``metrics.jsonl`` (refused-step rows skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "refused" not in row:
            return row
    return None


def scheduler_state(job_id: str) -> str | None:
    """The job's state from squeue (while the controller knows it), else sacct (with accounting), else None."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"], ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and lines:
            return lines[-1].split()[0]
    return None


def job_state(run_dir: Path) -> tuple[str | None, str]:
    """``(job id, state)`` of the run's newest job: the scheduler's word while it has one, else what the attempt
    records say (``COMPLETED`` / ``FAILED`` / ``UNKNOWN``)."""
    attempts = read_attempts(run_dir)
    if not attempts:
        return None, "NOT SUBMITTED"
    job_id = str(attempts[-1].get("job_id"))
    rows = [a for a in attempts if str(a.get("job_id")) == job_id]
    executor = next((a.get("executor") for a in rows if a["event"] == "submitted"), "slurm")
    if executor == "slurm" and (state := scheduler_state(job_id)):
        return job_id, state
    last = rows[-1]["event"]
    recorded = {"finished": "COMPLETED", "failed": "FAILED"}.get(last)
    if recorded:
        return job_id, recorded
    if executor == "local":
        return job_id, "RUNNING" if _pid_alive(job_id) else "UNKNOWN"
    return job_id, "UNKNOWN (not in the queue and no accounting; see the task logs)"


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


# squeue states of a job still in the queue (a requeued job passes through COMPLETING / REQUEUED to PENDING).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "SIGNALING",
        "STAGE_OUT",
    }
)


def run_status(run_dir: Path) -> str:
    """The text of ``raddino launch status RUN_DIR``."""
    if not run_dir.is_dir():
        raise RaddinoError(f"no run directory {run_dir}")
    attempts = read_attempts(run_dir)
    if not attempts and not (run_dir / "metrics.jsonl").is_file():
        raise RaddinoError(f"{run_dir} is not a launched run (no {LAUNCH_SUBDIR}/{ATTEMPTS_FILE}, no metrics.jsonl)")
    job_id, state = job_state(run_dir)
    lines = [f"run: {run_dir}", f"job: {job_id or '-'}  state: {state}"]
    started = [a for a in attempts if a["event"] == "started"]
    lines.append(f"attempts: {len(started)}")
    for i, a in enumerate(started, 1):
        after = _attempt_outcome(attempts, a)
        from_step = a.get("from_step")
        lines.append(
            f"  {i}. job {a.get('job_id')} (restart {a.get('restart', 0)}) started {a['time']} on {a.get('host')} "
            f"with {a.get('tasks')} task(s), from step {from_step if from_step is not None else 0}: {after}"
        )
    ckpt = latest_checkpoint_step(run_dir)
    row = last_metrics(run_dir)
    lines.append(f"last step: {row['step'] if row else '-'}  (newest complete checkpoint: step {ckpt or '-'})")
    if row:
        losses = "  ".join(f"{k}={row[k]:.4g}" for k in ("loss", "dino", "ibot", "koleo") if k in row)
        lines.append(f"last losses (step {row['step']}): {losses}")
    if job_id:
        logs = sorted(launch_dir(run_dir).glob(f"submitit/{job_id}_*_log.*"))
        if logs:
            lines.append("logs: " + "  ".join(str(p) for p in logs))
    return "\n".join(lines)


def _attempt_outcome(attempts: list[dict[str, Any]], start: dict[str, Any]) -> str:
    after = attempts[attempts.index(start) + 1 :]
    for a in after:
        if a["event"] == "started":
            return "interrupted (killed or requeued from outside)"
        if a["event"] == "requeue":
            return f"requeued by the checkpoint hook at checkpoint step {a.get('checkpoint_step')}"
        if a["event"] == "finished":
            return "finished"
        if a["event"] == "failed":
            return f"failed (exit code {a.get('exit_code')})"
    return "running (or killed without a record)"


def submitit_command(folder: Path) -> str:
    """What each task runs; the same line submitit's SlurmExecutor writes (the submitting Python, so the job runs
    the same environment)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(profile: Profile, *, folder: Path) -> str:
    """The sbatch script a submission writes, rendered by submitit (no SLURM needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **sbatch_parameters(profile))


def require_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise RaddinoError(
            "no SLURM on this machine (sbatch / srun not found on PATH): run here with --local, or submit from a "
            "cluster login node"
        )


def ensure_not_active(run_dir: Path) -> None:
    job_id, state = job_state(run_dir)
    if job_id is not None and state.split()[0] in ACTIVE_STATES:
        raise RaddinoError(
            f"run directory {run_dir} already has job {job_id} ({state}); wait for it, or `scancel {job_id}` first"
        )


def submit(task: Task, profile: Profile, *, local: bool) -> Any:
    """Submit ``task`` (SLURM, or this machine with ``local``) and record the submission. Returns the submitit job."""
    import submitit

    run_dir = Path(task.run_dir)
    folder = launch_dir(run_dir) / "submitit"
    if local:
        if profile.nodes != 1:
            raise RaddinoError(f"--local runs on this machine: --nodes must be 1, not {profile.nodes}")
        executor: Any = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=time_minutes(profile.time),
            tasks_per_node=tasks_per_node(profile),
            gpus_per_node=profile.gpus_per_node,
            signal_delay_s=profile.signal_delay_s,
        )
    else:
        require_slurm()
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_timeouts)
        executor.update_parameters(**sbatch_parameters(profile))
    try:
        job = executor.submit(task)
    except (
        subprocess.CalledProcessError,
        submitit.core.utils.FailedJobError,
        submitit.core.utils.FailedSubmissionError,
    ) as err:
        detail = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise RaddinoError(f"sbatch refused the job: {str(detail).strip().splitlines()[-1]}") from None
    record_attempt(
        run_dir,
        event="submitted",
        job_id=str(job.job_id),
        executor="local" if local else "slurm",
        command=task.command,
        argv=list(task.argv),
        resources=dataclasses.asdict(profile),
    )
    return job


def wait(run_dir: Path, *, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Block until the run's newest job has left the queue; returns its final state."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        _, state = job_state(run_dir)
        if state.split()[0] not in ACTIVE_STATES:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise RaddinoError(f"still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
