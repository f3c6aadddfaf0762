#!/usr/bin/env bash
# Brings up a real single-node SLURM on localhost (Debian's slurmctld + slurmd + munge) for tests
# and demos: one partition, the node at 127.0.0.1, no cgroups, optional fake GPUs.
# Recipe: ../shared/reference/local-slurm.md. Needs root and the packages from
# scripts/install-system-deps.sh. Idempotent: a second run checks, restarts only what changed,
# and returns within a second or two.
#
# Usage: scripts/start-local-slurm.sh [--cpus N] [--gpus N] [--partition NAME] [--state-dir DIR]
#                                     [--cold] [--no-smoke] [--timeout S]
#   --cpus N        CPUs to declare (default: what slurmd -C finds). More than the machine has is
#                   fine (oversubscription): N one-CPU worker jobs then run at once.
#   --gpus N        declare N fake GPUs (char devices that nothing opens; SLURM does the real GPU
#                   accounting and sets CUDA_VISIBLE_DEVICES per job). 0 (default) declares none.
#   --partition P   partition name (default debug)
#   --state-dir D   state, spool, logs, pid files (default /var/spool/local-slurm)
#   --cold          cancel everything and wipe SLURM's saved state before starting
#   --no-smoke      skip the srun/sbatch smoke test at the end
# Stop with scripts/stop-local-slurm.sh.
set -euo pipefail

CPUS="" GPUS=0 PARTITION=debug STATE=/var/spool/local-slurm COLD=0 SMOKE=1 TIMEOUT=60
while [ $# -gt 0 ]; do
  case "$1" in
    --cpus) CPUS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --partition) PARTITION=$2; shift 2 ;;
    --state-dir) STATE=$2; shift 2 ;;
    --cold) COLD=1; shift ;;
    --no-smoke) SMOKE=0; shift ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "start-local-slurm: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "start-local-slurm: $*"; }
