#!/usr/bin/env bash
# Checks the minimum supported Rust version that Cargo.toml states (rust-version) without
# that old toolchain, with the toolchain at hand:
#
# 1. no dependency that the workspace crates build with (normal and build dependencies,
#    transitively, for this machine's target; dev-dependencies are not part of the promise)
#    declares a rust-version newer than the crate that pulls it in;
# 2. clippy's incompatible_msrv lint, denied, finds no use of a standard library API that
#    became stable after rust-version.
#
# What neither can see: language features newer than rust-version that the code uses
# (clippy knows the stability of library items, not of syntax). A dependency that declares no
# rust-version is listed, not judged.
#
# Usage: contrib/check-msrv.sh   (from any directory; needs cargo and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
prog=check-msrv.sh
for tool in cargo rustc python3; do
    command -v "$tool" >/dev/null || {
        echo "$prog: $tool not found (contrib/install-deps.sh installs python3)" >&2
        exit 1
    }
done

host=$(rustc -vV | sed -n 's/^host: //p')
echo "== rust-version of the dependencies (normal and build, for $host)"
metadata=$(mktemp)
trap 'rm -f "$metadata"' EXIT
cargo metadata --format-version 1 --locked --filter-platform "$host" >"$metadata"
failed=0
python3 - "$metadata" <<'EOF' || failed=1
import json
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.load(open(sys.argv[1]))
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}


def name(pid):
    p = packages[pid]
    return f"{p['name']} {p['version']}"


too_new = {}  # dependency -> (its rust-version, {member: member's}, one path to it)
undeclared = set()
for member in meta["workspace_members"]:
    ours = packages[member].get("rust_version")
    if ours is None:
        print(f"{name(member)}: a workspace crate that declares no rust-version", file=sys.stderr)
        sys.exit(1)
    # Breadth-first over normal and build edges, remembering how each crate was reached.
    via = {member: None}
    queue = [member]
    while queue:
        pid = queue.pop(0)
        for dep in nodes[pid]["deps"]:
            if not any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
                continue
            if dep["pkg"] not in via:
                via[dep["pkg"]] = pid
                queue.append(dep["pkg"])
    for pid in via:
        if pid in meta["workspace_members"]:
            continue
        theirs = packages[pid].get("rust_version")
        if theirs is None:
            undeclared.add(name(pid))
        elif version(theirs) > version(ours):
            chain = [pid]
            while via[chain[-1]] is not None:
                chain.append(via[chain[-1]])
            entry = too_new.setdefault(pid, (theirs, {}, " <- ".join(name(c) for c in chain)))
            entry[1][packages[member]["name"]] = ours

print(f"{len(undeclared)} dependencies declare no rust-version:", ", ".join(sorted(undeclared)))
if too_new:
    for pid, (theirs, members, path) in sorted(too_new.items(), key=lambda kv: name(kv[0])):
        said = ", ".join(f"{m} {v}" for m, v in sorted(members.items()))
        print(f"{name(pid)} needs Rust {theirs}, newer than {said} ({path})", file=sys.stderr)
    least = max((version(t) for t, _, _ in too_new.values()))
    print("check-msrv.sh: raise rust-version in Cargo.toml to at least "
          + ".".join(map(str, least)) + " (or choose older dependencies)", file=sys.stderr)
    sys.exit(1)
declared = sorted({packages[m]["rust_version"] for m in meta["workspace_members"]})
print(f"ok: no dependency needs a newer Rust than {', '.join(declared)}")
EOF

echo "== cargo clippy, incompatible_msrv denied"
if cargo clippy --workspace --all-targets --all-features --locked --quiet -- \
    -D clippy::incompatible_msrv; then
    echo "ok: no standard library API newer than rust-version"
else
    echo "$prog: clippy found code newer than rust-version (or did not build)" >&2
    failed=1
fi
exit "$failed"
