#!/usr/bin/env bash
# Stop the localhost SLURM started by deploy/ci/start-slurm.sh: cancels its jobs, stops
# slurmd and slurmctld (and munged with --munge). Keeps $ASTEP_SLURM_DIR for the logs.
set -uo pipefail
DIR=${ASTEP_SLURM_DIR:-/tmp/astep-slurm}
export SLURM_CONF=$DIR/slurm.conf

pid_of() {  # pid from a pid file, only when that process is alive and is the named daemon
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null &&
    echo "$pid"
}

if [ -f "$SLURM_CONF" ] && pid_of "$DIR/slurmctld.pid" slurmctld >/dev/null; then
  scancel --quiet --partition "${ASTEP_SLURM_PARTITION:-debug}" 2>/dev/null || true
fi
pids=()
for p in slurmd slurmctld; do
  if pid=$(pid_of "$DIR/$p.pid" "$p"); then
    kill "$pid" && pids+=("$pid") && echo "stop-slurm: stopping $p ($pid)" >&2
  fi
done
if [ "${1:-}" = "--munge" ] && pid=$(pid_of /run/munge/munged.pid munged); then
  kill "$pid" && pids+=("$pid") && echo "stop-slurm: stopping munged ($pid)" >&2
fi
for _ in $(seq 100); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.1
done
exit 0
