#!/usr/bin/env bash
# cstor-proxy scaling series: cstor import against upstream cfsctl on synthetic images of
# 50k to 1M files per layer and 1 to 500 layers (cstor-bench-gen, no network), on ext4 and
# XFS; wall time and peak RSS of each process. Run as root: bench/scale.sh; the table and
# the curves come from bench/scale_report.py. Read bench/README.md ("Scaling series").
set -Eeuo pipefail
shopt -s nullglob

export LC_ALL=C.UTF-8 RUST_BACKTRACE=0
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
unset CSTOR_HELPER

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(cd "$BENCH_DIR/.." && pwd)

# ---- settings (environment) ---------------------------------------------------------------
CACHE=${BENCH_CACHE:-/var/cache/cstor-bench}
ALL_POINTS="50000x1 100000x1 400000x1 1000000x1 2000x50 2000x500"
POINTS=${SCALE_POINTS:-$ALL_POINTS}
FSES=${SCALE_FS:-ext4 xfs}
RUNS=${SCALE_RUNS:-1}
CASES=${SCALE_CASES:-.}                  # extended regex on case names
TIMEOUT=${SCALE_TIMEOUT:-1800}           # seconds per import
KEEP_MAX=${SCALE_KEEP_MAX_FILES:-500000} # images of larger points are removed after use
PREWARM=${SCALE_PREWARM:-2}              # reads of the image's files before each timed import
BUILD=${SCALE_BUILD:-1}
XFS_SIZE=${SCALE_XFS_SIZE:-40G}
LOOP_DIRECT_IO=${BENCH_LOOP_DIRECT_IO:-on}
USER_NAME=${BENCH_USER:-cstorbench}
CFSCTL_VERSION=0.9.4
CFSCTL_ROOT=${BENCH_CFSCTL_ROOT:-$CACHE/cfsctl}
CFSCTL=$CFSCTL_ROOT/bin/cfsctl
OUT=${SCALE_OUT:-$CACHE/results/scale-$(date +%Y%m%d-%H%M%S)}

LOOP_IMG=$CACHE/scale-xfs.img # the series' own XFS image (sparse), mounted on $MNT
MNT=$CACHE/scale-xfs
SE=$CACHE/scale-ext4          # the ext4 side: a directory of the cache's filesystem
BIN=$CACHE/scale-bin
GEN=$CACHE/scale-gen          # generated OCI layouts, removed once loaded
RUN_ROOT=/run/cstor-bench/scale

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
[[ ${BENCH_DEBUG:-0} == 1 ]] && set -x

