#!/usr/bin/env bash
# Exit 0 if the control plane from up.sh is running and kube-apiserver is ready.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
RUN="$TESTENV_RUN"

[[ -f "$RUN/env" ]] || { echo "not up: no $RUN/env"; exit 1; }
for name in "${TESTENV_BINARIES[@]}"; do
  pid="$(cat "$RUN/pids/$name.pid" 2>/dev/null || true)"
  testenv_pid_alive "$pid" || { echo "not up: $name is not running"; exit 1; }
done
# shellcheck disable=SC1091
source "$RUN/env"
ready="$(curl -sf --max-time 5 --cacert "$CNIMIG_TESTENV_CA" --cert "$CNIMIG_TESTENV_CLIENT_CERT" \
  --key "$CNIMIG_TESTENV_CLIENT_KEY" "$CNIMIG_TESTENV_APISERVER/readyz" || true)"
[[ "$ready" == ok ]] || { echo "not up: $CNIMIG_TESTENV_APISERVER/readyz not ok"; exit 1; }
echo "up: $CNIMIG_TESTENV_APISERVER (run dir $RUN, pids $CNIMIG_TESTENV_PIDS)"
