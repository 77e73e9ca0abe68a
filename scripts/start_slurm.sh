#!/usr/bin/env bash
# Start a single-node Slurm cluster (slurmctld + slurmd + munge) on this machine, for tests.
#
#   sudo scripts/start_slurm.sh        # idempotent: returns at once when a node is already up
#
# Debian/Ubuntu only (apt), as root. Accounting is off, as on most small clusters (sacct fails;
# lib.grid_executors silences submitit's warning about it). State, spool and logs live under
# $EM_SLURM_DIR (default /tmp/em-slurm); the config is written to /etc/slurm/slurm.conf.
# Exit codes: 0 running, 3 cannot start here (not root, no apt, no Slurm packages); the reason
# is printed on one line.
set -euo pipefail
DIR=${EM_SLURM_DIR:-/tmp/em-slurm}
t0=$(date +%s)

node_up() { sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

if command -v sinfo >/dev/null 2>&1 && node_up; then
  echo "slurm: already running ($(sinfo -h -o '%P %D %T' | head -1))"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm: cannot start: needs root to install and start slurmctld/slurmd" >&2
  exit 3
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
   || ! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm: cannot start: Slurm is not installed and apt-get is not available" >&2
    exit 3
  fi
  # slurmctld + slurmd + slurm-client are what slurm-wlm pulls in, minus its docs and extras
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         slurmctld slurmd slurm-client munge >/dev/null; }; then
    echo "slurm: cannot start: apt-get install slurmctld slurmd slurm-client munge failed" >&2
    exit 3
  fi
fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
# munge: a key, then the daemon as the munge user (munged refuses to run as root)
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > /etc/slurm/slurm.conf <<EOF
# written by em-lab scripts/start_slurm.sh: one node, no accounting, no cgroups
ClusterName=emlab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 100); do node_up && break; sleep 0.2; done
if ! node_up; then
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  for _ in $(seq 50); do node_up && break; sleep 0.2; done
fi
if ! node_up; then
  echo "slurm: cannot start: node not idle after start (see $DIR/log/slurmctld.log, slurmd.log)" >&2
  exit 3
fi
echo "slurm: running ($(sinfo -h -o '%P %D %T' | head -1)), setup took $(( $(date +%s) - t0 ))s"
