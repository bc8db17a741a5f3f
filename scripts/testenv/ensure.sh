# Sourced (not run) by scripts/test-all.sh and scripts/test-kube.sh from the repository root:
# brings the test control plane up unless one already answers (building it first if needed),
# stops it on exit only if this script started it, and exports its environment (KUBECONFIG,
# CNIMIG_TESTENV_*). CNIMIG_TESTENV_RUN picks the run folder (default /tmp/cnimig-testenv).
RUN="${CNIMIG_TESTENV_RUN:-/tmp/cnimig-testenv}"
cnimig_testenv_started=0
if ! scripts/testenv/status.sh >/dev/null 2>&1; then
  scripts/testenv/up.sh
  cnimig_testenv_started=1
fi
cnimig_testenv_cleanup() { if [ "$cnimig_testenv_started" = 1 ]; then scripts/testenv/down.sh; fi; }
trap cnimig_testenv_cleanup EXIT
# shellcheck disable=SC1091
. "$RUN/env"
