#!/usr/bin/env bash
# Installs what building and testing cstor-proxy needs on Debian 12 (run as root).
# The Rust toolchain itself is expected to be installed (rustup, cargo).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root (it uses apt-get)" >&2
    exit 1
fi
packages=(podman skopeo buildah uidmap fuse-overlayfs xfsprogs btrfs-progs attr jq runc
          python3 util-linux tar gzip)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
