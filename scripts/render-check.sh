#!/usr/bin/env bash
# Renders the migration timeline SVG with headless Chromium and checks the picture
# (tests/timeline.rs): installs Chromium from Debian's packages when it is missing, then runs
# the timeline tests with CNIMIG_REQUIRE_CHROMIUM=1 so that a missing browser fails instead of
# skipping. The rendered PNG is left in target/tmp/timeline/timeline.png for a person to look at.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-deps.sh

echo "==> rendering the timeline"
CNIMIG_REQUIRE_CHROMIUM=1 cargo test --release --test timeline -- --nocapture
