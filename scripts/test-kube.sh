#!/usr/bin/env bash
# cnimig-kube's integration tests against a real control plane: starts scripts/testenv (builds
# it first if needed), runs the tests with CNIMIG_REQUIRE_TESTENV=1 (a missing control plane
# fails instead of skipping), and stops the control plane on exit.
#
#   scripts/test-kube.sh [extra cargo test args, e.g. -- eviction]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=testenv/ensure.sh
. scripts/testenv/ensure.sh
CNIMIG_REQUIRE_TESTENV=1 cargo test -p cnimig-kube --release "$@"
# cnimig-rancher's control-plane tests (RKE1/RKE2-shaped migrations), unless a filter was given.
if [ "$#" -eq 0 ]; then
  CNIMIG_REQUIRE_TESTENV=1 cargo test -p cnimig-rancher --release --test rancher
fi
