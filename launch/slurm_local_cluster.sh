#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the test suite (tests/test_launch.py) and CI (.ci/run).
#
#   launch/slurm_local_cluster.sh install        apt-get the Debian packages (munge slurmctld slurmd slurm-client)
#   launch/slurm_local_cluster.sh start DIR      munged + slurmctld + slurmd, all state under DIR; prints
#                                                `export SLURM_CONF=DIR/slurm.conf` (clients need it)
#   launch/slurm_local_cluster.sh stop DIR       stop what `start DIR` started, by the pids it recorded
#
# No systemd and no cgroups: SlurmUser=root, proctrack/linuxproc, task/none. No accounting daemon either
# (slurmdbd + mariadb would add ~10 s and a database): `raddino launch status` reads job states from squeue while
# a job is known to the controller and from the run directory's attempt records afterwards (docs/SLURM.md).
# Needs root (slurmd runs jobs as their users; munged must run as the munge user).
set -euo pipefail

die() { echo "slurm_local_cluster: $*" >&2; exit 1; }

install_packages() {
  [[ $(id -u) == 0 ]] || die "install needs root"
  command -v apt-get >/dev/null || die "install needs apt-get (Debian/Ubuntu)"
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

wait_for() {  # wait_for SECONDS CMD...: until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

start() {
  local dir=$1
  [[ $(id -u) == 0 ]] || die "start needs root"
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null \
      || die "$bin not found: run '$0 install'"
  done
  export PATH=$PATH:/usr/sbin
  mkdir -p "$dir"/{state,spool,log,run}
  dir=$(cd "$dir" && pwd)

  # munged: shared by every cluster on this machine; started only when none is running (and then stopped by us).
  local munge_pid=""
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- munged
    wait_for 10 bash -c 'munge -n </dev/null | unmunge' || die "munged did not start"
    munge_pid=$(cat /run/munge/munged.pid)
  fi
  echo "$munge_pid" >"$dir/run/munged.started"

  local node_line ctld_port slurmd_port host
  host=$(hostname -s)
  node_line=$(slurmd -C | head -n 1)  # NodeName=... CPUs=... RealMemory=... as this machine reports itself
  ctld_port=${SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=${SLURMD_PORT:-$(free_port)}
  cat >"$dir/slurm.conf" <<CONF
ClusterName=raddino-local
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after its requeue (default 120 s), and the main scheduler runs
# every sched_interval (default 60 s): both shortened so a preemption test resumes in seconds.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
# Killed tasks get SIGKILL 2 s after SIGTERM (submitit's handler ignores SIGTERM); finished jobs stay visible to
# squeue for 5 minutes.
MinJobAge=300
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" -i
  slurmd -f "$SLURM_CONF"
  wait_for 30 test -s "$dir/run/slurmctld.pid" || die "slurmctld did not start; see $dir/log/slurmctld.log"
  wait_for 30 test -s "$dir/run/slurmd.pid" || die "slurmd did not start; see $dir/log/slurmd.log"
  # The node is usable once the controller reports it idle.
  if ! wait_for 30 bash -c "sinfo -h -N -o %t | grep -qx idle"; then
    die "node not idle after 30 s: $(sinfo -h -N -o '%N %t %E' 2>&1); see $dir/log/"
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local dir=$1 pid
  for name in slurmd slurmctld; do
    pid=$(cat "$dir/run/$name.pid" 2>/dev/null || true)
    if alive "$pid"; then
      kill "$pid"
      wait_for 10 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
  done
  pid=$(cat "$dir/run/munged.started" 2>/dev/null || true)
  if alive "$pid"; then
    kill "$pid"
  fi
}

case ${1:-} in
  install) install_packages ;;
  start) [[ -n ${2:-} ]] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [[ -n ${2:-} ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
