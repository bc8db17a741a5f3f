#!/usr/bin/env bash
# Every check and every test, from a fresh machine: the one command the README gives for tests,
# and what CI (.ci/run) runs.
#
#   CNIMIG_CASES=N      random clusters in the property tests (default 2000)
#   CNIMIG_SEED=S       replay one property-test case
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup (https://rustup.rs) and re-run" >&2; exit 1; }
cargo --version
rustup component list --installed 2>/dev/null | grep -qE '^(rustfmt|clippy)' || rustup component add rustfmt clippy

step "system packages"
./scripts/install-deps.sh
# The timeline test renders with Chromium: with it installed, a failed render fails the run.
export CNIMIG_REQUIRE_CHROMIUM=1

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "tests (release: the property tests simulate thousands of clusters)"
cargo test --workspace --release --locked
