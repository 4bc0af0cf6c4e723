"""``raddino launch``: profiles, checks and dry runs without SLURM; then real jobs on a single-node SLURM cluster
started from Debian packages by ``launch/slurm_local_cluster.sh`` (root + apt-get, as in CI): a pretraining, a
2-task gloo job, and preemption both ways (``scontrol requeue``, and SIGUSR2 -> submitit's checkpoint hook)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import raddino
from raddino import launch
from raddino.cli import main
from raddino.commands.launch import _FLAGS
from raddino.config import load_config, to_yaml
from raddino.errors import RaddinoError

REPO = Path(raddino.__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "launch" / "slurm_local_cluster.sh"

# configs/micro_cpu.yaml (the tiny CPU run of tests/test_train.py: 28 px crops, tiny heads, 4 steps per epoch).
SMALL = ["train.device=cpu", "train.log_every=1"]
# What the test cluster can hold: 1 core and a little memory per task (the machine may have only 2 cores).
RESOURCES = ["--profile", "local", "--time", "00:10:00"]


def _launch(*args: str) -> int:
    return main(["launch", *args])


def _pretrain(run_dir: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "pretrain",
        "--config",
        "micro_cpu",
        *RESOURCES,
        *SMALL,
        f"train.epochs={epochs}",
        *extra,
        f"train.output_dir={run_dir}",
    ]


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    """A PATH without sbatch / srun / squeue."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# ---------------------------------------------------------------- profiles, checks, dry run (no SLURM needed)


def test_every_profile_field_has_a_flag_that_wins_over_the_profile():
    assert set(_FLAGS) == set(launch.PROFILE_FIELDS)
    base = launch.load_profile("example_cluster")
    assert (base.partition, base.account, base.gpus_per_node, base.time) == ("gpu", "my_project", 4, "72:00:00")
    p = launch.load_profile(
        "example_cluster", {"partition": "long", "nodes": 16, "setup": ["module load x"], "time": None}
    )
    assert (p.partition, p.nodes, p.setup, p.account, p.time) == (
        "long",
        16,
        ["module load x"],
        "my_project",
        "72:00:00",
    )
    for path in sorted((REPO / "launch").glob("*.yaml")):  # every shipped profile is valid
        launch.load_profile(path.stem)


def test_time_limits():
    assert launch.time_minutes("72:00:00") == 72 * 60
    assert launch.time_minutes("1-00:00:30") == 24 * 60 + 1  # rounded up to the minute
    assert launch.time_minutes("90") == 90
    with pytest.raises(RaddinoError, match="bad --time '1:99:00'"):
        launch.time_minutes("1:99:00")


def test_unknown_profile_and_unknown_profile_key(tmp_path, capsys):
    assert _launch("pretrain", "--profile", "nope", "--dry-run", f"train.output_dir={tmp_path / 'r'}") == 2
    err = capsys.readouterr().err
    assert "unknown launch profile 'nope'" in err and "example_cluster" in err and "local" in err
    bad = tmp_path / "typo.yaml"
    bad.write_text("partition: gpu\ngpu_per_node: 4\n")
    with pytest.raises(RaddinoError, match="invalid launch profile key 'gpu_per_node'"):
        launch.load_profile(str(bad))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0"], "--nodes 0"),
        (["--time", "soon"], "bad --time 'soon'"),
        (["--gpus-per-node", "4", "--ntasks-per-node", "2"], "one task per GPU"),
        (["--mem", "lots"], "--mem 'lots'"),
        (["--cpus-per-task", "0"], "--cpus-per-task 0"),
        (["--time", "00:01:00", "--signal-delay-s", "120"], "below the time limit"),
        (["--sbatch", "output=/tmp/x"], "may not set output"),
        (["--sbatch", "novalue"], "not of the form KEY=VALUE"),
    ],
)
def test_bad_resource_requests_submit_nothing(tmp_path, capsys, no_slurm, flags, message):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run), *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("raddino launch: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_global_batch_must_split_over_nodes_times_tasks(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run, "data.global_batch=16"), "--nodes", "3", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "--nodes 3 x 1 tasks per node = 3 processes" in err and "data.global_batch" in err
    assert not run.exists()
    assert _launch(*_pretrain(run, "data.global_batch=16"), "--nodes", "2", "--dry-run") == 0


def test_no_slurm_says_so_and_suggests_local(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run)) == 2
    err = capsys.readouterr().err
    assert "no SLURM on this machine" in err and "--local" in err
    assert not (run / "launch").exists()


