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
echo "== upstream cfsctl 0.9.4 (what the ostree tests compare with)"
# The tests compare our ostree imports with upstream's own importer. Installed once under
# target/ (several minutes on two cores), reused by later runs; an existing one is used as is.
if [ -z "${CSTOR_CFSCTL:-}" ]; then
    cfsctl_root="$PWD/target/upstream-cfsctl-0.9.4"
    if [ ! -x "$cfsctl_root/bin/cfsctl" ]; then
        cargo install --locked --quiet composefs-ctl --version 0.9.4 --root "$cfsctl_root"
    fi
    export CSTOR_CFSCTL="$cfsctl_root/bin/cfsctl"
fi
"$CSTOR_CFSCTL" --version
echo "== cargo build"
cargo build --workspace --bins --locked
echo "== cargo test"
# A hung test must not eat the whole CI budget in silence: after CSTOR_TEST_LIMIT_MIN minutes
# the tests are stopped, and the processes still running are listed first (state, and the
# kernel function each waits in), so the log says where they hung.
limit=$(( ${CSTOR_TEST_LIMIT_MIN:-55} * 60 ))
watch_tests() {
    local pid=$1 waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if (( waited >= limit )); then
            echo "== cargo test still runs after $(( limit / 60 )) min: stopping it. Running now:"
            ps -eo pid,ppid,pgid,stat,etime,wchan:32,args --forest || true
            kill -TERM -- "-$pid" 2>/dev/null || true
            sleep 20
            kill -KILL -- "-$pid" 2>/dev/null || true
            return
        fi
        sleep 5
        waited=$(( waited + 5 ))
    done
}
# In a process group of its own (setsid), so that stopping it reaches the test binaries.
setsid cargo test --workspace --locked --no-fail-fast -- --test-threads="${CSTOR_TEST_THREADS:-4}" &
tests=$!
watch_tests "$tests" &
watchdog=$!
rc=0
wait "$tests" || rc=$?
wait "$watchdog" || true
if (( rc != 0 )); then
    echo "== cargo test failed (exit status $rc)"
    exit "$rc"
fi
echo "== all tests passed in $(( $(date +%s) - start )) s"
