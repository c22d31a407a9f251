#!/usr/bin/env bash
# cstor-proxy benchmark: cstor import against upstream cfsctl, the upstream tar path and the
# machine's limits, on XFS (reflinks) and ext4 (copies), rootful and rootless.
# Run as root: bench/run.sh. Read bench/README.md for what it measures and the settings.
set -Eeuo pipefail
shopt -s nullglob

export LC_ALL=C.UTF-8 RUST_BACKTRACE=0
# System tools first (not shims such as pyenv's); cargo stays reachable.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
unset CSTOR_HELPER

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(cd "$BENCH_DIR/.." && pwd)

# ---- settings (environment) ---------------------------------------------------------------
CACHE=${BENCH_CACHE:-/var/cache/cstor-bench}
RUNS=${BENCH_RUNS:-3}
MODES=${BENCH_MODES:-warm cold}
CASES=${BENCH_CASES:-.}                    # extended regex on case names
USER_NAME=${BENCH_USER:-cstorbench}
XFS_SIZE=${BENCH_XFS_SIZE:-16G}
LOOP_DIRECT_IO=${BENCH_LOOP_DIRECT_IO:-on}
COPIES_FROM=${BENCH_COPIES_FROM:-host}     # host | rootfs
BUILD=${BENCH_BUILD:-1}
RSS_RUNS=${BENCH_RSS_RUNS:-1}
WARMUP=${BENCH_WARMUP:-1}                  # 0: no unrecorded warm-up round
MIRROR=${BENCH_MIRROR:-http://deb.debian.org/debian}
CFSCTL_VERSION=0.9.4
CFSCTL_ROOT=${BENCH_CFSCTL_ROOT:-$CACHE/cfsctl}
CFSCTL=$CFSCTL_ROOT/bin/cfsctl
OUT=${BENCH_OUT:-$CACHE/results/$(date +%Y%m%d-%H%M%S)}

MNT=$CACHE/xfs                 # the XFS loop mount
EXT4=$CACHE/ext4               # the ext4 side (a directory of the cache's filesystem)
BIN=$CACHE/bin                 # this run's binaries (a snapshot, readable by the bench user)
RUN_ROOT=/run/cstor-bench      # root's podman run roots
USER_RUN=/tmp/cstor-bench-run-$USER_NAME
IMAGE=localhost/cstor-bench/reference-$COPIES_FROM:latest
BASE_IMAGE=localhost/cstor-bench/base:latest
LOOP_IMG=$CACHE/xfs.img

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
[[ ${BENCH_DEBUG:-0} == 1 ]] && set -x

[[ $(id -u) == 0 ]] || die "run me as root (sudo $0)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, not '$RUNS'"
case $COPIES_FROM in host | rootfs) ;; *) die "BENCH_COPIES_FROM is host or rootfs" ;; esac
for m in $MODES; do [[ $m == warm || $m == cold ]] || die "BENCH_MODES: warm and/or cold, not '$m'"; done

