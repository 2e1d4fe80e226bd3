#!/usr/bin/env python3
"""Throughput chart and table from criterion's results (standard library only).

Reads <criterion dir>/{throughput,nats_jetstream}/<function>/<size>/new/
{estimates.json,benchmark.json}, prints a Markdown table of msgs/s with the ratio to
raw TCP of the same size (and of effectively-once to each NATS JetStream run), and
writes a grouped horizontal bar chart as SVG.

Usage: python3 scripts/chart.py [CRITERION_DIR] [OUT_SVG]
Defaults: $CARGO_TARGET_DIR/criterion (or target/criterion), docs/throughput.svg.
"""

import json
import os
import sys

ORDER = ["raw_tcp", "at_most_once", "at_least_once", "effectively_once"]
LABEL = {
    "raw_tcp": "raw TCP (no ids, no acks)",
    "at_most_once": "ackwire AtMostOnce",
    "at_least_once": "ackwire AtLeastOnce",
    "effectively_once": "ackwire EffectivelyOnce",
    "nats_file": "NATS JetStream (file)",
    "nats_memory": "NATS JetStream (memory)",
}
COLOR = {
    "raw_tcp": "#888888",
    "at_most_once": "#4e79a7",
    "at_least_once": "#f28e2b",
    "effectively_once": "#59a14f",
    "nats_file": "#b07aa1",
    "nats_memory": "#d4a6c8",
}
TARGET = {"at_most_once": 0.60, "at_least_once": 0.35, "effectively_once": 0.25}


def load(root, group):
    """{(function, size): (msgs_per_s, lo, hi)} for one criterion group."""
    out = {}
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir):
        return out
    for func in sorted(os.listdir(gdir)):
        fdir = os.path.join(gdir, func)
        if not os.path.isdir(fdir) or func == "report":
            continue
        for size in sorted(os.listdir(fdir)):
            new = os.path.join(fdir, size, "new")
            est = os.path.join(new, "estimates.json")
            meta = os.path.join(new, "benchmark.json")
            if not (os.path.isfile(est) and os.path.isfile(meta)):
                continue
            with open(est) as f:
                e = json.load(f)
            with open(meta) as f:
                m = json.load(f)
            elements = (m.get("throughput") or {}).get("Elements")
            if not elements:
                continue
            # criterion prints the slope for linear sampling; fall back to the mean.
            mean = e.get("slope") or e["mean"]
            ns = mean["point_estimate"]
            ci = mean["confidence_interval"]
            # Per-iteration time in ns -> messages per second (hi time = lo rate).
            rate = elements * 1e9 / ns
            lo = elements * 1e9 / ci["upper_bound"]
            hi = elements * 1e9 / ci["lower_bound"]
            out[(func, int(size))] = (rate, lo, hi)
    return out


def table(tp, nats):
    lines = [
        "| size | variant | msgs/s | 95% CI | vs raw TCP | target | met |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for size in sorted({s for _, s in tp}):
        raw = tp.get(("raw_tcp", size))
        for func in ORDER:
            r = tp.get((func, size))
            if not r:
                continue
            ratio = r[0] / raw[0] if raw else float("nan")
            tgt = TARGET.get(func)
            tcol = f"≥ {tgt:.0%}" if tgt else ""
            met = ("yes" if ratio >= tgt else "**no**") if tgt else ""
            lines.append(
                f"| {size} B | {LABEL[func]} | {r[0]:,.0f} | {r[1]:,.0f}–{r[2]:,.0f} "
                f"| {ratio:.1%} | {tcol} | {met} |"
            )
    if nats:
        eo = tp.get(("effectively_once", 64))
        lines.append("")
        lines.append(
            "| peer (64 B) | msgs/s | 95% CI | ackwire EffectivelyOnce ÷ peer | target | met |"
        )
        lines.append("|---|---:|---|---:|---:|---|")
        for (func, size), r in sorted(nats.items()):
            ratio = eo[0] / r[0] if eo else float("nan")
            met = "yes" if ratio >= 40 else "**no**"
            lines.append(
                f"| {LABEL['nats_' + func]} | {r[0]:,.0f} | {r[1]:,.0f}–{r[2]:,.0f} "
                f"| {ratio:.1f}× | ≥ 40× (issue 14) | {met} |"
            )
    return "\n".join(lines)


def svg(tp, nats, path):
    bars = []  # (group label, key, rate)
    for size in sorted({s for _, s in tp}):
        for func in ORDER:
            r = tp.get((func, size))
            if r:
                bars.append((f"{size} B", func, r[0]))
    for (func, size), r in sorted(nats.items()):
        bars.append((f"{size} B, peer", "nats_" + func, r[0]))
    if not bars:
        raise SystemExit("no criterion results found")
    top = max(b[2] for b in bars)
    raw_of = {g: r for g, k, r in bars if k == "raw_tcp"}
    left, width, bar_h, gap = 230, 520, 18, 4
    y = 50
    parts = [
        f'<text x="10" y="22" font-size="15" font-weight="bold">ackwire throughput over TCP '
        f"loopback (msgs/s, 1 sender → 1 receiver)</text>",
    ]
    last = None
    for grp, key, rate in bars:
        if grp != last:
            y += 6
            parts.append(f'<text x="10" y="{y + 10}" font-weight="bold">{grp}</text>')
            y += 16
            last = grp
        w = max(1.0, width * rate / top)
        parts.append(
            f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end">{LABEL[key]}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLOR[key]}"/>'
        )
        raw = raw_of.get(grp.split(",")[0])
        ratio = f" ({rate / raw:.1%} of raw)" if raw and key != "raw_tcp" else ""
        parts.append(
            f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 5}">{rate / 1000:,.0f} k{ratio}</text>'
        )
        y += bar_h + gap
    height = y + 30
    parts.insert(
        0,
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 200}" '
        f'height="{height}" font-family="sans-serif" font-size="12">\n'
        '<rect width="100%" height="100%" fill="white"/>',
    )
    parts.append(
        f'<text x="10" y="{height - 10}" fill="#555">linear scale; criterion slope '
        "estimate; 2 shared cores, see BENCHMARKS.md for noise</text>"
    )
    parts.append("</svg>")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    target_dir = os.environ.get("CARGO_TARGET_DIR", "target")
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(target_dir, "criterion")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join("docs", "throughput.svg")
    tp = load(root, "throughput")
    nats = load(root, "nats_jetstream")
    print(table(tp, nats))
    svg(tp, nats, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
