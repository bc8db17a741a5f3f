#!/usr/bin/env bash
# Start a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) on 127.0.0.1, in the background.
#
#   scripts/testenv/up.sh && source "${CNIMIG_TESTENV_RUN:-/tmp/cnimig-testenv}/env"
#
# Environment:
#   CNIMIG_TESTENV_RUN      run dir (default /tmp/cnimig-testenv)
#   CNIMIG_TESTENV_PORT     kube-apiserver port (default 6443 if free, else a free port)
#   CNIMIG_TESTENV_TIMEOUT  seconds to wait for readiness (default 180)
#   CNIMIG_TESTENV_KEEP_ON_FAILURE=1  leave processes running if startup fails
#   CNIMIG_TESTENV_CACHE    binary cache (see build.sh)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

RUN="$TESTENV_RUN"
TIMEOUT="${CNIMIG_TESTENV_TIMEOUT:-180}"

# ---------------------------------------------------------------------------
# Already up?
# ---------------------------------------------------------------------------
if [[ -f "$RUN/env" ]] && "$HERE/status.sh" >/dev/null 2>&1; then
  testenv_log "already up (run dir $RUN); source $RUN/env"
  exit 0
fi

"$HERE/build.sh" >/dev/null

# Clean up leftovers of a previous (possibly crashed) run.
"$HERE/down.sh" >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------
declare -A TAKEN=()
port_in_use() {
  local hex
  hex="$(printf '%04X' "$1")"
  # state 0A == LISTEN; local address is column 2 ("IP:PORT" in hex)
  awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
pick_port() {   # pick_port [preferred]
  local p="${1:-}"
  if [[ -n "$p" ]] && [[ -z "${TAKEN[$p]:-}" ]] && ! port_in_use "$p"; then
    TAKEN[$p]=1; echo "$p"; return
  fi
  local _
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if [[ -z "${TAKEN[$p]:-}" ]] && ! port_in_use "$p"; then
      TAKEN[$p]=1; echo "$p"; return
    fi
  done
  testenv_die "could not find a free port"
}

if [[ -n "${CNIMIG_TESTENV_PORT:-}" ]]; then
  port_in_use "$CNIMIG_TESTENV_PORT" && testenv_die "CNIMIG_TESTENV_PORT=$CNIMIG_TESTENV_PORT is already in use"
  API_PORT="$CNIMIG_TESTENV_PORT"; TAKEN[$API_PORT]=1
else
  API_PORT="$(pick_port 6443)"; TAKEN[$API_PORT]=1
fi
ETCD_PORT="$(pick_port)"; TAKEN[$ETCD_PORT]=1
ETCD_PEER_PORT="$(pick_port)"; TAKEN[$ETCD_PEER_PORT]=1
KCM_PORT="$(pick_port)"; TAKEN[$KCM_PORT]=1
SCHED_PORT="$(pick_port)"; TAKEN[$SCHED_PORT]=1
API_URL="https://127.0.0.1:$API_PORT"

mkdir -p "$RUN"
RUN="$(cd "$RUN" && pwd)"
rm -rf "$RUN/etcd-data" "$RUN/pki" "$RUN/logs" "$RUN/pids" "$RUN/audit.log" \
  "$RUN/env" "$RUN"/*.kubeconfig "$RUN/audit-policy.yaml" "$RUN/flexvolume"
mkdir -p "$RUN/pki" "$RUN/logs" "$RUN/pids"
chmod 700 "$RUN/pki"

# ---------------------------------------------------------------------------
# PKI (openssl)
# ---------------------------------------------------------------------------
PKI="$RUN/pki"
testenv_log "generating certificates in $PKI"
ossl() { openssl "$@" 2>>"$PKI/openssl.log" || { cat "$PKI/openssl.log" >&2; testenv_die "openssl $1 failed"; }; }

ossl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
  -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=cnimig-testenv-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"

# sign_cert NAME SUBJECT EXTENSIONS
sign_cert() {
  local name="$1" subj="$2" ext="$3"
  ossl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj"
  printf '%s\n' "$ext" >"$PKI/$name.ext"
  ossl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt"
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
CLIENT_EXT=$'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
sign_cert apiserver "/CN=kube-apiserver" \
  $'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local'
sign_cert admin "/O=system:masters/CN=kubernetes-admin" "$CLIENT_EXT"
sign_cert controller-manager "/CN=system:kube-controller-manager" "$CLIENT_EXT"
sign_cert scheduler "/CN=system:kube-scheduler" "$CLIENT_EXT"
# Separate front-proxy (request-header) CA: kube-apiserver publishes it in
# kube-system/extension-apiserver-authentication, which the controller-manager
# and scheduler read for their delegated authentication.
ossl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
  -keyout "$PKI/front-proxy-ca.key" -out "$PKI/front-proxy-ca.crt" -subj "/CN=cnimig-testenv-front-proxy-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
ossl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$PKI/front-proxy-client.key" \
  -out "$PKI/front-proxy-client.csr" -subj "/CN=front-proxy-client"
printf '%s\n' "$CLIENT_EXT" >"$PKI/front-proxy-client.ext"
ossl x509 -req -in "$PKI/front-proxy-client.csr" -CA "$PKI/front-proxy-ca.crt" -CAkey "$PKI/front-proxy-ca.key" \
  -CAcreateserial -days 3650 -sha256 -extfile "$PKI/front-proxy-client.ext" -out "$PKI/front-proxy-client.crt"
rm -f "$PKI/front-proxy-client.csr" "$PKI/front-proxy-client.ext"
# service-account token signing key pair
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key"
ossl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"

# write_kubeconfig FILE CERTNAME USER
write_kubeconfig() {
  local file="$1" cert="$2" user="$3"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: cnimig-testenv
  cluster:
    server: $API_URL
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$cert.crt")
    client-key-data: $(base64 -w0 <"$PKI/$cert.key")
contexts:
- name: cnimig-testenv
  context:
    cluster: cnimig-testenv
    user: $user
    namespace: default
current-context: cnimig-testenv
EOF
  chmod 600 "$file"
}
write_kubeconfig "$RUN/admin.kubeconfig" admin kubernetes-admin
write_kubeconfig "$RUN/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
write_kubeconfig "$RUN/scheduler.kubeconfig" scheduler system:kube-scheduler

cat >"$RUN/audit-policy.yaml" <<'EOF'
# One event per request (ResponseComplete / Panic), with user, verb, resource.
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
EOF

# ---------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------
start_proc() {   # start_proc NAME ARGS...
  local name="$1"; shift
  local bin="$TESTENV_BIN/$name"
  printf '%q ' "$bin" "$@" >"$RUN/logs/$name.cmdline"
  echo >>"$RUN/logs/$name.cmdline"
  # setsid: own session, so the processes survive the calling shell and
  # don't get its signals; all fds redirected so callers capturing our
  # output don't hang.
  setsid "$bin" "$@" </dev/null >>"$RUN/logs/$name.log" 2>&1 &
  echo $! >"$RUN/pids/$name.pid"
  testenv_log "started $name (pid $!), log $RUN/logs/$name.log"
}

fail() {
  local msg="$1" n
  printf '\n[testenv] ERROR: %s\n' "$msg" >&2
  for n in "${TESTENV_BINARIES[@]}"; do
    [[ -f "$RUN/logs/$n.log" ]] || continue
    printf '\n===== last 40 lines of %s =====\n' "$RUN/logs/$n.log" >&2
    tail -n 40 "$RUN/logs/$n.log" >&2
  done
  if [[ "${CNIMIG_TESTENV_KEEP_ON_FAILURE:-0}" != 1 ]]; then
    "$HERE/down.sh" >&2 || true
  fi
  exit 1
}

DEADLINE=$(($(date +%s) + TIMEOUT))
check_alive() {
  local n
  for n in "$@"; do
    testenv_pid_alive "$(cat "$RUN/pids/$n.pid")" || fail "$n exited during startup"
  done
}
wait_for() {    # wait_for DESCRIPTION COMPONENTS-TO-CHECK -- COMMAND...
  local desc="$1"; shift
  local comps=()
  while [[ "$1" != "--" ]]; do comps+=("$1"); shift; done
  shift
  testenv_log "waiting for $desc"
  until "$@" >/dev/null 2>&1; do
    check_alive "${comps[@]}"
    (($(date +%s) < DEADLINE)) || fail "timed out after ${TIMEOUT}s waiting for $desc"
    sleep 0.5
  done
}
CURL_ADMIN=(curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key")

# ---------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------
start_proc etcd \
  --name=cnimig-testenv \
  --data-dir="$RUN/etcd-data" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="cnimig-testenv=http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster-state=new \
  --unsafe-no-fsync \
  --quota-backend-bytes=$((2 * 1024 * 1024 * 1024)) \
  --log-level=warn

etcd_healthy() { curl -sf --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
wait_for "etcd on 127.0.0.1:$ETCD_PORT" etcd -- etcd_healthy

# ---------------------------------------------------------------------------
# kube-apiserver
# ---------------------------------------------------------------------------
# The audit log is never rotated in a run: --audit-log-maxsize=0 is not "never" but the rotation
# library's default of 100 MB (seen: the log rotated at 104,856,250 bytes during a full test
# run), and a rotation inside a test's window leaves the tests that read the log from an offset
# (api_cost, watch, rbac) an empty window.
start_proc kube-apiserver \
  --advertise-address=127.0.0.1 \
  --bind-address=127.0.0.1 \
  --secure-port="$API_PORT" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --client-ca-file="$PKI/ca.crt" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --authorization-mode=Node,RBAC \
  --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
  --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --allow-privileged=true \
  --endpoint-reconciler-type=none \
  --audit-policy-file="$RUN/audit-policy.yaml" \
  --audit-log-path="$RUN/audit.log" \
  --audit-log-format=json \
  --audit-log-mode=blocking \
  --audit-log-maxsize=100000 \
  --profiling=false

api_ready() { "${CURL_ADMIN[@]}" "$API_URL/readyz" | grep -qx ok; }
wait_for "kube-apiserver /readyz on $API_URL" etcd kube-apiserver -- api_ready

# ---------------------------------------------------------------------------
# kube-controller-manager + kube-scheduler
# ---------------------------------------------------------------------------
start_proc kube-controller-manager \
  --kubeconfig="$RUN/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$RUN/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$RUN/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --leader-elect=false \
  --controllers='*' \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" \
  --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" \
  --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --flex-volume-plugin-dir="$RUN/flexvolume" \
  --profiling=false

start_proc kube-scheduler \
  --kubeconfig="$RUN/scheduler.kubeconfig" \
  --authentication-kubeconfig="$RUN/scheduler.kubeconfig" \
  --authorization-kubeconfig="$RUN/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHED_PORT" \
  --leader-elect=false \
  --profiling=false

healthz() { curl -sfk --max-time 3 "https://127.0.0.1:$1/healthz" | grep -qx ok; }
wait_for "kube-controller-manager /healthz on 127.0.0.1:$KCM_PORT" "${TESTENV_BINARIES[@]}" -- healthz "$KCM_PORT"
wait_for "kube-scheduler /healthz on 127.0.0.1:$SCHED_PORT" "${TESTENV_BINARIES[@]}" -- healthz "$SCHED_PORT"
default_sa() { "${CURL_ADMIN[@]}" "$API_URL/api/v1/namespaces/default/serviceaccounts/default" >/dev/null; }
wait_for "ServiceAccount default/default (serviceaccount controller)" "${TESTENV_BINARIES[@]}" -- default_sa

# ---------------------------------------------------------------------------
# env file
# ---------------------------------------------------------------------------
pid() { cat "$RUN/pids/$1.pid"; }
cat >"$RUN/env.tmp" <<EOF
# Generated by scripts/testenv/up.sh - source me.
export CNIMIG_TESTENV_RUN=$(printf '%q' "$RUN")
export KUBECONFIG=$(printf '%q' "$RUN/admin.kubeconfig")
export CNIMIG_TESTENV_APISERVER=$API_URL
export CNIMIG_TESTENV_PORT=$API_PORT
export CNIMIG_TESTENV_CA=$(printf '%q' "$PKI/ca.crt")
export CNIMIG_TESTENV_CLIENT_CERT=$(printf '%q' "$PKI/admin.crt")
export CNIMIG_TESTENV_CLIENT_KEY=$(printf '%q' "$PKI/admin.key")
export CNIMIG_TESTENV_ADMIN_USER=kubernetes-admin
export CNIMIG_TESTENV_AUDIT_LOG=$(printf '%q' "$RUN/audit.log")
export CNIMIG_TESTENV_ETCD_URL=http://127.0.0.1:$ETCD_PORT
export CNIMIG_TESTENV_ETCD_PID=$(pid etcd)
export CNIMIG_TESTENV_APISERVER_PID=$(pid kube-apiserver)
export CNIMIG_TESTENV_CONTROLLER_MANAGER_PID=$(pid kube-controller-manager)
export CNIMIG_TESTENV_SCHEDULER_PID=$(pid kube-scheduler)
export CNIMIG_TESTENV_PIDS="$(pid etcd) $(pid kube-apiserver) $(pid kube-controller-manager) $(pid kube-scheduler)"
EOF
mv "$RUN/env.tmp" "$RUN/env"

testenv_log "control plane up at $API_URL (Kubernetes $CNIMIG_K8S_VERSION, etcd $CNIMIG_ETCD_VERSION)"
testenv_log "source $RUN/env   # exports KUBECONFIG=$RUN/admin.kubeconfig"
