#!/usr/bin/env python3
"""Scaling series report: summarises a bench/scale.sh result directory (medians, per-file
cost, ratios to upstream like for like, peak RSS of each process, the targets of issue 18),
writes results.json there, and draws the curves as SVG (plain Python, no matplotlib):
bench/scale-time.svg (wall time and per-file cost against files) and bench/scale-rss.svg
(peak RSS against files), each with a small table of the layer-count points.

Usage: scale_report.py RESULT_DIR [--svg-dir DIR]   (DIR default: this script's directory)
Standard library only.
"""

import html
import json
import math
import os
import statistics
import sys

# What each case is, and the upstream case it is compared with like for like.
CASES = {
    "cstor-ext4-copy": ("cstor, ext4, default policy (copies)", "cfsctl-ext4-hardlink"),
    "cstor-ext4-hardlink": ("cstor, ext4, --copy-policy reflink-or-hardlink", "cfsctl-ext4-hardlink"),
    "cfsctl-ext4-hardlink": ("upstream cfsctl, ext4, root (hardlinks)", None),
    "cstor-xfs": ("cstor, XFS (reflinks)", "cfsctl-xfs"),
    "cfsctl-xfs": ("upstream cfsctl, XFS (reflinks)", None),
}
ORDER = list(CASES)
STYLE = {  # colour, dash
    "cstor-ext4-copy": ("#1f77b4", ""),
    "cstor-ext4-hardlink": ("#2ca02c", ""),
    "cstor-xfs": ("#17becf", "6,3"),
    "cfsctl-ext4-hardlink": ("#d62728", ""),
    "cfsctl-xfs": ("#ff7f0e", "6,3"),
}
RSS_LIMIT_KIB = 100e6 / 1024  # 100 MB
PER_LAYER_LIMIT_MS = 5.0  # "a few ms"


def load_jsonl(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            out = [json.loads(line) for line in f if line.strip()]
    return out


def descendants(procs, root_pid):
    kids = {}
    for p in procs:
        kids.setdefault(p["ppid"], []).append(p)
    out, stack = [], [root_pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c["pid"])
    return out


def main_proc(procs, name):
    for p in procs:
        if name in p.get("names", []):
            return p
    return None


def rss_of(run):
    """(client KiB, helper KiB, upstream KiB, upstream's child processes) of one run."""
    procs = run.get("procs") or []
    main_t = run.get("main_time_maxrss_kib")
    if run["case"].startswith("cstor"):
        helper = run.get("helper_time_maxrss_kib")
        c = main_proc(procs, "cstor")
        polled = c["hwm_kib"] if c else None
        # /usr/bin/time of the client reports the maximum over it and its reaped children
        # (the helper): it is the client's own peak only where it exceeds the helper's.
        client = polled
        if main_t is not None and helper is not None and main_t > helper:
            client = max(main_t, polled or 0)
        return client, helper, None, None
    up = main_proc(procs, "cfsctl")
    kids = []
    if up:
        kids = [
            {"names": k["names"], "hwm_kib": k["hwm_kib"]}
            for k in descendants(procs, up["pid"])
        ]
    return None, None, main_t, kids


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarise(runs):
    rows = {}
    for r in runs:
        rows.setdefault((r["point"], r["fs"], r["case"]), []).append(r)
    out = []
    for (point, fs, case), rs in rows.items():
        ok = [r for r in rs if r["ok"]]
        failed = [r for r in rs if not r["ok"]]
        rss = [rss_of(r) for r in ok]
        kids = [k for x in rss if x[3] for k in x[3]]
        row = {
            "point": point,
            "files_per_layer": rs[0]["files_per_layer"],
            "layers": rs[0]["layers"],
            "files": rs[0]["files"],
            "fs": fs,
            "case": case,
            "description": CASES.get(case, (case, None))[0],
            "runs": len(rs),
            "failed": len(failed),
            "failures": sorted({f"{r.get('failure') or 'error'}: {r.get('error')}" for r in failed}),
            "seconds": med(r["seconds"] for r in ok),
            "seconds_all": [r["seconds"] for r in ok],
            # Peaks: the largest over the runs.
            "client_rss_kib": max((x[0] for x in rss if x[0] is not None), default=None),
            "helper_rss_kib": max((x[1] for x in rss if x[1] is not None), default=None),
            "upstream_rss_kib": max((x[2] for x in rss if x[2] is not None), default=None),
            "upstream_children": sorted({"/".join(k["names"]) for k in kids}),
            "details": ok[-1]["details"] if ok else {},
        }
        row["per_file_us"] = (
            row["seconds"] / row["files"] * 1e6 if row["seconds"] is not None else None
        )
        out.append(row)
    by = {(r["point"], r["fs"], r["case"]): r for r in out}
    for r in out:
        ref = CASES.get(r["case"], (None, None))[1]
        up = by.get((r["point"], r["fs"], ref)) if ref else None
        r["upstream_case"] = ref
        r["ratio_to_upstream"] = (
            r["seconds"] / up["seconds"]
            if up and r["seconds"] is not None and up["seconds"]
            else None
        )
        if up and up["seconds"] is None and up["failed"]:
            r["upstream_failed"] = up["failures"]
    out.sort(
        key=lambda r: (r["layers"] > 1, r["files"], r["layers"], r["fs"], ORDER.index(r["case"]) if r["case"] in ORDER else 99)
    )
    return out, by


def fmt(v, digits=2):
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.0f}"


