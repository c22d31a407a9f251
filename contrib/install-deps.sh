#!/usr/bin/env bash
# Installs what building, running and testing cstor-proxy needs on Debian 12, as root, on a
# machine that has only a Rust toolchain (rustup, cargo): it installs only the packages that
# are missing, and prints nothing when none are. contrib/check-fresh-debian.sh checks that
# this list is complete on a minimal Debian (debootstrap --variant=minbase).
set -euo pipefail

prog=install-deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "$prog: run as root (it uses apt-get)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    echo "$prog: apt-get not found; this script is for Debian 12 (install the equivalents of" \
        "the packages it lists by hand)" >&2
    exit 1
fi

packages=(
    # Building: the C toolchain that links Rust programs (rustc calls `cc`) and compiles
    # the C code of zstd-sys, libz-sys and pcre2-sys (bundled zstd, zlib and PCRE2);
    # OpenSSL's headers and pkg-config for openssl-sys; CA certificates for cargo to
    # download crates over HTTPS.
    gcc libc6-dev pkg-config libssl-dev ca-certificates
    # Running: podman's storage and the tools around it, rootless user namespaces.
    podman skopeo buildah uidmap fuse-overlayfs runc
    # Testing: XFS and btrfs file systems on loop devices, extended attributes, the tools
    # the tests and contrib/ scripts call.
    xfsprogs btrfs-progs attr jq python3 util-linux tar gzip
    # systemd-socket-activate, for the varlink helper's socket activation test.
    systemd
    # contrib/check-fresh-debian.sh (a minimal Debian chroot of a clone), and ostree.
    debootstrap git ostree
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "$prog: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "$prog: cargo not found; install the Rust toolchain with rustup, then open a new" \
        "shell or add ~/.cargo/bin to PATH" >&2
    exit 1
fi
