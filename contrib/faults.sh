#!/usr/bin/env bash
# The full fault campaign: the stories of tests/tests/faults.rs with many trials each
# (CSTOR_FAULTS=full: at least 30 kills of cstor, 20 races per kind of podman command, a
# sweep of how full the disk is), one story at a time. CI runs the same stories with a few
# trials each. Needs root, podman, skopeo, a rootless test user (created if missing), tmpfs.
#
#   contrib/faults.sh                        the full campaign
#   CSTOR_FAULTS=short contrib/faults.sh     what CI runs
#   CSTOR_FAULTS_TRIALS=5 contrib/faults.sh  five trials of every story
#   CSTOR_FAULTS_SEED=N contrib/faults.sh    replays the random moments of an earlier run
#   contrib/faults.sh rootless               only the stories whose names contain "rootless"
#
# Prints each story's counts (trials per kind, outcomes) at the end, and the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
export CSTOR_FAULTS="${CSTOR_FAULTS:-full}"
export CSTOR_TEST_NO_SKIP="${CSTOR_TEST_NO_SKIP:-1}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
log=$(mktemp /tmp/cstor-faults.XXXXXX.log)
echo "== building cstor and cstor-helper"
cargo build --locked -p cstor-cli -p cstor-helper
start=$(date +%s)
echo "== fault campaign ($CSTOR_FAULTS), log in $log"
set +e
cargo test --locked -p cstor-tests --test faults -- --test-threads=1 --nocapture "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo
echo "== fault campaign ($CSTOR_FAULTS): exit status $status after $(( $(date +%s) - start )) s"
echo "-- counts (outcome=trials):"
grep -o 'FAULTS .*' "$log" | sed 's/^FAULTS /  /' || echo "  (none: no story finished)"
echo "-- seeds (set CSTOR_FAULTS_SEED to replay one):"
grep -o '[a-z_]*: CSTOR_FAULTS_SEED=[0-9]*' "$log" | sed 's/^/  /' || true
exit "$status"