def notes_of(r):
    n = []
    if r["failed"]:
        n.append(f"{r['failed']}/{r['runs']} FAILED: " + "; ".join(f[:120] for f in r["failures"]))
    if r.get("upstream_failed"):
        n.append("upstream failed: " + "; ".join(f[:80] for f in r["upstream_failed"]))
    d = r["details"] or {}
    if r["case"].startswith("cfsctl"):
        if r["upstream_children"]:
            n.append("child processes: " + ", ".join(r["upstream_children"]))
        elif r["seconds"] is not None:
            n.append("no child process")
        if r["fs"] == "ext4" and d.get("repo_objects"):
            n.append(f"{d.get('repo_objects_hardlinked', 0)}/{d['repo_objects']} objects hardlinked")
    elif d:
        parts = [f"{d.get(k)} {k}" for k in ("copied", "hardlinked", "reflinked") if d.get(k)]
        if parts:
            n.append(", ".join(parts))
    return "; ".join(n)


def table(rows):
    head = ["point", "files", "fs", "tool / policy", "time s", "µs/file", "vs upstream",
            "client MiB", "helper MiB", "upstream MiB", "notes"]
    lines = []
    for r in rows:
        t = fmt(r["seconds"]) if r["seconds"] is not None else "FAILED"
        lines.append([
            f"{r['files_per_layer']}x{r['layers']}", f"{r['files']:,}", r["fs"], r["case"], t,
            fmt(r["per_file_us"]), fmt(r["ratio_to_upstream"]) + ("x" if r["ratio_to_upstream"] else ""),
            mib(r["client_rss_kib"]), mib(r["helper_rss_kib"]), mib(r["upstream_rss_kib"]), notes_of(r),
        ])
    return head, lines


