#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) with libFuzzer through cargo-fuzz on the
# nightly toolchain, each for RUNS executions (default 1,000,000) or SECONDS (default 600),
# whichever comes first, starting from the committed seed corpus (fuzz/corpus/TARGET; new
# inputs are kept in fuzz/corpus-new/TARGET, not committed). Prints, per target, the
# executions done and whether it crashed; exits non-zero on a crash, whose input
# cargo-fuzz leaves in fuzz/artifacts/TARGET/.
#
#   contrib/fuzz.sh [TARGET...]        # all targets when none is named
#
# Needs: rustup's nightly toolchain and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs=${RUNS:-1000000}
seconds=${SECONDS_PER_TARGET:-600}
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo install cargo-fuzz" >&2; exit 1; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build -O >/dev/null
status=0
printf '%-18s %12s %8s  %s\n' target execs seconds result
for t in "${targets[@]}"; do
    mkdir -p "corpus-new/$t"
    log=$(mktemp)
    start=$(date +%s)
    if cargo +nightly fuzz run -O "$t" "corpus-new/$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see fuzz/artifacts/$t)"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    printf '%-18s %12s %8s  %s\n' "$t" "$execs" "$(( $(date +%s) - start ))" "$result"
    [ "$result" = ok ] || tail -n 30 "$log" >&2
    rm -f "$log"
done
exit $status