# ---- cleanup of what this run created -----------------------------------------------------
cleanup() {
    local rc=$?
    trap - ERR
    set +e
    # The push case's repository service and the varlink helpers hold sockets on the XFS:
    # they go first.
    if [[ -n ${PUSH_SVC_PID:-} ]]; then
        kill "$PUSH_SVC_PID" 2>/dev/null
        wait "$PUSH_SVC_PID" 2>/dev/null
    fi
    stop_varlink_helpers
    if [[ -n $CREATED_MOUNT ]]; then
        rm -rf "$CREATED_MOUNT/scratch"
        log "unmounting $CREATED_MOUNT"
        # podman (overlay mounts of a container being committed) and skopeo (a bind mount of
        # <graphroot>/overlay onto itself) leave mounts below the graph roots.
        [[ ${#ROOT_XFS_P[@]} -gt 0 ]] && "${ROOT_XFS_P[@]}" umount --all >/dev/null 2>&1
        findmnt -Rrno TARGET "$CREATED_MOUNT" 2>/dev/null | tac | while read -r t; do
            umount "$t" 2>/dev/null || umount -l "$t"
        done
        # The rootless pause process keeps its own copy of the mount; restart it.
        [[ -n $USER_HOME ]] && as_user podman system migrate >/dev/null 2>&1
        mountpoint -q "$CREATED_MOUNT" && umount -l "$CREATED_MOUNT"
    fi
    detach_created_loop
    [[ -n ${SCRATCH_EXT4:-} && -d $SCRATCH_EXT4 ]] && rm -rf "$SCRATCH_EXT4"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---- helpers: bench/lib.sh (logging, as_user, tools, cfsctl, the XFS mount, repositories) ---
# ---- one-time setup (cached under $CACHE) ----------------------------------------------------
build_binaries() {
    if [[ $BUILD == 1 ]]; then
        log "building (cargo build --release --workspace --bins)"
        (cd "$SRC_DIR" && cargo build --release --workspace --bins --quiet)
    fi
    local t=$SRC_DIR/target/release
    for b in cstor cstor-helper cstor-bench-read cstor-bench-protocol cstor-bench-varlink; do
        [[ -x $t/$b ]] || die "$t/$b is missing: build with cargo build --release --workspace --bins"
    done
    # A private copy: others may rebuild target/ during the run, and the bench user must be
    # able to run them.
    rm -rf "$BIN"
    mkdir -p "$BIN"
    cp "$t"/{cstor,cstor-helper,cstor-bench-read,cstor-bench-protocol,cstor-bench-varlink} "$BIN/"
    chmod 755 "$BIN" "$BIN"/*
}


ensure_reference_tars() {
    if [[ ! -e $CACHE/rootfs.done ]]; then
        log "debootstrap --variant=minbase bookworm (about a minute, once)"
        rm -rf "$CACHE/rootfs" "$CACHE/rootfs.partial"
        debootstrap --variant=minbase bookworm "$CACHE/rootfs.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
            die "debootstrap failed, see $CACHE/debootstrap.log"
        mv "$CACHE/rootfs.partial" "$CACHE/rootfs"
        touch "$CACHE/rootfs.done"
    fi
    if [[ ! -s $CACHE/base.tar ]]; then
        log "packing the base layer"
        tar --xattrs --xattrs-include='*' --numeric-owner -C "$CACHE/rootfs" -cf "$CACHE/base.tar.partial" .
        mv "$CACHE/base.tar.partial" "$CACHE/base.tar"
    fi
    # The second layer: copies of /usr/share and /usr/lib/python3*, taken once (a snapshot,
    # so that the image does not change when the host's packages do).
    local copies=$CACHE/copies-$COPIES_FROM.tar
    if [[ ! -s $copies ]]; then
        local from=/
        [[ $COPIES_FROM == rootfs ]] && from=$CACHE/rootfs
        log "packing the copies layer from $from (usr/share, usr/lib/python3*)"
        local dirs=(usr/share)
        for d in "$from"/usr/lib/python3*; do dirs+=("usr/lib/${d##*/}"); done
        local rc=0
        tar --xattrs --xattrs-include='*' --numeric-owner -C "$from" -cf "$copies.partial" "${dirs[@]}" || rc=$?
        # 1: "file changed as we read it" on a live /usr/share; the archive is still usable.
        ((rc <= 1)) || die "packing $copies failed"
        mv "$copies.partial" "$copies"
    fi
}

# The ostree cases' repository: the reference image's tree (the debootstrap rootfs, then
# the copies layer over it) committed once into a bare repository on the XFS file system,
# kept in the XFS image between runs. ostree commits no device nodes: the rootfs is staged
# without the few in /dev.
OSTREE_REPO=$MNT/ostree/bare
ensure_ostree_repo() {
    local done=$OSTREE_REPO.done-$COPIES_FROM
    [[ -e $done ]] && return
    log "committing the reference tree into a bare ostree repository on XFS (once)"
    rm -rf "$MNT/ostree"
    mkdir -p "$MNT/ostree"
    ostree --repo="$OSTREE_REPO" init --mode=bare
    ostree --repo="$OSTREE_REPO" config set core.min-free-space-percent 0
    local staged=$MNT/ostree/rootfs
    cp -a "$CACHE/rootfs" "$staged"
    find "$staged/dev" -xdev ! -type d ! -type f ! -type l -delete
    ostree --repo="$OSTREE_REPO" commit -b bench --timestamp=2024-01-01 --tar-autocreate-parents \
        --tree=dir="$staged" --tree=tar="$CACHE/copies-$COPIES_FROM.tar" >/dev/null
    rm -rf "$staged"
    touch "$done"
}

ensure_user() {
    if ! id "$USER_NAME" >/dev/null 2>&1; then
        log "creating the rootless user $USER_NAME"
        useradd -m -s /bin/sh "$USER_NAME"
    fi
    USER_HOME=$(getent passwd "$USER_NAME" | cut -d: -f6)
    USER_UID=$(id -u "$USER_NAME")
    local uid=$USER_UID
    if [[ ! -d /tmp/podman-run-$uid ]]; then
        mkdir -m 700 "/tmp/podman-run-$uid"
        chown "$USER_NAME:" "/tmp/podman-run-$uid"
    fi
    for f in /etc/subuid /etc/subgid; do
        grep -qE "^($USER_NAME|$uid):" "$f" ||
            die "$USER_NAME has no range in $f (usermod --add-subuids/--add-subgids, or delete the user)"
    done
    local conf=$USER_HOME/.config/containers changed=0
    user_dir "$USER_HOME/.config" "$conf"
    if [[ $(cat "$conf/storage.conf" 2>/dev/null) != $'[storage]\ndriver = "overlay"' ]]; then
        printf '[storage]\ndriver = "overlay"\n' >"$conf/storage.conf"
        changed=1
    fi
    printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' >"$conf/containers.conf"
    chown "$USER_NAME:" "$conf"/*.conf
    ((changed)) && as_user podman system reset --force >/dev/null 2>&1
    # The pause process must see the XFS mount made above.
    as_user podman system migrate
}

# Storage layouts: XR/XU on XFS (root/user), ER/EU on ext4.
set_storages() {
    XR=$MNT/root/storage XR_RUN=$RUN_ROOT/xfs
    XU=$MNT/user/storage XU_RUN=$USER_RUN/xfs
    ER=$EXT4/root/storage ER_RUN=$RUN_ROOT/ext4
    EU=$EXT4/user/storage EU_RUN=$USER_RUN/ext4
    mkdir -p "$XR" "$ER" "$XR_RUN" "$ER_RUN" "$MNT/root" "$EXT4/root"
    chmod 755 "$EXT4" "$MNT/root" "$EXT4/root"
    user_dir "$MNT/user" "$XU" "$EXT4/user" "$EU" "$USER_RUN" "$XU_RUN" "$EU_RUN"
    chmod 700 "$USER_RUN"
    ROOT_XFS_P=(podman --root "$XR" --runroot "$XR_RUN" --storage-driver overlay)
}
ROOT_XFS_P=()

# podman arguments of a storage: root|user graphroot runroot
podman_of() {
    local who=$1 g=$2 r=$3
    if [[ $who == root ]]; then
        P=(podman --root "$g" --runroot "$r" --storage-driver overlay)
    else
        P=(as_user podman --root "$g" --runroot "$r" --storage-driver overlay)
    fi
}

# Builds the reference image in one storage (idempotent): podman import of the base tar, then
# a second layer with podman create/mount, extracting the copies, podman commit.
ensure_image() {
    local who=$1 g=$2 r=$3
    podman_of "$who" "$g" "$r"
    local layers
    layers=$("${P[@]}" image inspect --format '{{len .RootFS.Layers}}' "$IMAGE" 2>/dev/null || true)
    if [[ $layers == 2 ]]; then
        return
    fi
    log "building $IMAGE in $g ($who)"
    "${P[@]}" rmi --force --ignore "$IMAGE" "$BASE_IMAGE" >/dev/null
    "${P[@]}" import --quiet "$CACHE/base.tar" "$BASE_IMAGE" >/dev/null
    local c
    c=$("${P[@]}" create --quiet "$BASE_IMAGE" /bin/true)
    local script='set -eu
m=$(podman --root "$1" --runroot "$2" --storage-driver overlay mount "$3")
mkdir -p "$m/opt/copies"
tar --xattrs --xattrs-include="*" --numeric-owner -C "$m/opt/copies" --strip-components=1 -xf "$4"
podman --root "$1" --runroot "$2" --storage-driver overlay umount "$3" >/dev/null'
    if [[ $who == root ]]; then
        sh -c "$script" sh "$g" "$r" "$c" "$CACHE/copies-$COPIES_FROM.tar"
    else
        as_user podman unshare sh -c "$script" sh "$g" "$r" "$c" "$CACHE/copies-$COPIES_FROM.tar"
    fi
    "${P[@]}" commit --quiet "$c" "$IMAGE" >/dev/null
    "${P[@]}" rm "$c" >/dev/null
    "${P[@]}" rmi "$BASE_IMAGE" >/dev/null
    layers=$("${P[@]}" image inspect --format '{{len .RootFS.Layers}}' "$IMAGE")
    [[ $layers == 2 ]] || die "$IMAGE in $g has $layers layers, expected 2"
}

# ---- measurements ---------------------------------------------------------------------------
RUNS_FILE=
CASE_SECONDS=
CASE_DETAILS='{}'
CASE_ERR=
CASE_OUT=
CASE_RC=0
MODE=warm

# Runs "$@" timed; stdout/stderr to $CASE_OUT.{out,err}; sets CASE_SECONDS and CASE_RC.
# Reads every file of the image storages once (untimed), so that a warm run is warm: some
# kernels page out page cache that stayed idle for a while (this VM runs a DAMON "pageout"
# scheme for regions idle 60 s), which turns later "warm" cases of a round partly cold.
prewarm() {
    local dirs=() d
    for d in "$XR" "$XU" "$ER" "$EU"; do
        [[ -d $d/overlay ]] && dirs+=("$d/overlay")
    done
    # The ostree cases read the ostree repository, not the image storages.
    [[ $CASE == ostree-* ]] && dirs=("$OSTREE_REPO/objects")
    ((${#dirs[@]} == 0)) || "$BIN/cstor-bench-read" "${dirs[@]}" >/dev/null 2>&1 || true
}

timed() {
    [[ $MODE == cold ]] && drop_caches
    [[ $MODE == warm ]] && prewarm
    local t0=$EPOCHREALTIME rc=0
    "$@" >"$CASE_OUT.out" 2>"$CASE_OUT.err" || rc=$?
    local t1=$EPOCHREALTIME
    CASE_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
    CASE_RC=$rc
    if ((rc != 0)); then
        CASE_ERR="exit status $rc: $(tail -c 600 "$CASE_OUT.err" | tr '\n' ' ')"
    fi
}


# cstor import: who fs(xfs|ext4) [import|reimport|hardlink]
cstor_import() {
    local who=$1 fs=$2 kind=${3:-import}
    local g r repo
    case $who-$fs in
    root-xfs) g=$XR r=$XR_RUN repo=$MNT/scratch/root/repo ;;
    user-xfs) g=$XU r=$XU_RUN repo=$MNT/scratch/user/repo ;;
    root-ext4) g=$ER r=$ER_RUN repo=$SCRATCH_EXT4/root/repo ;;
    user-ext4) g=$EU r=$EU_RUN repo=$SCRATCH_EXT4/user/repo ;;
    esac
    local keep=$MNT/scratch/imported-repo # cstor-xfs-root's repository, kept for the re-import
    local policy=()
    [[ $kind == hardlink ]] && policy=(--copy-policy reflink-or-hardlink)
    local cmd=("$BIN/cstor" import --root "$g" --runroot "$r" --storage-driver overlay --json "${policy[@]}" --repo "$repo" "$IMAGE")
    [[ $who == user ]] && cmd=(as_user "${cmd[@]}")
    if [[ $kind == reimport && -d $keep ]]; then
        rm -rf "$repo"
        mv "$keep" "$repo"
    else
        fresh_repo "$who" "$repo"
        if [[ $kind == reimport ]]; then
            "${cmd[@]}" >/dev/null || die "the first import before the re-import failed"
        fi
    fi
    timed "${cmd[@]}"
    if ((CASE_RC == 0)); then
        local rep
        if ! rep=$(jq -ce '{reflinked: .objects.reflinked, copied: .objects.copied,
                present: .objects.present, inlined: .objects.inlined, hardlinked: .objects.hardlinked,
                bytes_reflinked: .objects.bytes_reflinked, bytes_copied: .objects.bytes_copied,
                already_complete: .already_complete, layers_skipped: ([.layers[] | select(.skipped)] | length),
                reported_seconds: (.elapsed_seconds // .elapsed), first_reflink_fallback: .first_reflink_fallback,
                erofs_tree: .erofs_tree}' \
            "$CASE_OUT.out"); then
            CASE_ERR="unreadable --json report: $(head -c 300 "$CASE_OUT.out")"
        else
            CASE_DETAILS=$(jq -cn --argjson a "$rep" --argjson b "$(repo_stats "$repo")" '$a + $b')
            local copied reflinked present
            copied=$(jq -r .copied <<<"$rep")
            reflinked=$(jq -r .reflinked <<<"$rep")
            present=$(jq -r .present <<<"$rep")
            # A fresh import builds the EROFS tree while streaming; reading the layer
            # streams back instead is correct but slower, and would skew the numbers.
            if [[ $kind != reimport && $(jq -r .erofs_tree <<<"$rep") != streamed ]]; then
                CASE_ERR="the EROFS tree was not built while streaming: $(jq -c .erofs_tree <<<"$rep")"
            fi
            if [[ -n $CASE_ERR ]]; then
                :
            elif [[ $kind == hardlink ]]; then
                local hardlinked
                hardlinked=$(jq -r .hardlinked <<<"$rep")
                [[ $reflinked == 0 && $hardlinked -gt 0 ]] ||
                    CASE_ERR="hardlink policy on ext4: $hardlinked hardlinked, $reflinked reflinked"
            elif [[ $kind == reimport ]]; then
                [[ $copied == 0 && $reflinked == 0 ]] ||
                    CASE_ERR="re-import stored objects again: $reflinked reflinked, $copied copied"
            elif [[ $fs == xfs ]]; then
                [[ $copied == 0 && $reflinked -gt 0 ]] ||
                    CASE_ERR="on XFS: $copied copied, $reflinked reflinked (expected 0 copied)"
                if [[ -z $CASE_ERR && $who == root ]]; then
                    rm -rf "$keep"
                    mv "$repo" "$keep"
                fi
            else
                [[ $reflinked == 0 && $copied -gt 0 ]] ||
                    CASE_ERR="on ext4: $copied copied, $reflinked reflinked"
            fi
        fi
    fi
    rm -rf "$repo"
}

# cfsctl oci pull --local-fetch auto from containers-storage: fs variant
# variant: default | copy (without CAP_DAC_READ_SEARCH, so that it cannot hardlink)
cfsctl_pull() {
    local fs=$1 variant=$2 g repo
    case $fs in
    xfs) g=$XR repo=$MNT/scratch/cfsctl/repo ;;
    ext4) g=$ER repo=$SCRATCH_EXT4/cfsctl/repo ;;
    esac
    fresh_repo root "$repo"
    local pre=()
    [[ $variant == copy ]] && pre=(setpriv --inh-caps=-dac_read_search --bounding-set=-dac_read_search)
    timed "${pre[@]}" env CONTAINERS_STORAGE_ROOT="$g" "$CFSCTL" --repo "$repo" oci pull \
        --local-fetch auto "containers-storage:$IMAGE" bench
    if ((CASE_RC == 0)); then
        CASE_DETAILS=$(repo_stats "$repo")
        check_cfsctl_repo "$repo"
        if [[ -z $CASE_ERR && $fs == xfs ]]; then
            jq -e '.upstream_reflinked > 0 and (.upstream_copied // 0) == 0' <<<"$CASE_DETAILS" >/dev/null ||
                CASE_ERR="upstream did not reflink everything on XFS: $(grep -m1 '^objects ' "$CASE_OUT.out")"
        fi
        if [[ -z $CASE_ERR && $fs == ext4 ]]; then
            local hl
            hl=$(jq -r .repo_objects_hardlinked <<<"$CASE_DETAILS")
            if [[ $variant == copy && $hl != 0 ]]; then
                CASE_ERR="copy mode left $hl objects hardlinked"
            elif [[ $variant == default && $hl == 0 ]]; then
                log "note: upstream did not hardlink as root on ext4 this time"
            fi
        fi
    fi
    rm -rf "$repo"
}


# skopeo copy to an uncompressed oci dir, then cfsctl oci pull oci: (timed together).
tar_path() {
    local dir=$MNT/scratch/tarpath repo=$MNT/scratch/tarpath-repo
    rm -rf "$dir"
    fresh_repo root "$repo"
    timed sh -c 'set -e
        t0=$(date +%s.%N)
        skopeo copy --quiet "containers-storage:[overlay@$1+$2]$3" "oci:$4:bench" --dest-oci-accept-uncompressed-layers
        t1=$(date +%s.%N)
        "$5" --repo "$6" oci pull "oci:$4:bench" bench
        t2=$(date +%s.%N)
        awk -v a="$t0" -v b="$t1" -v c="$t2" "BEGIN { printf \"{\\\"skopeo_seconds\\\": %.6f, \\\"cfsctl_seconds\\\": %.6f}\\n\", b - a, c - b }" >&2' \
        sh "$XR" "$XR_RUN" "$IMAGE" "$dir" "$CFSCTL" "$repo"
    if ((CASE_RC == 0)); then
        local steps
        steps=$(tail -n1 "$CASE_OUT.err" | jq -c . 2>/dev/null || echo '{}')
        CASE_DETAILS=$(jq -cn --argjson a "$steps" --argjson b "$(repo_stats "$repo")" '$a + $b')
        check_cfsctl_repo "$repo"
    fi
    # skopeo leaves <graphroot>/overlay bind-mounted onto itself until the next podman command.
    "${ROOT_XFS_P[@]}" images >/dev/null 2>&1 || true
    rm -rf "$dir" "$repo"
}

# An ostree commit of the reference tree into a fresh composefs repository on XFS:
# cstor (every content reflinked from the bare repository) | cfsctl (upstream's pull-local)
# | reimport (cstor again into a repository that has the commit: everything present).
ostree_import() {
    local tool=$1 repo=$MNT/scratch/ostree-cfs
    fresh_repo root "$repo"
    local cmd=("$BIN/cstor" --json ostree import --repo "$repo" "$OSTREE_REPO" bench)
    [[ $tool == cfsctl ]] && cmd=("$CFSCTL" --repo "$repo" ostree pull-local "$OSTREE_REPO" bench)
    if [[ $tool == reimport ]]; then
        "${cmd[@]}" >/dev/null || die "the first ostree import before the re-import failed"
    fi
    timed "${cmd[@]}"
    if ((CASE_RC == 0)); then
        if [[ $tool == cfsctl ]]; then
            CASE_DETAILS=$(repo_stats "$repo")
            grep -q '^image' "$CASE_OUT.out" || CASE_ERR="cfsctl printed no image line"
        elif ! CASE_DETAILS=$(jq -ce --argjson b "$(repo_stats "$repo")" '{reflinked: .objects.reflinked,
                copied: .objects.copied, present: .objects.present, inlined: .objects.inlined,
                bytes_reflinked: .objects.bytes_reflinked, file_objects, external_objects,
                content_bytes, first_reflink_fallback} + $b' "$CASE_OUT.out"); then
            CASE_ERR="unreadable --json report: $(head -c 300 "$CASE_OUT.out")"
        else
            local copied reflinked present
            copied=$(jq -r .copied <<<"$CASE_DETAILS")
            reflinked=$(jq -r .reflinked <<<"$CASE_DETAILS")
            present=$(jq -r .present <<<"$CASE_DETAILS")
            if [[ $tool == reimport ]]; then
                [[ $copied == 0 && $reflinked == 0 && $present -gt 0 ]] ||
                    CASE_ERR="ostree re-import stored objects again: $reflinked reflinked, $copied copied"
            else
                [[ $copied == 0 && $reflinked -gt 0 ]] ||
                    CASE_ERR="ostree on XFS: $copied copied, $reflinked reflinked (expected 0 copied)"
            fi
        fi
    fi
    rm -rf "$repo"
}

DIFFS=()
limit_read() { # hash|read
    local args=()
    [[ $1 == hash ]] && args=(--hash)
    timed /usr/bin/time -f '{"user_seconds": %U, "sys_seconds": %S}' -o "$CASE_OUT.time" \
        "$BIN/cstor-bench-read" "${args[@]}" "${DIFFS[@]}"
    ((CASE_RC == 0)) && CASE_DETAILS=$(jq -cs 'add' "$CASE_OUT.out" "$CASE_OUT.time")
    true
}

limit_reflink() { # cp | parallel
    local dest=$MNT/scratch/reflink
    rm -rf "$dest"
    mkdir -p "$dest"
    if [[ $1 == cp ]]; then
        timed /usr/bin/time -f '{"user_seconds": %U, "sys_seconds": %S}' -o "$CASE_OUT.time" \
            cp -a --reflink=always "${DIFFS[@]}" "$dest/"
    else
        timed /usr/bin/time -f '{"user_seconds": %U, "sys_seconds": %S}' -o "$CASE_OUT.time" \
            "$BIN/cstor-bench-read" --reflink-into "$dest" "${DIFFS[@]}"
    fi
    if ((CASE_RC == 0)); then
        CASE_DETAILS=$(jq -cs 'add' "$CASE_OUT.time" <(if [[ $1 == parallel ]]; then cat "$CASE_OUT.out"; else echo '{}'; fi))
    fi
    rm -rf "$dest"
}

# The source of the copy cases: the reference image imported (untimed, once per run) into a
# repository on the XFS, where the destinations are too.
COPY_SRC=
copy_source() {
    [[ -n $COPY_SRC && -d $COPY_SRC ]] && return
    COPY_SRC=$MNT/scratch/copy-source
    fresh_repo root "$COPY_SRC"
    "$BIN/cstor" import --root "$XR" --runroot "$XR_RUN" --storage-driver overlay --repo "$COPY_SRC" \
        --tag reference "$IMAGE" >/dev/null || die "importing the copy source failed"
    COPY_ID=$("$CFSCTL" --repo "$COPY_SRC" oci compute-id reference)
}

# A copy of the reference image between two repositories on the XFS: cstor | cfsctl |
# cfsctl-zerocopy. Each result must have the source's image id (checked untimed).
copy_case() {
    copy_source
    local dest=$MNT/scratch/root/copy-dest
    fresh_repo root "$dest"
    case $1 in
    cstor) timed "$BIN/cstor" copy --json --from "$COPY_SRC" --repo "$dest" reference ;;
    cfsctl) timed "$CFSCTL" --repo "$dest" oci copy --from "$COPY_SRC" --name reference reference ;;
    cfsctl-zerocopy) timed "$CFSCTL" --repo "$dest" oci copy --zerocopy --from "$COPY_SRC" --name reference reference ;;
    esac
    if ((CASE_RC == 0)); then
        local id
        id=$("$CFSCTL" --repo "$dest" oci compute-id reference 2>&1) || true
        [[ $id == "$COPY_ID" ]] || CASE_ERR="the copy's image id $id is not the source's $COPY_ID"
        if [[ $1 == cstor && -z $CASE_ERR ]]; then
            CASE_DETAILS=$(jq -c '{reflinked: .objects.reflinked, copied: .objects.copied,
                present: .objects.present, reported_seconds: .elapsed_seconds}' "$CASE_OUT.out")
            [[ $(jq -r .copied <<<"$CASE_DETAILS") == 0 ]] ||
                CASE_ERR="cstor copy on XFS copied objects: $CASE_DETAILS"
        fi
        if [[ -z $CASE_ERR ]]; then
            CASE_DETAILS=$(jq -cn --argjson a "$CASE_DETAILS" --argjson b "$(repo_stats "$dest")" '$a + $b')
        fi
    fi
    rm -rf "$dest"
}

# cstor import --repo-service: the reference image pushed through upstream's repository
# service (`cfsctl varlink`, as root, started once per run) into a fresh repository on the XFS,
# to compare with cstor-xfs-root (the same import, written by cstor itself).
PUSH_SVC_PID=
push_service() {
    [[ -n $PUSH_SVC_PID ]] && kill -0 "$PUSH_SVC_PID" 2>/dev/null && return
    PUSH_SOCK=$MNT/scratch/composefs.sock
    rm -f "$PUSH_SOCK"
    "$CFSCTL" varlink --address "$PUSH_SOCK" </dev/null >/dev/null 2>"$OUT/logs/push-service.log" &
    PUSH_SVC_PID=$!
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -S $PUSH_SOCK ]] && return
        sleep 0.05
    done
    die "cfsctl varlink did not start (see $OUT/logs/push-service.log)"
}

push_case() {
    push_service
    local repo=$MNT/scratch/push/repo
    fresh_repo root "$repo"
    timed "$BIN/cstor" --json import --root "$XR" --runroot "$XR_RUN" --storage-driver overlay \
        --repo-service "$PUSH_SOCK" --repo "$repo" "$IMAGE"
    if ((CASE_RC == 0)); then
        CASE_DETAILS=$(jq -c '{reflinked: ([.layers[].reflinked] | add), hardlinked: ([.layers[].hardlinked] | add),
            copied: ([.layers[].copied] | add), present: ([.layers[].present] | add)}' "$CASE_OUT.out")
        # Files the helper sends inline (not world-readable: the service may not be able to
        # open them) are copied by the service; the rest must be reflinked.
        jq -e '.reflinked > 0 and .hardlinked == 0 and .copied < .reflinked / 100' <<<"$CASE_DETAILS" >/dev/null ||
            CASE_ERR="the service did not reflink on XFS: $CASE_DETAILS"
    fi
    rm -rf "$repo"
}

# cstor-helper --varlink, one per storage owner (root | user), started once per run outside
# the timing as a service is, on a socket in the scratch space. The rootless one runs
# through `podman unshare` as the bench user: its own parent is podman, so it is found (and
# stopped) by its socket, never by a pid this script holds.
declare -A VARLINK_SOCK=()
varlink_helper() { # root|user -> VARLINK_SOCK[$1]
    local who=$1 dir=$MNT/scratch/varlink-$1
    local sock=$dir/oci.sock log=$OUT/logs/varlink-helper-$1.log
    # Still listening (a unix socket is listed while a process holds it).
    if [[ -n ${VARLINK_SOCK[$who]:-} ]] && awk -v p="$sock" '$8 == p && $6 == "01" { f = 1 } END { exit !f }' /proc/net/unix; then
        return
    fi
    mkdir -p "$dir"
    rm -f "$sock"
    if [[ $who == root ]]; then
        (cd / && exec "$BIN/cstor-helper" --root "$XR" --runroot "$XR_RUN" --storage-driver overlay \
            --varlink "$sock" </dev/null >/dev/null 2>"$log") &
    else
        chown "$USER_NAME:" "$dir"
        as_user podman unshare "$BIN/cstor-helper" --root "$XU" --runroot "$XU_RUN" --storage-driver overlay \
            --varlink "$sock" </dev/null >/dev/null 2>"$log" &
    fi
    local i
    for ((i = 0; i < 400; i++)); do
        if [[ -S $sock ]]; then
            VARLINK_SOCK[$who]=$sock
            return
        fi
        sleep 0.05
    done
    die "cstor-helper --varlink ($who) did not start (see $log)"
}

# The pids holding a unix socket bound to path $1 (the listener, and any accepted
# connection): its inodes in /proc/net/unix, then the processes with an fd on one of them.
pids_serving() {
    local inodes
    inodes=$(awk -v p="$1" '$8 == p { print $7 }' /proc/net/unix)
    [[ -z $inodes ]] && return 0
    local fd target ino
    for fd in /proc/[0-9]*/fd/*; do
        target=$(readlink "$fd" 2>/dev/null) || continue
        [[ $target == socket:\[*\] ]] || continue
        ino=${target#socket:[}
        ino=${ino%]}
        if grep -qxF "$ino" <<<"$inodes"; then
            fd=${fd#/proc/}
            echo "${fd%%/*}"
        fi
    done | sort -u
}

stop_varlink_helpers() {
    local who pids
    for who in "${!VARLINK_SOCK[@]}"; do
        pids=$(pids_serving "${VARLINK_SOCK[$who]}")
        # shellcheck disable=SC2086 # one pid a word
        [[ -n $pids ]] && kill $pids 2>/dev/null
        unset "VARLINK_SOCK[$who]"
    done
    return 0
}

# The reference image's layers read through cstor-helper --varlink by upstream's consumer
# (cstor-bench-varlink, see bench/README.md): protocol root|user | import (root).
varlink_case() {
    local kind=$1 who=${2:-root}
    varlink_helper "$who"
    local sock=${VARLINK_SOCK[$who]}
    if [[ $kind == protocol ]]; then
        local cmd=("$BIN/cstor-bench-varlink" --socket "$sock" --root "$XR" "$IMAGE")
        [[ $who == user ]] && cmd=(as_user "$BIN/cstor-bench-varlink" --socket "$sock" --root "$XU" "$IMAGE")
        timed "${cmd[@]}"
        if ((CASE_RC == 0)); then
            CASE_DETAILS=$(jq -c '{fds, entries, inline, inline_bytes, seconds, spawn_seconds,
                fds_per_second, entries_per_second, metadata_bytes}' "$CASE_OUT.out")
        fi
        return
    fi
    local repo=$MNT/scratch/varlink-import/repo
    fresh_repo root "$repo"
    timed "$BIN/cstor-bench-varlink" --mode import --repo "$repo" --socket "$sock" --root "$XR" "$IMAGE"
    if ((CASE_RC == 0)); then
        if ! CASE_DETAILS=$(jq -ce --argjson b "$(repo_stats "$repo")" '{reflinked, copied, hardlinked,
                present, bytes_reflinked, layers_seconds, finalize_seconds, stream_seconds: .seconds} + $b' \
            "$CASE_OUT.out"); then
            CASE_ERR="unreadable report: $(head -c 300 "$CASE_OUT.out")"
        elif ! jq -e '.reflinked > 0 and .copied == 0 and .hardlinked == 0' <<<"$CASE_DETAILS" >/dev/null; then
            CASE_ERR="upstream's drain did not reflink everything on XFS: $CASE_DETAILS"
        elif [[ $("$CFSCTL" --repo "$repo" oci images 2>&1) != *bench* ]]; then
            CASE_ERR="the tag 'bench' is not in 'cfsctl oci images'"
        fi
    fi
    rm -rf "$repo"
}

protocol_only() { # root|user
    local cmd
    if [[ $1 == root ]]; then
        cmd=("$BIN/cstor-bench-protocol" --root "$XR" --runroot "$XR_RUN" "$IMAGE")
    else
        cmd=(as_user "$BIN/cstor-bench-protocol" --root "$XU" --runroot "$XU_RUN" "$IMAGE")
    fi
    timed "${cmd[@]}"
    ((CASE_RC == 0)) && CASE_DETAILS=$(jq -c '{fds, entries, seconds, spawn_seconds, fds_per_second, entries_per_second, metadata_bytes}' "$CASE_OUT.out")
    true
}

# The cases, in the order each round runs them (tools alternate).
ALL_CASES=(
    cstor-xfs-root varlink-import-xfs-root cfsctl-xfs cstor-xfs-rootless tar-path-xfs
    cstor-ext4-root cfsctl-ext4-copy cstor-ext4-rootless cfsctl-ext4-default cstor-ext4-hardlink
    reimport-xfs-root
    limit-hash limit-read limit-reflink-parallel limit-reflink-cp
    protocol-xfs-root varlink-protocol-xfs-root protocol-xfs-rootless varlink-protocol-xfs-rootless
    copy-xfs cfsctl-copy-xfs cfsctl-copy-xfs-zerocopy
    push-xfs
    ostree-cstor-xfs ostree-cfsctl-xfs ostree-reimport-xfs
)
run_case() {
    case $1 in
    cstor-xfs-root) cstor_import root xfs ;;
    cstor-xfs-rootless) cstor_import user xfs ;;
    cstor-ext4-root) cstor_import root ext4 ;;
    cstor-ext4-rootless) cstor_import user ext4 ;;
    cstor-ext4-hardlink) cstor_import root ext4 hardlink ;;
    reimport-xfs-root) cstor_import root xfs reimport ;;
    cfsctl-xfs) cfsctl_pull xfs default ;;
    cfsctl-ext4-default) cfsctl_pull ext4 default ;;
    cfsctl-ext4-copy) cfsctl_pull ext4 copy ;;
    tar-path-xfs) tar_path ;;
    limit-hash) limit_read hash ;;
    limit-read) limit_read read ;;
    limit-reflink-parallel) limit_reflink parallel ;;
    limit-reflink-cp) limit_reflink cp ;;
    protocol-xfs-root) protocol_only root ;;
    protocol-xfs-rootless) protocol_only user ;;
    varlink-protocol-xfs-root) varlink_case protocol root ;;
    varlink-protocol-xfs-rootless) varlink_case protocol user ;;
    varlink-import-xfs-root) varlink_case import ;;
    copy-xfs) copy_case cstor ;;
    cfsctl-copy-xfs) copy_case cfsctl ;;
    cfsctl-copy-xfs-zerocopy) copy_case cfsctl-zerocopy ;;
    push-xfs) push_case ;;
    ostree-cstor-xfs) ostree_import cstor ;;
    ostree-cfsctl-xfs) ostree_import cfsctl ;;
    ostree-reimport-xfs) ostree_import reimport ;;
    *) die "unknown case $1" ;;
    esac
}

CASE=
measure() { # case mode run(0 = warm-up, not recorded)
    local c=$1 run=$3
    MODE=$2
    CASE=$c
    CASE_SECONDS= CASE_DETAILS='{}' CASE_ERR= CASE_RC=0
    CASE_OUT=$OUT/logs/$c.$MODE.$run
    local w0=$EPOCHREALTIME
    run_case "$c"
    sync # writeback of this run's data does not land in the next one
    local wall
    wall=$(awk -v a="$w0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
    local ok=true
    [[ -n $CASE_ERR ]] && ok=false
    if ((run > 0)); then
        jq -cn --arg case "$c" --arg cache "$MODE" --argjson run "$run" \
            --argjson seconds "${CASE_SECONDS:-null}" --argjson ok "$ok" --arg error "$CASE_ERR" \
            --argjson details "$CASE_DETAILS" --argjson wall "$wall" \
            '{case: $case, cache: $cache, run: $run, seconds: $seconds, ok: $ok,
              error: (if $error == "" then null else $error end), details: $details,
              wall_seconds_with_setup: $wall}' >>"$RUNS_FILE"
    fi
    local what="run $run/$RUNS"
    ((run == 0)) && what="warm-up"
    printf 'bench: %-5s %-10s %-24s %9.3f s  %s\n' "$MODE" "$what" "$c" "${CASE_SECONDS:-0}" \
        "$([[ $ok == true ]] && echo ok || echo "FAILED: $CASE_ERR")" >&2
}

# Peak RSS of the client and of the helper during an import (not timed).
rss_run() { # who fs
    local who=$1 fs=$2 g r repo tag=rss-$1-$2
    case $who-$fs in
    root-xfs) g=$XR r=$XR_RUN repo=$MNT/scratch/root/repo ;;
    user-xfs) g=$XU r=$XU_RUN repo=$MNT/scratch/user/repo ;;
    root-ext4) g=$ER r=$ER_RUN repo=$SCRATCH_EXT4/root/repo ;;
    esac
    local dir=$OUT/rss/$tag
    mkdir -p "$dir"
    [[ $who == user ]] && chown "$USER_NAME:" "$dir"
    chmod 755 "$OUT/rss"
    local wrapper=$dir/helper
    printf '#!/bin/sh\nexec /usr/bin/time -v -o %q %q "$@"\n' "$dir/helper.time" "$BIN/cstor-helper" >"$wrapper"
    chmod 755 "$wrapper"
    fresh_repo "$who" "$repo"
    # The pid written is that of /usr/bin/time (exec); the client is its child.
    local cmd=(bash -c 'echo $$ > "$1"; exec /usr/bin/time -v -o "$2" "${@:3}"' bash
        "$dir/client.pid" "$dir/client.time" "$BIN/cstor" import --helper "$wrapper" --root "$g" --runroot "$r"
        --storage-driver overlay --json --repo "$repo" "$IMAGE")
    [[ $who == user ]] && cmd=(as_user "${cmd[@]}")
    rm -f "$dir/client.pid"
    "${cmd[@]}" >"$dir/report.json" 2>"$dir/stderr" &
    local bg=$! pid= hwm=0 k v rest
    while [[ ! -s $dir/client.pid ]] && kill -0 "$bg" 2>/dev/null; do sleep 0.01; done
    pid=$(cat "$dir/client.pid" 2>/dev/null || true)
    # /usr/bin/time forks: the client is the child of the pid written above.
    local child=
    while [[ -n $pid && -z $child ]] && kill -0 "$bg" 2>/dev/null; do
        child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null | awk '{print $1}')
        [[ -z $child ]] && sleep 0.005
    done
    while [[ -n $child && -r /proc/$child/status ]]; do
        while read -r k v rest; do
            [[ $k == VmHWM: ]] && ((v > hwm)) && hwm=$v
        done <"/proc/$child/status" 2>/dev/null || true
        sleep 0.02
    done
    local rc=0
    wait "$bg" || rc=$?
    local err=
    ((rc == 0)) || err="exit status $rc: $(tail -c 400 "$dir/stderr")"
    local tree helper
    tree=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$dir/client.time" 2>/dev/null || true)
    helper=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$dir/helper.time" 2>/dev/null || true)
    jq -cn --arg case "$tag" --argjson client "${hwm:-0}" --argjson tree "${tree:-null}" \
        --argjson helper "${helper:-null}" --arg error "$err" \
        '{case: $case, client_vmhwm_kib: $client, client_tree_maxrss_kib: $tree, helper_maxrss_kib: $helper,
          ok: ($error == "" and $helper != null and $client > 0), error: (if $error == "" then null else $error end)}' >>"$OUT/rss.jsonl"
    log "rss   $tag: client VmHWM $((hwm / 1024)) MiB, client+children max $((${tree:-0} / 1024)) MiB, helper $((${helper:-0} / 1024)) MiB${err:+ FAILED: $err}"
    rm -rf "$repo"
}

machine_json() {
    local cpu mem
    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ {print $2}' /proc/meminfo)
    jq -n --arg cpu "$cpu" --argjson cores "$(nproc)" --argjson mem_kib "$mem" \
        --arg kernel "$(uname -r)" --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
        --arg xfs "XFS on $LOOP_IMG via loop (direct-io $LOOP_DIRECT_IO), $(df -h --output=size "$MNT" | tail -1 | tr -d ' '), reflink=$(xfs_info "$MNT" | grep -o 'reflink=[01]' | head -1 | cut -d= -f2)" \
        --arg ext4 "$(findmnt -no FSTYPE,SOURCE --target "$EXT4" | tr -s ' ') ($EXT4)" \
        --arg load_start "$LOAD_START" --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
        --arg commit "$(git -C "$SRC_DIR" rev-parse HEAD 2>/dev/null || echo unknown)" \
        --argjson dirty "$(git -C "$SRC_DIR" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo true || echo false)" \
        --arg cstor "$("$BIN/cstor" --version 2>&1 | head -1)" \
        --arg podman "$(podman --version)" --arg skopeo "$(skopeo --version)" \
        --arg cfsctl "$("$CFSCTL" --version 2>&1 | head -1)" --arg kernel_full "$(uname -a)" \
        --arg image "$IMAGE" --argjson image_info "$IMAGE_INFO" \
        --argjson runs "$RUNS" --arg modes "$MODES" --arg date "$(date -Is)" \
        '{date: $date, machine: {cpu: $cpu, cores: $cores, mem_kib: $mem_kib, kernel: $kernel, uname: $kernel_full, os: $os,
          filesystems: {xfs: $xfs, ext4: $ext4}, loadavg_start: $load_start, loadavg_end: $load_end},
          versions: {cstor_commit: $commit, cstor_tree_dirty: $dirty, cstor: $cstor, podman: $podman, skopeo: $skopeo, cfsctl: $cfsctl},
          image: ({name: $image} + $image_info), settings: {runs: $runs, modes: $modes}}'
}

# ---- main -----------------------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
need_tools
take_run_lock
chmod 755 "$CACHE"
build_binaries
ensure_cfsctl
ensure_reference_tars
mount_xfs
ensure_user
set_storages
ensure_image root "$XR" "$XR_RUN"
ensure_image user "$XU" "$XU_RUN"
ensure_image root "$ER" "$ER_RUN"
ensure_image user "$EU" "$EU_RUN"

# The layers' diff dirs (XFS, root storage), base first.
IFS=: read -r -a DIFFS <<<"$("${ROOT_XFS_P[@]}" image inspect --format '{{.GraphDriver.Data.LowerDir}}:{{.GraphDriver.Data.UpperDir}}' "$IMAGE" | sed 's/^://')"
[[ ${#DIFFS[@]} == 2 ]] || die "expected 2 diff dirs, got: ${DIFFS[*]}"
IMAGE_INFO=$(jq -cs '{files: .[0].files, bytes: .[0].bytes, dirs: .[0].dirs}' <("$BIN/cstor-bench-read" "${DIFFS[@]}"))
log "reference image: $IMAGE, $(jq -r '"\(.files) files, \(.bytes / 1e6 | floor) MB"' <<<"$IMAGE_INFO") in 2 layers"

# cfsctl 0.9.4 has no option to copy: `--local-fetch auto` tries reflink, then a hardlink
# (which needs CAP_DAC_READ_SEARCH), then copies. Without that capability (still uid 0 with
# CAP_DAC_OVERRIDE, so still its direct, rootful path) it copies.
"$CFSCTL" oci pull --help 2>&1 | grep -q -- '--local-fetch' ||
    die "cfsctl oci pull has no --local-fetch option (expected composefs-ctl $CFSCTL_VERSION)"

SELECTED=()
for c in "${ALL_CASES[@]}"; do [[ $c =~ $CASES ]] && SELECTED+=("$c"); done
((${#SELECTED[@]})) || die "BENCH_CASES='$CASES' selects no case (cases: ${ALL_CASES[*]})"

[[ ${SELECTED[*]} == *ostree-* ]] && ensure_ostree_repo

mkdir -p "$OUT/logs"
RUNS_FILE=$OUT/runs.jsonl
: >"$RUNS_FILE"
: >"$OUT/rss.jsonl"
SCRATCH_EXT4=$CACHE/scratch
rm -rf "$SCRATCH_EXT4" "$MNT/scratch"
mkdir -p "$SCRATCH_EXT4" "$MNT/scratch"
chmod 755 "$SCRATCH_EXT4" "$MNT/scratch"
log "cases: ${SELECTED[*]}; $RUNS runs, modes: $MODES; results in $OUT"

T_START=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'; }
for mode in $MODES; do
    if [[ $mode == warm && $WARMUP == 1 ]]; then
        # Warm-up: every case once, unrecorded (this also fills the page cache).
        t=$EPOCHREALTIME
        for c in "${SELECTED[@]}"; do measure "$c" warm 0; done
        log "warm-up took $(since "$t") s"
    fi
    for ((run = 1; run <= RUNS; run++)); do
        t=$EPOCHREALTIME
        for c in "${SELECTED[@]}"; do measure "$c" "$mode" "$run"; done
        log "$mode round $run took $(since "$t") s"
    done
done
if [[ cstor-xfs-root =~ $CASES ]]; then
    for ((i = 1; i <= RSS_RUNS; i++)); do
        rss_run root xfs
        rss_run user xfs
        rss_run root ext4
    done
fi
if [[ -n $PUSH_SVC_PID ]]; then
    kill "$PUSH_SVC_PID" 2>/dev/null || true
    wait "$PUSH_SVC_PID" 2>/dev/null || true
    PUSH_SVC_PID=
fi
stop_varlink_helpers
rm -rf "$MNT/scratch" "$SCRATCH_EXT4"
# Upstream's hardlinks on ext4 share inodes with podman's files: check the storage still
# verifies (nothing modified it).
VERIFY_EXT4=$("$BIN/cstor" verify --root "$ER" --runroot "$ER_RUN" --storage-driver overlay "$IMAGE" >/dev/null 2>&1 && echo true || echo false)
log "measurements took $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"

machine_json | jq --argjson v "$VERIFY_EXT4" '. + {ext4_storage_verifies_after_upstream: $v}' >"$OUT/machine.json"
/usr/bin/python3 "$BENCH_DIR/report.py" "$OUT"
