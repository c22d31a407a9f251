#!/usr/bin/env python3
"""Peak memory of a process tree, for bench/scale.sh: runs a command, polls every process
it starts (children of every thread, recursively) from /proc every 20 ms, and writes one
JSON object: the command's wall time, exit status, and each process seen with its parent,
name and VmHWM (its own peak RSS, a high-water mark: only a process that lives less than a
poll interval, or growth in its last interval, can be missed).

Usage: procpeak.py OUT.json COMMAND [ARG...]   (exits with the command's status)
Standard library only.
"""

import json
import os
import signal
import subprocess
import sys
import time


def children_of(pid):
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def status_of(pid):
    name, hwm = None, None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                    break
    except OSError:
        pass
    return name, hwm


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_path, cmd = sys.argv[1], sys.argv[2:]
    seen = {}  # pid -> {pid, ppid, names (exec changes it), hwm_kib}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    # A TERM to this poller (the bench interrupted) goes to the command too.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    seen[proc.pid] = {"pid": proc.pid, "ppid": os.getpid(), "names": [], "hwm_kib": 0}
    rc = None
    while rc is None:
        stack = [proc.pid]
        while stack:
            pid = stack.pop()
            name, hwm = status_of(pid)
            rec = seen.get(pid)
            if rec is not None and name is not None:
                if name not in rec["names"]:
                    rec["names"].append(name)
                if hwm is not None and hwm > rec["hwm_kib"]:
                    rec["hwm_kib"] = hwm
            for c in children_of(pid):
                if c not in seen:
                    seen[c] = {"pid": c, "ppid": pid, "names": [], "hwm_kib": 0}
                stack.append(c)
        rc = proc.poll()
        if rc is None:
            time.sleep(0.02)
            rc = proc.poll()
    seconds = time.monotonic() - t0
    with open(out_path, "w") as f:
        json.dump({"seconds": round(seconds, 6), "rc": rc, "procs": list(seen.values())}, f)
    sys.exit(rc if rc >= 0 else 128 - rc)


if __name__ == "__main__":
    main()
