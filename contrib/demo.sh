#!/usr/bin/env bash
# The main job on a small built-in sample: builds cstor, makes a sample image in a private
# podman storage (target/demo), then lists, inspects and verifies it through cstor-helper and
# shows the --stdio debug mode. Run as root on Debian 12 (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./contrib/install-deps.sh
cargo build --workspace --bins --release --locked
bin=$PWD/target/release
demo=$PWD/target/demo
root=$demo/root
# podman refuses run roots longer than 50 characters.
run=/run/cstor-demo
mkdir -p "$demo" "$run"
podman_() { podman --root "$root" --runroot "$run" --storage-driver overlay "$@"; }

if ! podman_ image exists localhost/cstor-demo:latest 2>/dev/null; then
    echo "== building the sample image localhost/cstor-demo:latest in $root"
    rootfs=$demo/rootfs
    rm -rf "$rootfs" && mkdir -p "$rootfs"/{etc,usr/bin,srv/private,var/empty}
    echo "cstor demo" > "$rootfs/etc/motd"
    printf '#!/bin/sh\necho hello from cstor\n' > "$rootfs/usr/bin/hello" && chmod 755 "$rootfs/usr/bin/hello"
    ln -s hello "$rootfs/usr/bin/hi"
    ln "$rootfs/etc/motd" "$rootfs/etc/motd.hardlink"
    echo "secret" > "$rootfs/srv/private/key" && chmod 600 "$rootfs/srv/private/key" && chmod 700 "$rootfs/srv/private"
    chown -R 1000:1000 "$rootfs/srv/private"
    head -c 5000000 /dev/urandom > "$rootfs/srv/blob.bin"
    touch "$rootfs/$(printf 'caf\xe9.txt')"
    setfattr -n user.demo -v yes "$rootfs/etc/motd"
    tar --xattrs --xattrs-include='*' --numeric-owner -C "$rootfs" -cf "$demo/rootfs.tar" .
    podman_ import --quiet "$demo/rootfs.tar" localhost/cstor-demo-base:latest
    # A second layer with a whiteout.
    c=$(podman_ create localhost/cstor-demo-base:latest /usr/bin/hello)
    m=$(podman_ mount "$c")
    rm "$m/etc/motd.hardlink"; echo "second layer" > "$m/etc/issue"
    podman_ umount "$c" >/dev/null
    podman_ commit --quiet "$c" localhost/cstor-demo:latest >/dev/null
    podman_ rm "$c" >/dev/null
fi

cstor="$bin/cstor"
storage=(--root "$root" --runroot "$run")
echo "== cstor images"
"$cstor" images "${storage[@]}"
echo "== cstor inspect localhost/cstor-demo"
"$cstor" inspect "${storage[@]}" localhost/cstor-demo
echo "== cstor verify localhost/cstor-demo (rebuilds every layer, checks CRCs and diff ids)"
"$cstor" verify "${storage[@]}" localhost/cstor-demo
echo "== cstor layer-tar localhost/cstor-demo 0 -o layer0.tar; tar -tvf layer0.tar"
"$cstor" layer-tar "${storage[@]}" localhost/cstor-demo 0 -o "$demo/layer0.tar"
tar -tvf "$demo/layer0.tar" | sed -n '1,8p'
echo "== the same layer, compared with skopeo's export"
rm -rf "$demo/oci"
skopeo copy --quiet "containers-storage:[overlay@$root+$run]localhost/cstor-demo:latest" "oci:$demo/oci" --dest-oci-accept-uncompressed-layers
podman_ images -q >/dev/null  # skopeo 1.9 leaves a bind mount until the next podman command
for i in 0 1; do
    want=$(jq -r ".layers[$i].digest" "$demo/oci/blobs/sha256/$(jq -r '.manifests[0].digest' "$demo/oci/index.json" | cut -d: -f2)")
    got="sha256:$("$cstor" layer-tar "${storage[@]}" localhost/cstor-demo $i | sha256sum | cut -d' ' -f1)"
    echo "layer $i: skopeo $want, cstor $got"
    [ "$want" = "$got" ]
done
echo "== cstor-helper --stdio"
echo '{"jsonrpc":"2.0","id":1,"method":"ListImages"}' | "$bin/cstor-helper" --stdio --root "$root" --runroot "$run"

echo "== cstor import into a composefs repository on the same ext4 (no reflinks: copies)"
rm -rf "$demo/repo"
"$cstor" import "${storage[@]}" --init --repo "$demo/repo" localhost/cstor-demo
echo "== importing again: every layer is already there"
"$cstor" import "${storage[@]}" --repo "$demo/repo" localhost/cstor-demo
echo "== mounting the imported image"
mkdir -p "$demo/mnt"
"$cstor" mount --repo "$demo/repo" containers-storage:localhost/cstor-demo "$demo/mnt"
ls -la "$demo/mnt" "$demo/mnt/srv"
umount "$demo/mnt"

echo "== zero-copy: storage and repository on one XFS filesystem (a loop device)"
xfs=$demo/xfs
cleanup() {
    umount "$xfs" 2>/dev/null || true
    [ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$xfs"
rm -f "$demo/xfs.img" && truncate -s 2G "$demo/xfs.img"
loopdev=$(losetup -f --show "$demo/xfs.img")
mkfs.xfs -q "$loopdev" && mount "$loopdev" "$xfs"
xrun=/run/cstor-demo-xfs
podman --root "$xfs/storage" --runroot "$xrun" --storage-driver overlay import --quiet "$demo/rootfs.tar" localhost/cstor-demo:latest >/dev/null
"$cstor" import --root "$xfs/storage" --runroot "$xrun" --init --repo "$xfs/repo" localhost/cstor-demo
podman --root "$xfs/storage" --runroot "$xrun" rmi -a -f >/dev/null
cleanup
trap - EXIT
echo "== demo done"