def test_sbatch_refusing_the_job_is_one_clear_line(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (
        ("srun", "exit 0"),
        ("sbatch", "echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1"),
    ):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    run = tmp_path / "run"
    assert _launch(*_pretrain(run), "--partition", "nope") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (submitit echoes sbatch's own stderr before it)
    assert last == "raddino launch: error: sbatch refused the job: sbatch: error: invalid partition specified: nope"
    assert launch.read_attempts(run) == []  # nothing recorded as submitted


def test_run_dir_used_by_a_different_config(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    run.mkdir()
    # What the trainer writes at the start of a run.
    cfg = load_config("micro_cpu", [*SMALL, "train.epochs=2", f"train.output_dir={run}", "optim.base_lr=0.01"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert _launch(*_pretrain(run, "optim.base_lr=0.001"), "--dry-run") == 2
    err = capsys.readouterr().err
    assert f"run directory {run} was used by a different config" in err and "optim.base_lr: 0.01 -> 0.001" in err
    # The same run, continued for longer and checkpointed more often: allowed.
    extra = ("optim.base_lr=0.01", "train.max_steps=8", "train.checkpoint_every=2")
    assert _launch(*_pretrain(run, *extra), "--dry-run") == 0


def test_dry_run_prints_the_sbatch_script_of_a_rad_dino_scale_run(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    args = ["pretrain", "--config", "vitb14_cxr", "--profile", "example_cluster", "--nodes", "16"]
    assert (
        _launch(
            *args,
            "--gpus-per-node",
            "4",
            "--qos",
            "high",
            "data.global_batch=1024",
            f"train.output_dir={run}",
            "--dry-run",
        )
        == 0
    )
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=4320",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my_project",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=FAIL",
        f"#SBATCH --output={run}/launch/submitit/%j_0_log.out",
        "module load cuda/12.4",
    ):
        assert line in out.splitlines(), line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"-m submitit.core._submit {run}/launch/submitit" in srun
    assert f"raddino pretrain --config {REPO}/configs/vitb14_cxr.yaml" in out and f"train.output_dir={run}" in out
    assert not run.exists()  # nothing written, nothing submitted


def test_launch_eval_needs_an_output_directory_and_one_process(tmp_path, capsys, no_slurm):
    assert _launch("eval", "--dry-run", "--", "--suite", "eval/medmnist_chest.yaml") == 2
    assert "needs `--out DIR`" in capsys.readouterr().err
    out = tmp_path / "ev"
    assert _launch("eval", "--ntasks-per-node", "2", "--dry-run", "--", "--suite", "x.yaml", "--out", str(out)) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert _launch("eval", "--dry-run", "--", "--suite", "x.yaml", "--out", str(out)) == 0
    assert f"raddino eval --suite x.yaml --out {out}" in capsys.readouterr().out


def _fake_checkpoint(run: Path, step: int) -> None:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "state.json").write_text(json.dumps({"step": step}))


def test_status_reads_attempts_checkpoints_and_metrics(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    launch.record_attempt(run, event="submitted", job_id="41", executor="slurm")
    launch.record_attempt(run, event="started", job_id="41", restart=0, host="n1", tasks=2, from_step=None)
    launch.record_attempt(run, event="requeue", job_id="41", checkpoint_step=5)
    launch.record_attempt(run, event="started", job_id="41", restart=1, host="n2", tasks=2, from_step=5)
    launch.record_attempt(run, event="finished", job_id="41", exit_code=0)
    _fake_checkpoint(run, 5)
    _fake_checkpoint(run, 8)
    rows = [{"step": s, "loss": 9.0 - s / 10, "dino": 6.0, "ibot": 2.0, "koleo": 1.5} for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # torn
    assert _launch("status", str(run)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "job: 41  state: COMPLETED" in out  # no scheduler to ask: the attempt records say it finished
    assert "attempts: 2" in out
    assert out[3].startswith("  1. job 41 (restart 0)") and out[3].endswith(
        "on n1 with 2 task(s), from step 0: requeued by the checkpoint hook at checkpoint step 5"
    )
    assert out[4].endswith("on n2 with 2 task(s), from step 5: finished")
    assert "last step: 8  (newest complete checkpoint: step 8)" in out
    assert "last losses (step 8): loss=8.2  dino=6  ibot=2  koleo=1.5" in out
    assert _launch("status", str(tmp_path / "nothing")) == 2


def test_checkpoint_hook_requeues_the_same_task_with_resume_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    run = tmp_path / "run"
    _fake_checkpoint(run, 10)
    task = launch.Task(command="pretrain", argv=("--config", "tiny_cpu", "train.resume=none"), run_dir=str(run))
    delayed = task.checkpoint()
    assert delayed.function == launch.Task(
        command="pretrain", argv=("--config", "tiny_cpu", "train.resume=none", "train.resume=auto"), run_dir=str(run)
    )
    assert launch.read_attempts(run)[-1] | {"time": None} == {
        "event": "requeue",
        "time": None,
        "job_id": "77",
        "checkpoint_step": 10,
    }
    # eval has no resume: the same task again
    assert launch.Task(command="eval", argv=("--out", "x"), run_dir=str(run)).resumed().argv == ("--out", "x")


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_local_two_tasks_without_slurm(tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run, "train.max_steps=4"), "--local", "--ntasks-per-node", "2") == 0
    out = capsys.readouterr().out
    assert "job: " in out and "state: COMPLETED" in out
    assert json.loads((run / "derived.json").read_text())["world_size"] == 2
    assert _steps(run) == [1, 2, 3, 4]
    assert launch.latest_checkpoint_step(run) == 4


# ---------------------------------------------------------------- a real SLURM cluster on this machine


def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: slurmd and munged are started on this machine (CI runs as root)"
    if all(shutil.which(b) or shutil.which(b, path="/usr/sbin") for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if shutil.which("apt-get") is None:
        return "no SLURM binaries and no apt-get to install munge slurmctld slurmd slurm-client"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a single-node cluster (munged, slurmctld, slurmd), installed with apt-get if missing."""
    if reason := _skip_reason():
        pytest.skip(reason)
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "install"], check=True, capture_output=True, timeout=600)
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state)], capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr
        yield state / "slurm.conf"
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], timeout=60)


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    monkeypatch.setenv("PATH", f"{os.environ['PATH']}:/usr/sbin")
    # The jobs (sbatch exports this environment) import the raddino under test, whether installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm_cluster


def _submitted_job(run: Path) -> str:
    return next(a["job_id"] for a in launch.read_attempts(run) if a["event"] == "submitted")


def _wait_for_rows(run: Path, rows: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_steps(run)) >= rows and launch.latest_checkpoint_step(run):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {rows} metric rows after {timeout_s} s: {launch.run_status(run)}")


@pytest.mark.slurm
def test_slurm_pretraining_completes(slurm, tmp_path, capsys):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run, "train.max_steps=6"), "--wait") == 0, launch.run_status(run)
    out = capsys.readouterr().out
    assert f"submitted job {_submitted_job(run)} to SLURM: 1 task(s)" in out
    assert "state: COMPLETED" in out and "from step 0: finished" in out
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert launch.latest_checkpoint_step(run) == 6
    assert [a["event"] for a in launch.read_attempts(run)] == ["submitted", "started", "finished"]
    job = _submitted_job(run)
    assert (run / "launch" / "submitit" / f"{job}_0_log.err").is_file()  # the task's log, where status says


@pytest.mark.slurm
def test_slurm_two_tasks_train_distributed(slurm, tmp_path):
    run = tmp_path / "run"
    assert _launch(*_pretrain(run, "train.max_steps=6"), "--ntasks-per-node", "2", "--wait") == 0
    assert json.loads((run / "derived.json").read_text())["world_size"] == 2  # one process group over the 2 tasks
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    started = [a for a in launch.read_attempts(run) if a["event"] == "started"]
    assert [(a["tasks"], a["restart"]) for a in started] == [(2, 0)]
    logs = run / "launch" / "submitit"
    assert "global_rank=1(2)" in (logs / f"{_submitted_job(run)}_1_log.out").read_text()  # task 1 ran...
    assert "process group: gloo over 2" in (logs / f"{_submitted_job(run)}_1_log.err").read_text()  # ...and joined


def _preempted_run(run: Path, how: list[str], *flags: str, epochs: int) -> tuple[list[dict], int]:
    """Submit ``epochs`` x 4 steps (checkpoint every 5), interrupt with ``how`` after step 7, wait for the end."""
    total = epochs * 4
    assert _launch(*_pretrain(run, "train.checkpoint_every=5", epochs=epochs), *flags) == 0
    job = _submitted_job(run)
    _wait_for_rows(run, 7)
    subprocess.run([*how, job], check=True, timeout=30)
    state = launch.wait(run, poll_s=0.5, timeout_s=180)
    assert state == "COMPLETED", launch.run_status(run)
    attempts = launch.read_attempts(run)
    assert [a["event"] for a in attempts[:2]] == ["submitted", "started"]
    assert attempts[2]["event"] != "finished", "the run finished before it was interrupted: make it longer"
    steps = _steps(run)
    # Every step once, in order: the steps after the resumed checkpoint were trimmed from metrics and trained again.
    assert steps == list(range(1, total + 1)), steps
    assert launch.latest_checkpoint_step(run) == total
    started = [a for a in attempts if a["event"] == "started"]
    assert [(a["job_id"], a["restart"]) for a in started] == [(job, 0), (job, 1)]  # the same job, requeued
    assert started[0]["from_step"] is None and started[1]["from_step"] in range(5, total, 5)
    assert attempts[-1]["event"] == "finished"
    return attempts, started[1]["from_step"]


@pytest.mark.slurm
def test_slurm_requeue_resumes_from_the_checkpoint(slurm, tmp_path):
    """``scontrol requeue`` (what a preempting scheduler does): the tasks are killed -- SIGTERM, which submitit
    ignores, then SIGKILL KillWait (2 s) later, so the run goes on for ~3 s (20 steps here) -- and the same job runs
    again. 100 steps, so that a machine several times faster still has steps left when the kill lands."""
    run = tmp_path / "run"
    attempts, _ = _preempted_run(run, ["scontrol", "requeue"], epochs=25)
    assert "requeue" not in [a["event"] for a in attempts]  # killed from outside: no hook ran
    assert "interrupted (killed or requeued from outside)" in launch.run_status(run)


@pytest.mark.slurm
def test_slurm_sigusr2_runs_the_checkpoint_hook_and_requeues(slurm, tmp_path):
    """SIGUSR2 (what SLURM sends ``signal_delay_s`` before the time limit) to both tasks of a 2-task job: rank 0's
    hook confirms the newest checkpoint and requeues at once; the next attempt resumes from exactly that step."""
    run = tmp_path / "run"
    attempts, from_step = _preempted_run(run, ["scancel", "--signal=USR2"], "--ntasks-per-node", "2", epochs=3)
    hooks = [a for a in attempts if a["event"] == "requeue"]
    assert len(hooks) == 1 and hooks[0]["checkpoint_step"] == from_step
    assert f"requeued by the checkpoint hook at checkpoint step {from_step}" in launch.run_status(run)
    assert OmegaConf.load(run / "config.yaml").train.resume == "auto"
