# cstor-proxy benchmark library: the setup and checks bench/run.sh and bench/scale.sh share
# (logging, the rootless user's shell, tools, the cached upstream cfsctl, the XFS loop mount,
# fresh repositories and upstream's import checks, the run lock). Sourced, not run; the
# caller sets CACHE, USER_NAME, CFSCTL, CFSCTL_ROOT, CFSCTL_VERSION, LOOP_IMG, MNT, XFS_SIZE
# and LOOP_DIRECT_IO first.
# shellcheck shell=bash


log() { printf '%s\n' "bench: $*" >&2; }
die() { log "error: $*"; exit 1; }
trap 'rc=$?; [[ $BASHPID == "$$" ]] && log "error: line $LINENO: \"$BASH_COMMAND\" failed (status $rc)"' ERR

USER_HOME=
USER_UID=
as_user() {
    # XDG_RUNTIME_DIR: podman's own fallback, explicit because podman 4.3's rootless commit
    # with --root/--runroot fails with "runroot must be set" without it.
    (cd / && runuser -u "$USER_NAME" -- env -i HOME="$USER_HOME" USER="$USER_NAME" \
        LOGNAME="$USER_NAME" LANG=C.UTF-8 RUST_BACKTRACE=0 XDG_RUNTIME_DIR="/tmp/podman-run-$USER_UID" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@")
}
user_dir() { mkdir -p "$@" && chown "$USER_NAME:" "$@"; }
drop_caches() { sync && echo 3 >/proc/sys/vm/drop_caches; }

need_tools() {
    local -A pkg=([podman]=podman [skopeo]=skopeo [debootstrap]=debootstrap [mkfs.xfs]=xfsprogs [ostree]=ostree
        [jq]=jq [newuidmap]=uidmap [runuser]=util-linux [python3]=python3 [findmnt]=util-linux)
    local missing=()
    for t in "${!pkg[@]}"; do command -v "$t" >/dev/null || missing+=("${pkg[$t]}"); done
    [[ -x /usr/bin/time ]] || missing+=(time)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    command -v cargo >/dev/null || die "cargo not found (a Rust toolchain is needed)"
}

ensure_cfsctl() {
    if [[ -x $CFSCTL ]] && "$CFSCTL" --version 2>/dev/null | grep -q "$CFSCTL_VERSION"; then
        return
    fi
    log "installing composefs-ctl $CFSCTL_VERSION from crates.io into $CFSCTL_ROOT (about 7 minutes, once)"
    cargo install --locked --quiet composefs-ctl --version "$CFSCTL_VERSION" --root "$CFSCTL_ROOT"
    [[ -x $CFSCTL ]] || die "cargo install did not produce $CFSCTL"
}

# Mounts the XFS loop image $LOOP_IMG (made once: sparse, $XFS_SIZE, reflink=1) on $MNT;
# sets CREATED_LOOP and CREATED_MOUNT to what this run attached and mounted.
CREATED_LOOP=
CREATED_MOUNT=
mount_xfs() {
    mkdir -p "$MNT"
    if mountpoint -q "$MNT"; then
        local src back
        src=$(findmnt -no SOURCE "$MNT")
        back=$(losetup -nO BACK-FILE "$src" 2>/dev/null || true)
        [[ $back == "$LOOP_IMG" ]] || die "$MNT is mounted from $src ($back), not from $LOOP_IMG"
        log "reusing the XFS mount at $MNT ($src), mounted by someone else: it stays mounted"
        return
    fi
    if [[ ! -e $LOOP_IMG ]]; then
        log "creating the XFS image $LOOP_IMG ($XFS_SIZE, sparse)"
        truncate -s "$XFS_SIZE" "$LOOP_IMG.partial"
        mkfs.xfs -q -m reflink=1 "$LOOP_IMG.partial"
        mv "$LOOP_IMG.partial" "$LOOP_IMG"
    fi
    local loop
    loop=$(losetup -nO NAME -j "$LOOP_IMG" | head -1)
    if [[ -n $loop ]]; then
        # Left by an earlier run: its mount lives on in a mount namespace made while it was
        # mounted (e.g. another user's rootless pause process), which keeps the device. A second
        # loop device on the same image would be refused (duplicate XFS UUID): reuse it.
        log "reusing $loop, still attached to $LOOP_IMG"
        losetup --direct-io="$LOOP_DIRECT_IO" "$loop" 2>/dev/null || true
    else
        loop=$(losetup -f --show --direct-io="$LOOP_DIRECT_IO" "$LOOP_IMG" 2>/dev/null) ||
            loop=$(losetup -f --show "$LOOP_IMG")
    fi
    CREATED_LOOP=$loop
    mount "$loop" "$MNT"
    CREATED_MOUNT=$MNT
    chmod 755 "$CACHE" "$MNT"
    log "mounted $LOOP_IMG on $MNT ($loop, direct-io $(losetup -nO DIO "$loop" | tr -d ' '))"
}

# Detaches the loop device this run attached (cleanup, after unmounting).
detach_created_loop() {
    if [[ -n $CREATED_LOOP ]]; then
        log "detaching $CREATED_LOOP"
        losetup -d "$CREATED_LOOP"
        sleep 0.2
        if losetup "$CREATED_LOOP" >/dev/null 2>&1; then
            local holders
            holders=$(grep -l " $CREATED_LOOP " /proc/[0-9]*/mountinfo 2>/dev/null |
                cut -d/ -f3 | head -5 | xargs -r ps -o pid=,user:24=,comm= -p | tr -s ' \n' ' ;' | sed 's/;$//')
            log "note: $CREATED_LOOP stays attached (autoclear) while other mount namespaces still hold the mount: ${holders:-unknown}; the next run reuses it"
        fi
    fi
}

# A fresh repository (cfsctl init --insecure, outside the timing) for root or the user.
fresh_repo() {
    local who=$1 path=$2
    rm -rf "$path"
    if [[ $who == root ]]; then
        mkdir -p "$(dirname "$path")"
        "$CFSCTL" --repo "$path" init --insecure >/dev/null
    else
        user_dir "$(dirname "$path")"
        as_user "$CFSCTL" --repo "$path" init --insecure >/dev/null
    fi
}

repo_stats() { # path -> json {repo_objects, repo_objects_hardlinked}
    find "$1/objects" -type f -printf '%n\n' 2>/dev/null |
        awk '{ n++; if ($1 > 1) l++ } END { printf "{\"repo_objects\": %d, \"repo_objects_hardlinked\": %d}\n", n, l }'
}

# An upstream import succeeded: it said so ("tagged bench", its object counts), the tag is
# listed, objects were written. Adds its counts to CASE_DETAILS.
check_cfsctl_repo() {
    local repo=$1 n line images counts
    n=$(jq -r .repo_objects <<<"$CASE_DETAILS")
    line=$(grep -m1 '^objects ' "$CASE_OUT.out" || true)
    # "objects  48292 reflinked + 0 copied + 4884 already present objects; ..." or, without
    # zero-copy, "objects  48292 new + 4884 already present objects; ...".
    counts=$(sed 's/;.*//' <<<"$line" | grep -oE '[0-9]+ (reflinked|hardlinked|copied|new|already present)' |
        jq -Rn '[inputs | capture("(?<n>[0-9]+) (?<k>.*)") | {key: ("upstream_" + (.k | gsub(" "; "_"))), value: (.n | tonumber)}] | from_entries')
    CASE_DETAILS=$(jq -c --argjson c "$counts" '. + $c' <<<"$CASE_DETAILS")
    images=$("$CFSCTL" --repo "$repo" oci images 2>&1 || true)
    if ((n < 100)); then
        CASE_ERR="only $n objects in the repository"
    elif ! grep -q '^tagged *bench' "$CASE_OUT.out"; then
        CASE_ERR="cfsctl did not say 'tagged bench'"
    elif [[ $images != *bench* ]]; then
        CASE_ERR="the tag 'bench' is not in 'cfsctl oci images': ${images:0:200}"
    fi
}

# One run at a time: runs share the cache's XFS images, storages and binaries.
take_run_lock() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.run.lock"
    if ! flock -n 9; then
        log "another bench run holds $CACHE/.run.lock: waiting for it"
        flock 9
    fi
}