[[ $(id -u) == 0 ]] || die "run me as root (sudo $0)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "SCALE_RUNS must be a positive integer, not '$RUNS'"
[[ $PREWARM =~ ^[0-9]+$ ]] || die "SCALE_PREWARM must be a number of reads, not '$PREWARM'"
for p in $POINTS; do [[ $p =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "SCALE_POINTS: FILESxLAYERS, not '$p'"; done
for f in $FSES; do [[ $f == ext4 || $f == xfs ]] || die "SCALE_FS: ext4 and/or xfs, not '$f'"; done

# ---- cleanup of what this run created -----------------------------------------------------
cleanup() {
    local rc=$?
    trap - ERR
    set +e
    rm -rf "$SE/scratch" "$GEN"
    if [[ -n $CREATED_MOUNT ]]; then
        rm -rf "$CREATED_MOUNT/scratch"
        log "unmounting $CREATED_MOUNT"
        podman --root "$MNT/storage" --runroot "$RUN_ROOT/xfs" --storage-driver overlay umount --all >/dev/null 2>&1
        # skopeo leaves <graphroot>/overlay bind-mounted onto itself.
        findmnt -Rrno TARGET "$CREATED_MOUNT" 2>/dev/null | tac | while read -r t; do
            umount "$t" 2>/dev/null || umount -l "$t"
        done
        mountpoint -q "$CREATED_MOUNT" && umount -l "$CREATED_MOUNT"
    fi
    detach_created_loop
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---- setup ------------------------------------------------------------------------------------
build_binaries() {
    # The source the binaries are built from, taken now: commits made while the series runs
    # must not be credited with its results.
    BUILT_COMMIT=$(git -C "$SRC_DIR" rev-parse HEAD 2>/dev/null || echo unknown)
    BUILT_DIRTY=$(git -C "$SRC_DIR" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo true || echo false)
    if [[ $BUILD == 1 ]]; then
        log "building (cargo build --release -p cstor-cli -p cstor-helper -p cstor-bench)"
        (cd "$SRC_DIR" && cargo build --release --quiet -p cstor-cli -p cstor-helper -p cstor-bench)
    fi
    local t=$SRC_DIR/target/release b
    rm -rf "$BIN"
    mkdir -p "$BIN"
    for b in cstor cstor-helper cstor-bench-gen cstor-bench-read; do
        [[ -x $t/$b ]] || die "$t/$b is missing: build with cargo build --release -p cstor-cli -p cstor-helper -p cstor-bench"
        cp "$t/$b" "$BIN/"
    done
    chmod 755 "$BIN" "$BIN"/*
}

# storage of a filesystem: sets G (graph root), R (run root), SCRATCH (repositories), MARKS
storage_of() {
    case $1 in
    ext4) G=$SE/storage R=$RUN_ROOT/ext4 SCRATCH=$SE/scratch MARKS=$SE/markers ;;
    xfs) G=$MNT/storage R=$RUN_ROOT/xfs SCRATCH=$MNT/scratch MARKS=$MNT/markers ;;
    esac
    P=(podman --root "$G" --runroot "$R" --storage-driver overlay)
}

free_kib() { df --output=avail -k "$1" | tail -1 | tr -d ' '; }

# Removes a point's cached image from both storages.
drop_image() { # name
    local fs
    for fs in $FSES; do
        storage_of "$fs"
        [[ -e $MARKS/$1 ]] || continue
        log "removing the cached image $1 ($fs)"
        "${P[@]}" rmi --force --ignore "localhost/scale/$1:latest" >/dev/null 2>&1 || true
        rm -f "$MARKS/$1"
    done
    # The XFS image is sparse: give the freed blocks back to the host.
    fstrim "$MNT" 2>/dev/null || true
}

# Removes every cached image of the series but $1.
evict_images() { # keep
    local m name
    for m in "$SE"/markers/* "$MNT"/markers/*; do
        name=${m##*/}
        [[ $name == "$1" ]] || drop_image "$name"
    done
}

# Disk a point needs, in KiB, from the generator's sizes (4 KiB blocks): its OCI layout and
# skopeo's copy of it, about 3.5 KiB per file each; about 6 KiB per file in each storage
# that lacks the image; about 7 KiB per file of copies in an ext4 repository (reflinks and
# hardlinks about 1). Sets NEED_HOST and NEED_XFS (the XFS image is a sparse file of the
# host's filesystem: what it needs, the host needs too).
disk_need() { # files name
    local files=$1 name=$2 fs loads=0
    NEED_HOST=$((files * 7 / 2 + 2 * 1024 * 1024)) NEED_XFS=$((files + 1024 * 1024))
    for fs in $FSES; do
        storage_of "$fs"
        [[ $fs == ext4 ]] && NEED_HOST=$((NEED_HOST + files * 7))
        [[ -e $MARKS/$name ]] && continue
        loads=1
        NEED_HOST=$((NEED_HOST + files * 6))
        [[ $fs == xfs ]] && NEED_XFS=$((NEED_XFS + files * 19 / 2))
    done
    ((loads)) && NEED_HOST=$((NEED_HOST + files * 7 / 2))
    true
}

# Generates the point's image (cstor-bench-gen; seeded, so the same bytes every time) and
# loads it into each filesystem's storage unless the storage has it from the same generator
# (the marker holds the generator's manifest digest).
ensure_point() { # files layers name
    local files=$1 layers=$2 name=$3 layout=$GEN/$3 fs need=()
    rm -rf "$GEN"
    mkdir -p "$GEN" "$OUT/points"
    local t0=$EPOCHREALTIME
    "$BIN/cstor-bench-gen" --files "$files" --layers "$layers" "$layout" >"$OUT/points/$name.gen.json" ||
        die "cstor-bench-gen failed"
    local gen_s manifest
    gen_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
    manifest=$(jq -r .manifest "$OUT/points/$name.gen.json")
    for fs in $FSES; do
        storage_of "$fs"
        mkdir -p "$G" "$R" "$MARKS"
        if [[ $(cat "$MARKS/$name" 2>/dev/null) == "$manifest" ]] &&
            "${P[@]}" image exists "localhost/scale/$name:latest"; then
            continue
        fi
        need+=("$fs")
    done
    local load_s=()
    for fs in "${need[@]}"; do
        storage_of "$fs"
        log "loading $name into the $fs storage ($files files x $layers layers)"
        rm -f "$MARKS/$name"
        "${P[@]}" rmi --force --ignore "localhost/scale/$name:latest" >/dev/null 2>&1 || true
        t0=$EPOCHREALTIME
        skopeo copy --quiet "oci:$layout" "containers-storage:[overlay@$G+$R]localhost/scale/$name:latest" ||
            die "skopeo copy of $name into $G failed"
        load_s+=("$fs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')")
        "${P[@]}" images >/dev/null 2>&1 || true # drops skopeo's bind mount
        # Written back before anything is timed: an import right after a load competed with
        # the writeback of the image's files (on the loop-mounted XFS, 100,000 files: 3 s
        # became 9-12 s).
        sync -f "$G"
        printf '%s\n' "$manifest" >"$MARKS/$name"
    done
    rm -rf "$GEN"
    jq -cn --arg name "$name" --argjson gen "$gen_s" --arg loads "${load_s[*]}" \
        '{point: $name, generate_seconds: $gen,
          load_seconds: ($loads | split(" ") | map(select(. != "") | split("=") | {(.[0]): (.[1] | tonumber)}) | add // {})}' \
        >>"$OUT/loads.jsonl"
}

# ---- measurements -----------------------------------------------------------------------------
# The cases of a filesystem, in the order each run takes them (tools alternate).
cases_of() {
    case $1 in
    ext4) echo cstor-ext4-copy cfsctl-ext4-hardlink cstor-ext4-hardlink ;;
    xfs) echo cstor-xfs cfsctl-xfs ;;
    esac
}

kib_of_time() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1" 2>/dev/null || true; }

# One import into a fresh repository: case point-name files layers run
import_run() {
    local c=$1 name=$2 files=$3 layers=$4 run=$5 fs=${1#*-}
    fs=${fs%%-*}
    storage_of "$fs"
    local image=localhost/scale/$name:latest repo=$SCRATCH/repo dir=$OUT/runs/$name/$c.$run
    mkdir -p "$dir"
    fresh_repo root "$repo"
    local cmd
    case $c in
    cstor-*)
        local policy=()
        [[ $c == *-hardlink ]] && policy=(--copy-policy reflink-or-hardlink)
        printf '#!/bin/sh\nexec /usr/bin/time -v -o %q %q "$@"\n' "$dir/helper.time" "$BIN/cstor-helper" >"$dir/helper"
        chmod 755 "$dir/helper"
        cmd=(/usr/bin/time -v -o "$dir/main.time" "$BIN/cstor" --json import --helper "$dir/helper"
            --root "$G" --runroot "$R" --storage-driver overlay "${policy[@]}" --repo "$repo" --tag bench "$image")
        ;;
    cfsctl-*)
        cmd=(/usr/bin/time -v -o "$dir/main.time" env CONTAINERS_STORAGE_ROOT="$G" "$CFSCTL" --repo "$repo"
            oci pull --local-fetch auto "containers-storage:$image" bench)
        ;;
    esac
    # More than one read: a VM that hands page cache back to its host keeps a large image
    # only after several (a million files: 66, 21, 10 s on consecutive reads).
    local i
    for ((i = 0; i < PREWARM; i++)); do "$BIN/cstor-bench-read" "${DIFFS[@]}" >/dev/null 2>&1 || true; done
    local oom0 rc=0
    oom0=$(awk '/^oom_kill / {print $2}' /proc/vmstat)
    CASE_OUT=$dir/cmd CASE_ERR= CASE_DETAILS='{}'
    python3 "$BENCH_DIR/procpeak.py" "$dir/peak.json" timeout "$TIMEOUT" "${cmd[@]}" \
        >"$dir/cmd.out" 2>"$dir/cmd.err" || rc=$?
    [[ -s $dir/peak.json ]] || echo '{"seconds": null, "rc": null, "procs": []}' >"$dir/peak.json"
    local oom1 failure=
    oom1=$(awk '/^oom_kill / {print $2}' /proc/vmstat)
    if ((rc == 124)); then
        failure=timeout CASE_ERR="timed out after $TIMEOUT s"
    elif ((oom1 > oom0)); then
        failure=oom CASE_ERR="killed by the OOM killer (exit status $rc)"
    elif grep -qi 'no space left' "$dir/cmd.err"; then
        failure=disk CASE_ERR="out of disk: $(grep -i -m1 'no space left' "$dir/cmd.err" | cut -c1-200)"
    elif ((rc != 0)); then
        failure=error CASE_ERR="exit status $rc: $(tail -c 400 "$dir/cmd.err" | tr '\n' ' ')"
    fi
    if [[ -z $CASE_ERR ]]; then
        local images
        images=$("$CFSCTL" --repo "$repo" oci images 2>&1 || true)
        if [[ $c == cstor-* ]]; then
            if ! CASE_DETAILS=$(jq -ce '{reflinked: .objects.reflinked, copied: .objects.copied,
                    hardlinked: .objects.hardlinked, present: .objects.present, inlined: .objects.inlined,
                    reported_seconds: (.elapsed_seconds // .elapsed), erofs_tree: .erofs_tree}' "$dir/cmd.out"); then
                CASE_ERR="unreadable --json report: $(head -c 300 "$dir/cmd.out")" CASE_DETAILS='{}'
            else
                local want
                case $c in
                cstor-xfs) want='.copied == 0 and .reflinked > 0' ;;
                cstor-ext4-copy) want='.reflinked == 0 and .copied > 0' ;;
                cstor-ext4-hardlink) want='.reflinked == 0 and .hardlinked > 0' ;;
                esac
                jq -e "$want" <<<"$CASE_DETAILS" >/dev/null || CASE_ERR="expected $want: $CASE_DETAILS"
                [[ -z $CASE_ERR && $images != *bench* ]] && CASE_ERR="the tag 'bench' is not in 'cfsctl oci images': ${images:0:200}"
            fi
            CASE_DETAILS=$(jq -cn --argjson a "$CASE_DETAILS" --argjson b "$(repo_stats "$repo")" '$a + $b')
        else
            CASE_DETAILS=$(repo_stats "$repo")
            check_cfsctl_repo "$repo"
            if [[ -z $CASE_ERR && $fs == xfs ]]; then
                jq -e '.upstream_reflinked > 0 and (.upstream_copied // 0) == 0' <<<"$CASE_DETAILS" >/dev/null ||
                    CASE_ERR="upstream did not reflink everything on XFS: $(grep -m1 '^objects ' "$dir/cmd.out")"
            fi
            if [[ -z $CASE_ERR && $fs == ext4 ]] && jq -e '.repo_objects_hardlinked == 0' <<<"$CASE_DETAILS" >/dev/null; then
                log "note: upstream did not hardlink as root on ext4 this time"
            fi
        fi
        [[ -z $CASE_ERR ]] || failure=check
    fi
    local main helper
    main=$(kib_of_time "$dir/main.time")
    helper=$(kib_of_time "$dir/helper.time")
    local t0=$EPOCHREALTIME
    rm -rf "$repo"
    sync
    local clean_s
    clean_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
    jq -cn --arg case "$c" --arg point "$name" --argjson files_per_layer "$files" --argjson layers "$layers" \
        --arg fs "$fs" --argjson run "$run" --slurpfile peak "$dir/peak.json" \
        --argjson main "${main:-null}" --argjson helper "${helper:-null}" --arg error "$CASE_ERR" \
        --arg failure "$failure" --argjson details "$CASE_DETAILS" --argjson clean "$clean_s" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        '{case: $case, point: $point, files_per_layer: $files_per_layer, layers: $layers,
          files: ($files_per_layer * $layers), fs: $fs, run: $run,
          seconds: $peak[0].seconds, ok: ($error == ""), failure: (if $failure == "" then null else $failure end),
          error: (if $error == "" then null else $error end),
          main_time_maxrss_kib: $main, helper_time_maxrss_kib: $helper, procs: $peak[0].procs,
          details: $details, cleanup_seconds: $clean, loadavg_after: $load}' >>"$OUT/runs.jsonl"
    local secs line
    secs=$(jq -r '.seconds // 0' "$dir/peak.json")
    line=$(printf '%-21s %-11s run %d: %8.2f s, max RSS %s KiB%s' "$c" "$name" "$run" "$secs" \
        "${main:-?}" "${helper:+, helper $helper KiB}")
    log "$line${CASE_ERR:+ FAILED: $CASE_ERR}"
}

