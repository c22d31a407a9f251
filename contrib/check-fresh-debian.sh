#!/usr/bin/env bash
# Checks the README's set-up on a minimal Debian 12, as a new user would meet it: a
# `debootstrap --variant=minbase bookworm` chroot that has nothing but Debian's required
# packages and this machine's Rust toolchain (bind-mounted read-only), in which a fresh clone
# of the project at COMMIT runs exactly
#
#     ./contrib/install-deps.sh && cargo build --release --locked
#
# and then the built `cstor --version` and `cstor images` on an empty store, with the helper
# found beside it.
#
# Usage (as root; needs debootstrap, git and unshare):
#
#     contrib/check-fresh-debian.sh [CACHE_DIR] [COMMIT]
#
# CACHE_DIR (default /var/cache/cstor-minbase) keeps the minbase root file system as a
# tarball, made once (about a minute), and a cargo home seeded from this machine's crate
# cache, so a rerun downloads no Debian base system and few crates. Each run unpacks the
# tarball into a new directory under CACHE_DIR and removes it at the end. COMMIT (default
# HEAD) is any commit of the repository this script belongs to; uncommitted changes are not
# part of the check. The mirror is http://deb.debian.org/debian unless CSTOR_DEBIAN_MIRROR
# says otherwise; the chroot uses this machine's /etc/apt and /etc/resolv.conf, and trusts its
# local CA certificates. With CSTOR_FRESH_DEBIAN_CRATES=download the chroot starts with an
# empty cargo home and downloads every crate from crates.io.
#
# Everything runs in a private mount namespace, so the mounts it makes (proc, sys, dev, the
# toolchain, the cargo home) are invisible outside it; an exit trap unmounts them all, and it
# never unmounts anything it did not mount.
set -euo pipefail

prog=check-fresh-debian.sh
die() {
    echo "$prog: $*" >&2
    exit 1
}
note() { echo "== $*"; }

script=$(readlink -f "${BASH_SOURCE[0]}")
repo=$(cd "$(dirname "$script")/.." && pwd)
cache=${1:-/var/cache/cstor-minbase}
commit_arg=${2:-HEAD}
mirror=${CSTOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
host_rustup=${RUSTUP_HOME:-$HOME/.rustup}
host_cargo=${CARGO_HOME:-$HOME/.cargo}

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and mount need it)"
for tool in debootstrap git unshare chroot mount umount findmnt tar; do
    command -v "$tool" >/dev/null ||
        die "$tool not found; install it (contrib/install-deps.sh installs debootstrap and git)"
done
[ -x "$host_cargo/bin/cargo" ] ||
    die "no Rust toolchain at $host_cargo/bin/cargo (set CARGO_HOME and RUSTUP_HOME if it lives elsewhere)"
[ -d "$host_rustup/toolchains" ] || die "no rustup toolchains under $host_rustup (set RUSTUP_HOME)"

# From here on, mounts stay in a mount namespace of our own.
if [ "${CSTOR_FRESH_DEBIAN_IN_NS:-}" != 1 ]; then
    exec unshare --mount --propagation private \
        env CSTOR_FRESH_DEBIAN_IN_NS=1 "$script" "$cache" "$commit_arg"
fi

commit=$(git -C "$repo" rev-parse --verify --quiet "$commit_arg^{commit}") ||
    die "$commit_arg is not a commit of $repo"
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
tarball=$cache/bookworm-minbase.tar.gz