def print_table(head, lines, out=sys.stdout):
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=out)
    for l in lines:
        print("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip(), file=out)


def markdown_table(head, lines):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for l in lines:
        out.append("| " + " | ".join(c.replace("|", "/") for c in l) + " |")
    return "\n".join(out)


def targets(by):
    """Issue 18's targets, each with pass/fail (None: not measured)."""
    out = []

    def add(name, value, ok, detail):
        out.append({"target": name, "value": value, "pass": ok, "detail": detail})

    # 1. Peak RSS of client and helper <= 100 MB at 400k and 1M files in one layer, and for
    #    500 layers x 2,000 files.
    for point in ("f400000x1", "f1000000x1", "f2000x500"):
        for fs, case in (("ext4", "cstor-ext4-copy"), ("ext4", "cstor-ext4-hardlink"), ("xfs", "cstor-xfs")):
            r = by.get((point, fs, case))
            for who, key in (("client", "client_rss_kib"), ("helper", "helper_rss_kib")):
                v = r[key] if r else None
                add(f"{who} peak RSS <= 100 MB, {point[1:]}, {case}",
                    None if v is None else f"{v * 1024 / 1e6:.1f} MB",
                    None if v is None else v <= RSS_LIMIT_KIB,
                    "not measured" if v is None else "")
    # 2. Per-file cost at 1M files within 1.2x of the per-file cost at 50k.
    for fs, case in (("ext4", "cstor-ext4-copy"), ("ext4", "cstor-ext4-hardlink"), ("xfs", "cstor-xfs"),
                     ("ext4", "cfsctl-ext4-hardlink"), ("xfs", "cfsctl-xfs")):
        a, b = by.get(("f50000x1", fs, case)), by.get(("f1000000x1", fs, case))
        ratio = (b["per_file_us"] / a["per_file_us"]
                 if a and b and a["per_file_us"] and b["per_file_us"] else None)
        upstream = case.startswith("cfsctl")
        add(f"per-file cost at 1M <= 1.2x that at 50k, {case}" + (" (upstream, for reference)" if upstream else ""),
            None if ratio is None else f"{ratio:.2f}x",
            None if ratio is None or upstream else ratio <= 1.2,
            "" if ratio is not None else "not measured (needs 50000x1 and 1000000x1)")
    # 3. At 400k files: <= 0.3x upstream like for like, and the default copies on ext4 faster
    #    than upstream's hardlinks.
    for fs, case, limit in (("ext4", "cstor-ext4-hardlink", 0.3), ("xfs", "cstor-xfs", 0.3),
                            ("ext4", "cstor-ext4-copy", 1.0)):
        r = by.get(("f400000x1", fs, case))
        v = r["ratio_to_upstream"] if r else None
        what = f"<= {limit}x upstream" if limit < 1 else "faster than upstream's hardlinks"
        add(f"400k files: {case} {what}", None if v is None else f"{v:.2f}x",
            None if v is None else (v <= limit if limit < 1 else v < 1.0),
            "" if v is not None else ("upstream failed: " + "; ".join(r.get("upstream_failed", [])) if r and r.get("upstream_failed") else "not measured"))
    # 4. No per-layer fixed cost above a few ms: the same files in 500 (50) layers of 2,000
    #    against one layer.
    for layers, one in ((500, "f1000000x1"), (50, "f100000x1")):
        for fs, case in (("ext4", "cstor-ext4-copy"), ("ext4", "cstor-ext4-hardlink"), ("xfs", "cstor-xfs"),
                         ("ext4", "cfsctl-ext4-hardlink"), ("xfs", "cfsctl-xfs")):
            a, b = by.get((one, fs, case)), by.get((f"f2000x{layers}", fs, case))
            v = ((b["seconds"] - a["seconds"]) / (layers - 1) * 1000
                 if a and b and a["seconds"] is not None and b["seconds"] is not None else None)
            upstream = case.startswith("cfsctl")
            have500 = by.get(("f2000x500", fs, case)) and by.get(("f1000000x1", fs, case))
            main = not upstream and (layers == 500 or not have500)
            add(f"per-layer fixed cost <= {PER_LAYER_LIMIT_MS:.0f} ms, {layers} x 2000 vs {one[1:]}, {case}"
                + ("" if main else " (for reference)"),
                None if v is None else f"{v:.2f} ms",
                None if v is None or not main else v <= PER_LAYER_LIMIT_MS,
                "" if v is not None else "not measured")
    return out


# ---- SVG ---------------------------------------------------------------------------------------
class Svg:
    def __init__(self, w, h):
        self.w, self.h, self.parts = w, h, []

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", rotate=None, fill="#222"):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                 f'font-weight="{weight}" fill="{fill}"{tr}>{html.escape(s)}</text>')

    def line(self, x1, y1, x2, y2, stroke="#222", width=1, dash=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" stroke-width="{width}"{d}/>')

    def render(self):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" font-family="DejaVu Sans, Arial, sans-serif">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(self.parts) + "\n</svg>\n")


def nice_ticks(lo, hi, log):
    if log:
        ticks = []
        e = math.floor(math.log10(lo))
        while 10 ** e <= hi * 1.0001:
            for m in (1, 2, 5):
                v = m * 10 ** e
                if lo * 0.9999 <= v <= hi * 1.0001:
                    ticks.append(v)
            e += 1
        return ticks
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 6:
            step *= m
            break
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi * 1.0001:
        out.append(t)
        t += step
    return out


def tick_label(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def panel(svg, x0, y0, w, h, series, title, ylabel, ylog, hline=None, failures=()):
    """series: [(label, colour, dash, [(x, y)])]; x is files (log axis 50k..1M)."""
    xlo, xhi = 40e3, 1.25e6
    ys = [y for _, _, _, pts in series for _, y in pts if y is not None]
    if hline:
        ys.append(hline[0])
    if not ys:
        ys = [1]
    if ylog == "auto":
        ylog = min(ys) > 0 and max(ys) / min(ys) > 20
    if ylog:
        ylo, yhi = min(ys) / 1.4, max(ys) * 1.4
    else:
        ylo, yhi = 0, max(ys) * 1.15
    fx = lambda x: x0 + (math.log10(x) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * w
    if ylog:
        fy = lambda y: y0 + h - (math.log10(y) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)) * h
    else:
        fy = lambda y: y0 + h - (y - ylo) / (yhi - ylo) * h
    svg.add(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>')
    svg.text(x0 + w / 2, y0 - 10, title, size=14, anchor="middle", weight="bold")
    for t in (50e3, 100e3, 200e3, 400e3, 1e6):
        svg.line(fx(t), y0, fx(t), y0 + h, stroke="#ddd")
        svg.line(fx(t), y0 + h, fx(t), y0 + h + 5)
        svg.text(fx(t), y0 + h + 18, tick_label(t), anchor="middle")
    svg.text(x0 + w / 2, y0 + h + 36, "files in one layer (log scale)", anchor="middle")
    for t in nice_ticks(ylo if ylo > 0 else 0, yhi, ylog):
        if ylog and t <= 0:
            continue
        svg.line(x0, fy(t), x0 + w, fy(t), stroke="#ddd")
        svg.line(x0 - 5, fy(t), x0, fy(t))
        svg.text(x0 - 8, fy(t) + 4, tick_label(t), anchor="end")
    svg.text(x0 - 48, y0 + h / 2, ylabel + (" (log)" if ylog and "log" not in ylabel else ""),
             anchor="middle", rotate=-90)
    if hline:
        svg.line(x0, fy(hline[0]), x0 + w, fy(hline[0]), stroke="#900", width=1.2, dash="2,3")
        svg.text(x0 + w - 4, fy(hline[0]) - 5, hline[1], size=11, anchor="end", fill="#900")
    for label, colour, dash, pts in series:
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        d = f' stroke-dasharray="{dash}"' if dash else ""
        coords = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        svg.add(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{d}/>')
        for x, y in pts:
            svg.add(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.5" fill="{colour}"/>')
    for i, (x, colour, what) in enumerate(sorted(failures)):
        anchor = "end" if fx(x) > x0 + w * 0.7 else "middle"
        svg.text(fx(x), y0 + 16 + 14 * i, f"✕ {what}", size=11, anchor=anchor, fill=colour)


def legend(svg, x, y, items):
    for i, (label, colour, dash) in enumerate(items):
        yy = y + i * 18
        svg.line(x, yy, x + 30, yy, stroke=colour, width=2.5, dash=dash)
        svg.text(x + 38, yy + 4, label, size=12)


def layer_table(svg, x, y, rows, cols, title):
    svg.text(x, y, title, size=13, weight="bold")
    y += 20
    widths = [170] + [118] * (len(cols) - 1)
    cx = x
    for c, w in zip(cols, widths):
        svg.text(cx, y, c, size=11, weight="bold")
        cx += w
    for r in rows:
        y += 17
        cx = x
        for i, (c, w) in enumerate(zip(r, widths)):
            svg.text(cx, y, c, size=11, fill="#222" if i else STYLE.get(r[0], ("#222",))[0])
            cx += w
    return y


def single_layer_series(by, key, cases, fs_of):
    out = []
    for case in cases:
        pts = []
        for (point, fs, c), r in by.items():
            if c == case and r["layers"] == 1 and r[key] is not None:
                pts.append((r["files"], r[key]))
        pts.sort()
        colour, dash = STYLE[case]
        out.append((case, colour, dash, pts))
    return out


def failures_of(by):
    out = []
    for (point, fs, c), r in by.items():
        if r["layers"] == 1 and r["seconds"] is None and r["failed"] and c in STYLE:
            kinds = sorted({f.split(":")[0] for f in r["failures"]})
            out.append((r["files"], STYLE[c][0], f"{c}: {'/'.join(kinds)}"))
    return out


def layer_rows(by, value):
    """Rows of the layer-count table: the same total files in one layer and in many."""
    rows = []
    for case in ORDER:
        cells = [case]
        any_value = False
        for point in ("f100000x1", "f2000x50", "f1000000x1", "f2000x500"):
            fs = "xfs" if "xfs" in case else "ext4"
            r = by.get((point, fs, case))
            v = value(r) if r else None
            if r and v is None and r["failed"]:
                cells.append("failed")
            else:
                cells.append(v if v is not None else "-")
                any_value = any_value or v is not None
        if any_value:
            rows.append(cells)
    return rows


def draw(by, machine, svg_dir):
    sub = (f"{machine.get('machine', {}).get('cores', '?')} cores; "
           f"cstor {machine.get('versions', {}).get('cstor_commit', '?')[:10]}, "
           f"upstream {machine.get('versions', {}).get('cfsctl', '?')}; {machine.get('date', '')[:10]}")
    cols = ["", "100k x 1", "2,000 x 50", "1M x 1", "2,000 x 500"]
    # Time: wall time and per-file cost.
    svg = Svg(1100, 720)
    svg.text(550, 24, "cstor import vs upstream cfsctl oci pull: time against files", size=16, anchor="middle", weight="bold")
    svg.text(550, 42, sub, size=11, anchor="middle", fill="#555")
    fails = failures_of(by)
    panel(svg, 90, 75, 430, 330, single_layer_series(by, "seconds", ORDER, None), "wall time", "seconds (log)", True,
          failures=fails)
    panel(svg, 620, 75, 430, 330, single_layer_series(by, "per_file_us", ORDER, None), "cost per file",
          "µs per file", False, failures=fails)
    legend(svg, 90, 470, [(f"{c}: {CASES[c][0]}", *STYLE[c]) for c in ORDER])
    rows = layer_rows(by, lambda r: None if r["seconds"] is None else f"{fmt(r['seconds'])} s")
    for row in rows:
        fs = "xfs" if "xfs" in row[0] else "ext4"
        per = []
        for one, many, n in (("f100000x1", "f2000x50", 50), ("f1000000x1", "f2000x500", 500)):
            a, b = by.get((one, fs, row[0])), by.get((many, fs, row[0]))
            ok = a and b and a["seconds"] is not None and b["seconds"] is not None
            per.append(f"{(b['seconds'] - a['seconds']) / (n - 1) * 1000:+.1f}" if ok else "-")
        row.append(" / ".join(per))
    layer_table(svg, 90, 590, rows, cols + ["ms per layer (50 / 500)"],
                "Layer count: the same files in one layer and in many (wall time)")
    with open(os.path.join(svg_dir, "scale-time.svg"), "w") as f:
        f.write(svg.render())
    # RSS: client and helper (cstor), the one process of upstream.
    svg = Svg(1100, 720)
    svg.text(550, 24, "cstor import vs upstream cfsctl oci pull: peak RSS against files", size=16, anchor="middle", weight="bold")
    svg.text(550, 42, sub, size=11, anchor="middle", fill="#555")
    cstor = [c for c in ORDER if c.startswith("cstor")]
    client = single_layer_series(by, "client_rss_kib", cstor, None)
    helper = single_layer_series(by, "helper_rss_kib", cstor, None)
    up = single_layer_series(by, "upstream_rss_kib", [c for c in ORDER if c.startswith("cfsctl")], None)
    to_mib = lambda s: [(l, c, d, [(x, y / 1024) for x, y in pts]) for l, c, d, pts in s]
    panel(svg, 90, 75, 430, 330, to_mib(client) + to_mib(up), "client (cstor) and upstream (cfsctl)", "peak RSS, MiB",
          "auto", hline=(100e6 / 2**20, "100 MB target"), failures=fails)
    panel(svg, 620, 75, 430, 330, to_mib(helper), "helper (cstor-helper)", "peak RSS, MiB", False,
          hline=(100e6 / 2**20, "100 MB target"))
    legend(svg, 90, 470, [(f"{c}: {CASES[c][0]}", *STYLE[c]) for c in ORDER])
    rows = layer_rows(by, lambda r: (None if r["seconds"] is None else
                                     f"{mib(r['client_rss_kib'])} / {mib(r['helper_rss_kib'])}" if r["case"].startswith("cstor")
                                     else (None if r["seconds"] is None else mib(r["upstream_rss_kib"]))))
    layer_table(svg, 90, 590, rows, cols, "Layer count: peak RSS in MiB (cstor: client / helper; upstream: cfsctl)")
    with open(os.path.join(svg_dir, "scale-rss.svg"), "w") as f:
        f.write(svg.render())


def main():
    args = sys.argv[1:]
    svg_dir = os.path.dirname(os.path.abspath(__file__))
    if "--svg-dir" in args:
        i = args.index("--svg-dir")
        svg_dir = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    d = args[0]
    runs = load_jsonl(os.path.join(d, "runs.jsonl"))
    loads = load_jsonl(os.path.join(d, "loads.jsonl"))
    machine = {}
    if os.path.exists(os.path.join(d, "machine.json")):
        with open(os.path.join(d, "machine.json")) as f:
            machine = json.load(f)
    invocations = load_jsonl(os.path.join(d, "invocations.jsonl")) or ([machine] if machine else [])
    points = {}
    pdir = os.path.join(d, "points")
    if os.path.isdir(pdir):
        for n in sorted(os.listdir(pdir)):
            if n.endswith(".gen.json"):
                with open(os.path.join(pdir, n)) as f:
                    g = json.load(f)
                g.pop("diff_ids", None)
                points[n[: -len(".gen.json")]] = g
    rows, by = summarise(runs)
    tg = targets(by)
    head, lines = table(rows)
    m = machine.get("machine", {})
    print(f"Scaling series: {d}")
    if m:
        print(f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_kib', 0) // 1048576} GiB, "
              f"kernel {m.get('kernel')}")
    for inv in invocations:
        im = inv.get("machine", {})
        print(f"run of {inv.get('settings', {}).get('points')} on {inv.get('settings', {}).get('fs')}: "
              f"uptime at start: {im.get('uptime_start', '').strip()}; at end: {im.get('uptime_end', '').strip()}")
    print()
    print_table(head, lines)
    print()
    print("Targets (issue 18; reported, not asserted):")
    for t in tg:
        state = {True: "PASS", False: "FAIL", None: "info" if t["value"] else "n/a "}[t["pass"]]
        print(f"  {state}  {t['target']}: {t['value'] or '-'}{'  (' + t['detail'] + ')' if t['detail'] else ''}")
    result = {"machine": machine, "invocations": invocations, "points": points, "loads": loads, "rows": rows, "targets": tg,
              "table_markdown": markdown_table(head, lines), "runs": runs}
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    draw(by, machine, svg_dir)
    print()
    print(f"wrote {os.path.join(d, 'results.json')}, {os.path.join(svg_dir, 'scale-time.svg')}, "
          f"{os.path.join(svg_dir, 'scale-rss.svg')}")


if __name__ == "__main__":
    main()