machine_json() {
    jq -n --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" --argjson cores "$(nproc)" \
        --argjson mem_kib "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" --arg kernel "$(uname -r)" \
        --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
        --arg xfs "XFS on $LOOP_IMG via loop (direct-io $LOOP_DIRECT_IO), $(df -h --output=size "$MNT" | tail -1 | tr -d ' '), reflink=$(xfs_info "$MNT" | grep -o 'reflink=[01]' | head -1 | cut -d= -f2)" \
        --arg ext4 "$(findmnt -no FSTYPE,SOURCE --target "$SE" | tr -s ' ') ($SE)" \
        --arg uptime_start "$UPTIME_START" --arg uptime_end "$(uptime)" \
        --arg commit "$BUILT_COMMIT" --argjson dirty "$BUILT_DIRTY" \
        --arg cstor "$("$BIN/cstor" --version 2>&1 | head -1)" --arg podman "$(podman --version)" \
        --arg skopeo "$(skopeo --version)" --arg cfsctl "$("$CFSCTL" --version 2>&1 | head -1)" \
        --arg points "$POINTS" --arg fses "$FSES" --argjson runs "$RUNS" --argjson timeout "$TIMEOUT" \
        --argjson prewarm "$PREWARM" --arg date "$(date -Is)" \
        '{date: $date, machine: {cpu: $cpu, cores: $cores, mem_kib: $mem_kib, kernel: $kernel, os: $os,
          filesystems: {xfs: $xfs, ext4: $ext4}, uptime_start: $uptime_start, uptime_end: $uptime_end},
          versions: {cstor_commit: $commit, cstor_tree_dirty: $dirty, cstor: $cstor, podman: $podman,
          skopeo: $skopeo, cfsctl: $cfsctl},
          settings: {points: $points, fs: $fses, runs: $runs, timeout_seconds: $timeout, prewarm: $prewarm}}'
}

