#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests and CI (not for real work).
#
#   bash slurm/local_cluster.sh install   # apt-get the Debian 12 packages (skipped when present)
#   bash slurm/local_cluster.sh start     # install if needed, start munged + slurmctld + slurmd, wait for idle
#   bash slurm/local_cluster.sh status    # daemons, node, queue; exit 1 when the cluster is not up
#   bash slurm/local_cluster.sh logs      # the daemons' log tails (what to read when a job never starts)
#   bash slurm/local_cluster.sh stop      # stop exactly the daemons `start` started (PID files)
#
# Runs as root on Debian 12 (slurm-wlm 22.05, munge 0.5) with no systemd and no cgroups, so it works in
# containers. Everything it creates lives under $SLURM_LOCAL_DIR (default /tmp/mtp_occ_slurm), except
# /etc/slurm/slurm.conf (+ slurmdbd.conf), the path every SLURM client reads without SLURM_CONF; a conf
# there that this script did not write is never overwritten.
#
# Environment:
#   SLURM_LOCAL_DIR=DIR    state, spool, logs, PID files, the accounting database
#   SLURM_ACCOUNTING=1     also run slurmdbd + MariaDB (unix socket only), so that `sacct` works:
#                          submitit reads job states (job.state, job.done()) from sacct; without it they
#                          stay UNKNOWN, though results still come back (all Hydra's launcher needs).
#
# Departures from a stock setup, and why:
#   - AuthInfo=cred_expire=10: a requeued job (preemption -> checkpoint -> requeue) may not start again
#     before the credential lifetime ends, 120 s by default; tests would wait that long per requeue.
#   - short scheduler intervals: a requeued job becomes eligible with no event that wakes the scheduler,
#     so the periodic pass (60 s by default) would decide when it restarts.
#   - memory is a scheduling number only (no cgroups): a job is not killed for using more than it asked.
#   - `start` is idempotent: a running cluster with the same configuration is left alone; a different
#     configuration (e.g. SLURM_ACCOUNTING changed) restarts it.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/mtp_occ_slurm}
ACCOUNTING=${SLURM_ACCOUNTING:-0}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by mtp_occ slurm/local_cluster.sh"
DB_SOCKET=/run/mysqld/mysqld.sock

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------ install
have_packages() {
  local b
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || return 1; done
  if [ "$ACCOUNTING" = 1 ]; then
    for b in slurmdbd mariadbd; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || return 1; done
  fi
}

install_packages() {
  have_packages && { say "packages present"; return 0; }
  [ "$(id -u)" = 0 ] || die "installing needs root (apt-get)"
  local pkgs=(slurmctld slurmd slurm-client munge)
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  say "apt-get install ${pkgs[*]}"
  apt-get update -qq
  # Without systemd the postinst scripts print "policy-rc.d denied execution": nothing starts, as wanted.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

# --------------------------------------------------------------------------------------- configuration
slurm_conf() {
  local host cpus mem_mb acct
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))  # leave the OS some room
  if [ "$ACCOUNTING" = 1 ]; then
    acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
  else
    acct='AccountingStorageType=accounting_storage/none'
  fi
  # AccountingStorageEnforce is left out on purpose: with no associations defined it rejects every job.
  cat <<EOF
$MARK (state in $STATE)
ClusterName=mtpocc
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
  cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
DebugLevel=info
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
}

# A real cluster's conf must survive this script: refuse to touch a file it did not write.
require_owned() {
  if [ -e "$1" ] && ! head -n 1 "$1" | grep -qF "$MARK"; then
    die "$1 exists and was not written by this script; move it away to run the local cluster"
  fi
}

write_owned() {
  require_owned "$1"
  mkdir -p "$(dirname "$1")"
  printf '%s\n' "$2" > "$1"
}

# ------------------------------------------------------------------------------------------ daemons
pid_alive() { [ -s "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

node_up() { sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

cluster_up() { pid_alive slurmctld && pid_alive slurmd && node_up; }

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then  # Debian's postinst creates it; a stripped image may not have one
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"  # ours: `stop` may kill it; a system munged it leaves alone
  fi
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

start_accounting() {
  # MariaDB listens on its unix socket only (no TCP port); its data lives under $STATE.
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mkdir -p "$STATE/mysql"
    mariadb-install-db --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=socket \
      > "$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
  fi
  mkdir -p "$(dirname "$DB_SOCKET")"
  if ! pid_alive mariadb; then
    mariadbd --datadir="$STATE/mysql" --user=root --skip-networking --socket="$DB_SOCKET" \
      --pid-file="$STATE/mariadb.pid" --log-error="$STATE/log/mariadb.err" >/dev/null 2>&1 &
  fi
  wait_for 30 "MariaDB" mariadb --socket="$DB_SOCKET" -uroot -e 'select 1'
  write_owned "$DBD_CONF" "$(slurmdbd_conf)"
  chmod 600 "$DBD_CONF"  # slurmdbd refuses a conf others can read (it may hold a password)
  pid_alive slurmdbd || /usr/sbin/slurmdbd
  wait_for 20 "slurmdbd" pid_alive slurmdbd
}

# wait_for SECONDS WHAT CMD...: poll CMD every 0.25 s
wait_for() {
  local secs=$1 what=$2 i
  shift 2
  for ((i = 0; i < secs * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  echo "local_cluster: $what did not come up within ${secs}s; logs:" >&2
  tail -n 20 "$STATE"/log/* >&2 2>/dev/null || true
  exit 1
}

start() {
  require_owned "$CONF"
  [ "$ACCOUNTING" = 1 ] && require_owned "$DBD_CONF"
  install_packages
  local want
  want=$(slurm_conf)
  if cluster_up && [ "$(cat "$CONF" 2>/dev/null)" = "$want" ]; then
    say "already running"
    return 0
  fi
  stop_daemons quiet  # a half-started or differently configured cluster: begin again from nothing
  mkdir -p "$STATE"/{ctld,spool,log}
  write_owned "$CONF" "$want"
  start_munge
  [ "$ACCOUNTING" = 1 ] && start_accounting
  /usr/sbin/slurmctld  # both daemonize and write their PID files under $STATE
  /usr/sbin/slurmd
  wait_for 30 "the node" node_up
  # a node left down/drained by an unclean stop does not return by itself after a restart
  scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
  say "up ($(nproc) CPUs, accounting $([ "$ACCOUNTING" = 1 ] && echo on || echo off), state in $STATE)"
  sinfo
}

# stop_daemons [quiet]: TERM each daemon we started, KILL it after 10 s, newest first.
stop_daemons() {
  local name pid i stopped=0
  for name in slurmd slurmctld slurmdbd mariadb munged; do
    [ -s "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    if kill "$pid" 2>/dev/null; then
      for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
      stopped=$((stopped + 1))
    fi
    rm -f "$STATE/$name.pid"
  done
  [ "${1:-}" = quiet ] || say "stopped $stopped daemon(s)"
}

status() {
  local name
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if pid_alive "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"
    elif [ -e "$STATE/$name.pid" ]; then echo "$name: dead (stale pid file)"
    fi
  done
  if cluster_up; then sinfo; squeue; else echo "cluster: not up (bash $0 start)"; return 1; fi
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop_daemons ;;
  status) status ;;
  logs) tail -n "${2:-40}" "$STATE"/log/* ;;
  *) echo "usage: $0 install|start|stop|status|logs [lines]" >&2; exit 2 ;;
esac
