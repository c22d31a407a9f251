#!/usr/bin/env bash
# The test command: installs dependencies, checks formatting, lints and the minimum Rust
# version Cargo.toml states (contrib/check-msrv.sh), builds, and runs every test against real
# podman storage. Needs root (private podman stores, a rootless test user, loop mounts). With
# CSTOR_TEST_NO_SKIP=1 (the default here) a test that would skip for a missing capability
# fails instead, so a green run means everything ran.
#
# Not run here, because it takes longer than the rest together: contrib/check-fresh-debian.sh,
# which builds the project on a minimal Debian 12 from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
./contrib/install-deps.sh
export CSTOR_TEST_NO_SKIP="${CSTOR_TEST_NO_SKIP:-1}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== contrib/check-msrv.sh"
./contrib/check-msrv.sh
echo "== cargo build"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${CSTOR_TEST_THREADS:-4}"
echo "== all tests passed in $(( $(date +%s) - start )) s"