# ---- main -------------------------------------------------------------------------------------
UPTIME_START=$(uptime)
need_tools
take_run_lock
chmod 755 "$CACHE"
build_binaries
ensure_cfsctl
command -v fstrim >/dev/null || die "fstrim (util-linux) is missing"
mount_xfs
mkdir -p "$OUT/runs" "$SE" "$RUN_ROOT"
touch "$OUT/runs.jsonl" "$OUT/loads.jsonl" # appended to: several runs may share one $SCALE_OUT
log "points: $POINTS; fs: $FSES; $RUNS run(s); results in $OUT; load: $UPTIME_START"
T_START=$EPOCHREALTIME
for point in $POINTS; do
    files=${point%x*} layers=${point#*x} name=f${point}
    total=$((files * layers))
    tp=$EPOCHREALTIME
    selected=()
    for fs in $FSES; do
        for c in $(cases_of "$fs"); do if [[ $c =~ $CASES ]]; then selected+=("$c"); fi; done
    done
    ((${#selected[@]})) || continue
    # Free disk first: evict other cached points if needed, else skip the point.
    disk_need "$total" "$name"
    if (($(free_kib "$CACHE") < NEED_HOST || $(free_kib "$MNT") < NEED_XFS)); then
        evict_images "$name"
        disk_need "$total" "$name"
    fi
    host_free=$(free_kib "$CACHE") xfs_free=$(free_kib "$MNT")
    if ((host_free < NEED_HOST || xfs_free < NEED_XFS)); then
        msg="not enough disk: needs about $((NEED_HOST / 1048576)) GiB on the host (has $((host_free / 1048576))) and $((NEED_XFS / 1048576)) GiB on the XFS (has $((xfs_free / 1048576)))"
        log "skipping $name: $msg"
        for c in "${selected[@]}"; do
            fs=${c#*-} fs=${fs%%-*}
            jq -cn --arg case "$c" --arg point "$name" --argjson f "$files" --argjson l "$layers" --arg fs "$fs" --arg e "$msg" \
                '{case: $case, point: $point, files_per_layer: $f, layers: $l, files: ($f * $l), fs: $fs, run: 1,
                  seconds: null, ok: false, failure: "disk", error: $e, procs: [], details: {}}' >>"$OUT/runs.jsonl"
        done
        continue
    fi
    ensure_point "$files" "$layers" "$name"
    for fs in $FSES; do
        storage_of "$fs"
        # The image's layer directories, read before each timed import (warm page cache).
        IFS=: read -r -a DIFFS <<<"$("${P[@]}" image inspect --format '{{.GraphDriver.Data.LowerDir}}:{{.GraphDriver.Data.UpperDir}}' "localhost/scale/$name:latest" | sed 's/^<no value>//; s/^://')"
        ((${#DIFFS[@]} == layers)) || die "$name in $G: ${#DIFFS[@]} layer dirs, expected $layers"
        rm -rf "$SCRATCH"
        mkdir -p "$SCRATCH"
        for ((run = 1; run <= RUNS; run++)); do
            for c in $(cases_of "$fs"); do
                if [[ $c =~ $CASES ]]; then import_run "$c" "$name" "$files" "$layers" "$run"; fi
            done
        done
        rm -rf "$SCRATCH"
    done
    if ((total > KEEP_MAX)); then drop_image "$name"; fi
    log "$name took $(awk -v a="$tp" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
done
log "the series took $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
# Each invocation's machine, versions, settings and load (several may fill one $SCALE_OUT).
machine_json | tee "$OUT/machine.json" | jq -c . >>"$OUT/invocations.jsonl"
# A partial series (some points, filesystems or cases) draws its curves beside its results,
# not over the committed ones in bench/.
svg_dir=()
if [[ $POINTS != "$ALL_POINTS" || $FSES != "ext4 xfs" || $CASES != . ]]; then
    svg_dir=(--svg-dir "$OUT")
    log "a partial series: its curves go to $OUT"
fi
python3 "$BENCH_DIR/scale_report.py" "$OUT" "${svg_dir[@]}"