die() { echo "start-local-slurm: error: $*" >&2; exit 1; }
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus wants a number, not '$GPUS'"
[ -z "$CPUS" ] || [[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus wants a positive number, not '$CPUS'"
[ "$(id -u)" -eq 0 ] || die "needs root (it starts slurmctld, slurmd and munged)"
for exe in slurmctld slurmd munged scontrol sinfo srun sbatch squeue scancel; do
  command -v "$exe" >/dev/null || die "$exe is missing: run scripts/install-system-deps.sh"
done

T0=$(date +%s.%N)
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES=$CONF_DIR/gres.conf
MARKER="# local-slurm: written by cryodask scripts/start-local-slurm.sh"
export SLURM_CONF=$CONF
mkdir -p "$STATE"/{ctld,d,log,run,dev} "$CONF_DIR"

elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# wait until a pid file's process is gone (SIGTERM first, SIGKILL after 10 s)
stop_pidfile() {
  local f=$1 pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------------------------------------
# 1. munge: reuse a working munged, else start our own (as the munge user, like Debian's unit)
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  :
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge "$STATE/run/munge"
  chown munge:munge /etc/munge/munge.key /etc/munge /var/lib/munge /var/log/munge /run/munge "$STATE/run/munge"
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  # --force takes over the stale socket or lock that a killed munged leaves behind
  runuser -u munge -- munged --force --pid-file="$STATE/run/munge/munged.pid"
  touch "$STATE/run/munge.ours"  # stop-local-slurm.sh stops only a munged it started
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not work (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------------------------------------
# 2. slurm.conf (and gres.conf): rewritten every run; daemons restart only when it changed
topo=$(slurmd -C | head -1)
get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$topo"; }
MEM=$(get RealMemory)
if [ -n "$CPUS" ]; then
  NODE_TOPO="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
  NCPU=$CPUS
else
  NCPU=$(get CPUs)
  NODE_TOPO="CPUs=$NCPU Boards=$(get Boards) SocketsPerBoard=$(get SocketsPerBoard) CoresPerSocket=$(get CoresPerSocket) ThreadsPerCore=$(get ThreadsPerCore)"
fi
# a job without --mem must not get the whole node's memory (CR_Core_Memory)
DEFMEM=$(( MEM / NCPU )); [ "$DEFMEM" -ge 100 ] || DEFMEM=100
NODE_GRES="" GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then
  NODE_GRES="Gres=gpu:$GPUS"
  GRES_TYPES="GresTypes=gpu"
fi

new_conf=$(cat <<EOF
$MARKER
ClusterName=localslurm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=30
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$GRES_TYPES
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_TOPO RealMemory=$MEM $NODE_GRES State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
new_gres=""
if [ "$GPUS" -gt 0 ]; then
  # fake GPUs: char devices with NVIDIA's major number (195) that nothing ever opens; SLURM
  # ignores plain files ("not a valid character or block device") and then sets no CUDA_VISIBLE_DEVICES
  new_gres="$MARKER"
  for i in $(seq 0 $((GPUS - 1))); do
    dev="$STATE/dev/fakegpu$i"
    [ -c "$dev" ] || { rm -f "$dev"; mknod "$dev" c 195 "$i" || die "mknod $dev failed (fake GPUs need device nodes)"; }
    new_gres+=$'\n'"NodeName=$HOST Name=gpu File=$dev"
  done
fi

backup_foreign() {  # a file we did not write is kept as .bak.<time>
  if [ -e "$1" ] && ! grep -qF "$MARKER" "$1"; then
    mv "$1" "$1.bak.$(date +%Y%m%d%H%M%S)"
    say "moved the existing $1 aside to $1.bak.*"
  fi
}
changed=0
backup_foreign "$CONF"
if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  changed=1
fi
backup_foreign "$GRES"
if [ -n "$new_gres" ]; then
  if [ "$(cat "$GRES" 2>/dev/null)" != "$new_gres" ]; then
    printf '%s\n' "$new_gres" > "$GRES.tmp" && mv "$GRES.tmp" "$GRES"
    changed=1
  fi
elif [ -e "$GRES" ]; then
  rm -f "$GRES"
  changed=1
fi

# ---------------------------------------------------------------------------------------------
# 3. daemons: slurmctld first (wait for `scontrol ping` UP), then slurmd
ctld_up() { alive "$STATE/run/slurmctld.pid"; }
d_up() { alive "$STATE/run/slurmd.pid"; }
clear_state=$changed  # saved node and job state from another configuration is not carried over
if [ "$COLD" -eq 1 ] || { [ "$changed" -eq 1 ] && { ctld_up || d_up; }; }; then
  # jobs first: their slurmstepd outlives slurmd
  if ctld_up; then scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true; fi
  stop_pidfile "$STATE/run/slurmd.pid"
  stop_pidfile "$STATE/run/slurmctld.pid"
  clear_state=1
  say "configuration changed (or --cold): restarting the daemons with fresh state"
fi
if [ "$COLD" -eq 1 ]; then
  rm -rf "${STATE:?}/ctld/"* "${STATE:?}/d/"*
fi

if ! ctld_up; then
  rm -f "$STATE/run/slurmctld.pid"
  if [ "$clear_state" -eq 1 ]; then slurmctld -c -i; else slurmctld -i; fi
fi
for i in $(seq $((TIMEOUT * 5))); do
  scontrol ping 2>/dev/null | grep -q "is UP" && break
  sleep 0.2
done
scontrol ping 2>/dev/null | grep -q "is UP" \
  || { tail -n 20 "$STATE/log/slurmctld.log" >&2 || true; die "slurmctld did not come up (log above: $STATE/log/slurmctld.log)"; }

if ! d_up; then
  rm -f "$STATE/run/slurmd.pid"
  slurmd -N "$HOST"
fi

# ---------------------------------------------------------------------------------------------
# 4. wait for the node to be usable; a down or drained node gets one RESUME
resumed=0 state=""
for i in $(seq $((TIMEOUT * 5))); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 | tr -d '*~#!%$@^-')
  case "$state" in
    idle|mix|mixed|alloc|allocated|comp|completing) break ;;
    down|drain|drained|draining|drng|fail|failing)
      if [ "$resumed" -eq 0 ]; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
        resumed=1
      fi ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mix|mixed|alloc|allocated|comp|completing) ;;
  *) tail -n 20 "$STATE/log/slurmd.log" >&2 || true
     die "node $HOST is '$state', not idle (log above: $STATE/log/slurmd.log)" ;;
esac

# ---------------------------------------------------------------------------------------------
# 5. smoke test: srun, then one batch job (when it returns, batch jobs are being scheduled);
#    skipped while the node runs jobs, so that a second bring-up never waits behind them
if [ "$SMOKE" -eq 1 ] && [ -z "$(squeue -h -o %i 2>/dev/null)" ]; then
  out=$(timeout "$TIMEOUT" srun -N1 -n1 -t 1 hostname 2>&1) || die "srun hostname failed: $out"
  [ "$out" = "$HOST" ] || die "srun hostname printed '$out', expected '$HOST'"
  # no -Q: it hides the job id too
  jid=$(sbatch --parsable -t 1 -o /dev/null -e /dev/null --wrap true 2>&1) || die "sbatch failed: $jid"
  [[ "$jid" =~ ^[0-9]+ ]] || die "sbatch printed '$jid', not a job id"
  jid=${jid%%;*}
  st=""
  for i in $(seq $((TIMEOUT * 5))); do
    st=$(scontrol -o show job "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$st" in COMPLETED|"") break ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.2
  done
  case "$st" in
    COMPLETED|"") ;;
    *) scancel "$jid" 2>/dev/null || true; die "the smoke batch job $jid ended as '$st'" ;;
  esac
fi

say "up in $(elapsed) s: node $HOST, partition $PARTITION, $NCPU CPUs, $GPUS fake GPUs (SLURM_CONF=$CONF, state in $STATE)"
