#!/usr/bin/env bash
# Smoke test: proves the controllers run. Brings the control plane up if it is
# not up, creates a namespace, a Deployment (2 replicas) and a
# PodDisruptionBudget (minAvailable 1) via curl, and checks that
#   - the deployment controller creates a ReplicaSet,
#   - the replicaset controller creates 2 Pods (they stay Pending: no kubelets),
#   - the disruption controller sets the PDB's status.observedGeneration.
# Tears the control plane down again if this script started it (otherwise it
# just deletes its namespace). Needs curl and jq or python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
RUN="$TESTENV_RUN"
TIMEOUT="${CNIMIG_SMOKE_TIMEOUT:-90}"

if command -v jq >/dev/null 2>&1; then
  jget() { jq -r "$1"; }     # jget JQ-EXPR  (stdin: JSON)
  JQ_RS_COUNT='.items | length'
  JQ_POD_COUNT='[.items[] | select(.metadata.ownerReferences[0].kind == "ReplicaSet")] | length'
  JQ_PDB_OBSGEN='.status.observedGeneration // 0'
elif command -v python3 >/dev/null 2>&1; then
  jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
  JQ_RS_COUNT='len(d["items"])'
  JQ_POD_COUNT='len([p for p in d["items"] if (p["metadata"].get("ownerReferences") or [{}])[0].get("kind") == "ReplicaSet"])'
  JQ_PDB_OBSGEN='d.get("status", {}).get("observedGeneration", 0)'
else
  testenv_die "smoke.sh needs jq or python3 to parse JSON"
fi

started=0
if ! "$HERE/status.sh" >/dev/null 2>&1; then
  "$HERE/up.sh"
  started=1
fi
# shellcheck disable=SC1091
source "$RUN/env"

NS="cnimig-smoke-$$"
api() {   # api METHOD PATH [JSON-BODY]
  local args=(-sS --fail-with-body --max-time 10 --cacert "$CNIMIG_TESTENV_CA"
    --cert "$CNIMIG_TESTENV_CLIENT_CERT" --key "$CNIMIG_TESTENV_CLIENT_KEY" -X "$1")
  [[ $# -ge 3 ]] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
  curl "${args[@]}" "$CNIMIG_TESTENV_APISERVER$2"
}

cleanup() {
  local rc=$?
  if ((started)); then
    "$HERE/down.sh" || true
  else
    api DELETE "/api/v1/namespaces/$NS" >/dev/null 2>&1 || true
  fi
  if ((rc == 0)); then echo "SMOKE PASSED"; else echo "SMOKE FAILED" >&2; fi
}
trap cleanup EXIT

poll() {   # poll DESCRIPTION PATH JQ-EXPR EXPECTED-MIN
  local desc="$1" path="$2" expr="$3" want="$4" got=0 deadline=$(($(date +%s) + TIMEOUT))
  while :; do
    got="$(api GET "$path" 2>/dev/null | jget "$expr" 2>/dev/null || echo 0)"
    if [[ "$got" =~ ^[0-9]+$ ]] && ((got >= want)); then
      testenv_log "ok: $desc ($got)"
      return 0
    fi
    if (($(date +%s) >= deadline)); then
      testenv_log "FAIL: $desc: got '$got', want >= $want after ${TIMEOUT}s"
      api GET "$path" >&2 || true
      for n in kube-controller-manager kube-apiserver; do
        echo "===== last 30 lines of $RUN/logs/$n.log =====" >&2
        tail -n 30 "$RUN/logs/$n.log" >&2 || true
      done
      return 1
    fi
    sleep 1
  done
}

testenv_log "creating namespace $NS, Deployment smoke (2 replicas), PDB smoke (minAvailable 1)"
api POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$NS\"}}" >/dev/null
api POST "/apis/apps/v1/namespaces/$NS/deployments" '{
  "apiVersion": "apps/v1", "kind": "Deployment",
  "metadata": {"name": "smoke"},
  "spec": {
    "replicas": 2,
    "selector": {"matchLabels": {"app": "smoke"}},
    "template": {
      "metadata": {"labels": {"app": "smoke"}},
      "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}
    }
  }
}' >/dev/null
api POST "/apis/policy/v1/namespaces/$NS/poddisruptionbudgets" '{
  "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
  "metadata": {"name": "smoke"},
  "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "smoke"}}}
}' >/dev/null

poll "ReplicaSet created by the deployment controller" \
  "/apis/apps/v1/namespaces/$NS/replicasets" "$JQ_RS_COUNT" 1
poll "Pods created by the replicaset controller" \
  "/api/v1/namespaces/$NS/pods" "$JQ_POD_COUNT" 2
poll "PDB status.observedGeneration set by the disruption controller" \
  "/apis/policy/v1/namespaces/$NS/poddisruptionbudgets/smoke" "$JQ_PDB_OBSGEN" 1
