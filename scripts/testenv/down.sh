#!/usr/bin/env bash
# Stop the control plane started by up.sh (by pid files). Idempotent.
# Logs, certs and the audit log stay in the run dir for inspection;
# set CNIMIG_TESTENV_CLEAN=1 to delete the run dir's generated content too.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
RUN="$TESTENV_RUN"

# Only signal a pid if it still runs the binary we started (guards against pid reuse).
ours() {
  local pid="$1" name="$2" exe
  testenv_pid_alive "$pid" || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ "${exe##*/}" == "$name" || "${exe##*/}" == "$name (deleted)" ]]
}

stopped=0
# reverse start order
for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pidfile="$RUN/pids/$name.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if ours "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do   # up to 10s
      ours "$pid" "$name" || break
      sleep 0.1
    done
    if ours "$pid" "$name"; then
      testenv_log "$name (pid $pid) did not exit after SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    testenv_log "stopped $name (pid $pid)"
    stopped=$((stopped + 1))
  fi
  rm -f "$pidfile"
done
rm -f "$RUN/env"

if [[ "${CNIMIG_TESTENV_CLEAN:-0}" == 1 ]]; then
  rm -rf "$RUN/etcd-data" "$RUN/pki" "$RUN/logs" "$RUN/pids" "$RUN/audit.log" \
    "$RUN"/*.kubeconfig "$RUN/audit-policy.yaml" "$RUN/flexvolume"
  rmdir "$RUN" 2>/dev/null || true
fi
testenv_log "down ($stopped process(es) stopped, run dir $RUN)"
