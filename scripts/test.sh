#!/usr/bin/env bash
# The test suite, exactly as CI runs it: installs what the project needs (CRIU 4.2.1, MPICH,
# nftables), then formatting, lints with -D warnings, and every test with cargo-nextest.
# CRIU tests are mandatory when LAMCR_REQUIRE_CRIU=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="/usr/local/sbin:$PATH"
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --lib --bins --examples
cargo nextest run --locked --no-fail-fast
