#!/usr/bin/env bash
# Tears down the single-node SLURM that scripts/start-local-slurm.sh brought up: cancels every job
# (their slurmstepd outlives slurmd), then stops slurmd, slurmctld and - only if that script
# started it - munged. Idempotent: stopping a stopped SLURM is a no-op.
#
# Usage: scripts/stop-local-slurm.sh [--state-dir DIR] [--wipe]
#   --state-dir D   as given to start-local-slurm.sh (default /var/spool/local-slurm)
#   --wipe          also remove the state dir and the slurm.conf / gres.conf that start wrote
set -euo pipefail

STATE=/var/spool/local-slurm WIPE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) STATE=$2; shift 2 ;;
    --wipe) WIPE=1; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop-local-slurm: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "stop-local-slurm: error: needs root" >&2; exit 1; }
T0=$(date +%s.%N)
MARKER="# local-slurm: written by cryodask scripts/start-local-slurm.sh"
export SLURM_CONF=/etc/slurm/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
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

# 1. jobs first, and wait (up to 15 s) for them to leave the queue
if alive "$STATE/run/slurmctld.pid"; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --full $jobs 2>/dev/null || true
    for i in $(seq 75); do
      [ -z "$(squeue -h -t R,CG,PD -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. daemons: slurmd, then slurmctld, then our own munged
stop_pidfile "$STATE/run/slurmd.pid"
stop_pidfile "$STATE/run/slurmctld.pid"
if [ -e "$STATE/run/munge.ours" ]; then
  stop_pidfile "$STATE/run/munge/munged.pid"
  rm -f "$STATE/run/munge.ours"
fi

if [ "$WIPE" -eq 1 ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -e "$f" ] && grep -qF "$MARKER" "$f"; then rm -f "$f"; fi
  done
  rm -rf "${STATE:?}"
fi
echo "stop-local-slurm: stopped in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