start=$(date +%s)
if [ ! -f "$tarball" ]; then
    note "debootstrap --variant=minbase bookworm (once; kept as $tarball)"
    base=$(mktemp -d "$cache/debootstrap.XXXXXX")
    # debootstrap mounts proc and sys in the target while it works; in our namespace.
    if ! debootstrap --variant=minbase bookworm "$base" "$mirror" >"$cache/debootstrap.log" 2>&1; then
        tail -n 20 "$cache/debootstrap.log" >&2
        die "debootstrap failed (log: $cache/debootstrap.log)"
    fi
    [ -z "$(findmnt -rn -o TARGET | awk -v d="$base" 'index($0, d "/") == 1')" ] ||
        die "debootstrap left mounts under $base; not packing it"
    rm -f "$base"/var/cache/apt/archives/*.deb
    tar --numeric-owner --xattrs -C "$base" -czf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$base"
fi

root=$(mktemp -d "$cache/root.XXXXXX")
mounted=()
cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -R "${mounted[i]}" 2>/dev/null || umount -R -l "${mounted[i]}" ||
            echo "$prog: could not unmount ${mounted[i]}" >&2
    done
    if findmnt -rn -o TARGET | awk -v d="$root" 'index($0, d "/") == 1' | grep -q .; then
        echo "$prog: something is still mounted under $root; leaving it in place" >&2
    else
        rm -rf "$root"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bind SRC DST [mount options...]: mounts SRC at DST inside the chroot (a bind mount, or
# with -t any file system) and records it for cleanup.
bind() {
    local src=$1 dst=$root$2
    shift 2
    mkdir -p "$dst"
    mount "$@" "$src" "$dst"
    mounted+=("$dst")
}

note "unpacking the minbase root file system into $root"
tar --numeric-owner --xattrs -C "$root" -xzf "$tarball"
chmod 755 "$root" # mktemp made it 0700; as / it must let apt's _apt user in
# This machine's mirrors, keys and apt settings replace debootstrap's sources.list.
rm -f "$root/etc/apt/sources.list"
cp -a /etc/apt/. "$root/etc/apt/"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# Local CA certificates of this machine (a TLS-inspecting proxy's, say): the chroot's
# ca-certificates package, once install-deps.sh installs it, trusts them too.
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
# No service may start inside the chroot (podman's and others' postinst scripts ask).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

note "cloning $repo at $commit"
git clone --quiet --no-checkout "$repo" "$root/src/cstor-proxy"
git -C "$root/src/cstor-proxy" -c advice.detachedHead=false checkout --quiet --detach "$commit"

# A cargo home of our own, seeded once with this machine's downloaded crates; or, with
# CSTOR_FRESH_DEBIAN_CRATES=download, an empty one, so that cargo downloads every crate the
# way a new user's does (and needs the CA certificates install-deps.sh brings).
if [ "${CSTOR_FRESH_DEBIAN_CRATES:-cached}" = download ]; then
    cargo_home=$root/root/.cargo-home-empty
    mkdir -p "$cargo_home"
else
    cargo_home=$cache/cargo-home
fi
if [ ! -d "$cargo_home/registry" ] && [ "${CSTOR_FRESH_DEBIAN_CRATES:-cached}" != download ]; then
    mkdir -p "$cargo_home/registry"
    for d in index cache; do
        if [ -d "$host_cargo/registry/$d" ]; then
            cp -a "$host_cargo/registry/$d" "$cargo_home/registry/"
        fi
    done
fi

bind proc /proc -t proc
bind /sys /sys --rbind
bind /dev /dev --rbind
bind "$host_rustup" /opt/rust/rustup --bind -o ro
bind "$host_cargo" /opt/rust/cargo --bind -o ro
bind "$cargo_home" /opt/rust/cargo-home --bind
mkdir -p "$root/tmp/empty-store/root" "$root/tmp/empty-store/run"

in_chroot() {
    chroot "$root" /usr/bin/env -i \
        HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/opt/rust/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        RUSTUP_HOME=/opt/rust/rustup CARGO_HOME=/opt/rust/cargo-home \
        CARGO_TARGET_DIR=/build/target \
        ${CARGO_BUILD_JOBS:+CARGO_BUILD_JOBS=$CARGO_BUILD_JOBS} \
        /bin/bash -c "$1"
}

note "inside: ./contrib/install-deps.sh"
t0=$(date +%s)
in_chroot 'cd /src/cstor-proxy && ./contrib/install-deps.sh'
t1=$(date +%s)
note "inside: cargo build --release --locked"
in_chroot 'cd /src/cstor-proxy && cargo build --release --locked'
t2=$(date +%s)
note "inside: the built cstor runs and finds its helper"
in_chroot 'set -e
    /build/target/release/cstor --version
    /build/target/release/cstor images --root /tmp/empty-store/root --runroot /tmp/empty-store/run --json'
note "passed: install-deps.sh $((t1 - t0)) s, cargo build --release $((t2 - t1)) s, $(($(date +%s) - start)) s in all"
