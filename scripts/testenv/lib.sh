# shellcheck shell=bash disable=SC2034
# Shared settings for the cnimig test environment scripts (sourced, not run).

# ---- pinned versions --------------------------------------------------------
# Newest v1.34.x patch served by the Go module proxy when this was written
# (`go list -m k8s.io/kubernetes@v1.34`). The staging modules (k8s.io/api, ...)
# are pinned to the matching v0.34.N automatically.
CNIMIG_K8S_VERSION="${CNIMIG_K8S_VERSION:-v1.34.4}"
# The etcd release that k8s.io/kubernetes v1.34.4 itself requires in its go.mod
# (go.etcd.io/etcd/server/v3 v3.6.4); it only needs Go >= 1.23.
CNIMIG_ETCD_VERSION="${CNIMIG_ETCD_VERSION:-v3.6.4}"

# ---- locations --------------------------------------------------------------
TESTENV_CACHE="${CNIMIG_TESTENV_CACHE:-$HOME/.cache/cnimig/testenv}"
TESTENV_VDIR="$TESTENV_CACHE/$CNIMIG_K8S_VERSION"
TESTENV_BIN="$TESTENV_VDIR/bin"
TESTENV_RUN="${CNIMIG_TESTENV_RUN:-/tmp/cnimig-testenv}"
TESTENV_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)

testenv_log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
testenv_die() { printf '[testenv] ERROR: %s\n' "$*" >&2; exit 1; }

testenv_find_go() {
  if [[ -n "${GO:-}" ]]; then :
  elif command -v go >/dev/null 2>&1; then GO="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
  else testenv_die "no Go toolchain found (set GO=/path/to/go)"; fi
  export GO
}

testenv_binaries_present() {
  local b
  for b in "${TESTENV_BINARIES[@]}"; do
    [[ -x "$TESTENV_BIN/$b" ]] || return 1
  done
  [[ -f "$TESTENV_BIN/.complete" ]]
}

# Is the process with this pid alive (and not a zombie)?
testenv_pid_alive() {
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  local state
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ "$state" != "Z" ]]
}
