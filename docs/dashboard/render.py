#!/usr/bin/env python3
"""Renders the panels of charts/kmmr/files/grafana-dashboard.json from /metrics scrapes of a
real run (capture.sh), with matplotlib. This is not Grafana: it evaluates the dashboard's own
PromQL expressions with a small evaluator of the subset they use (selectors, rate, sum by,
histogram_quantile, and - or / between two vectors), over the scrapes, and draws each panel.

    python3 docs/dashboard/render.py SCRAPE_DIR OUT.png [--rows ROW ...]

Scrape files are named r<replica>-<unix time>.prom; each series gets the labels
bftcluster="kmmr-local" and replica="<replica>", as the chart's PodMonitor adds them. Panels
whose metrics the scrapes lack (the operator's, in a local run) are drawn with that said.
"""

import glob
import math
import os
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import json  # noqa: E402

RATE_WINDOW = 5.0  # seconds, for $__rate_interval


def parse_scrapes(directory):
    """{(name, labels tuple): [(t, value)]} from every scrape file."""
    series = defaultdict(list)
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
    for path in sorted(glob.glob(os.path.join(directory, "r*-*.prom"))):
        base = os.path.basename(path)[:-5]
        replica, t = base[1:].split("-", 1)
        t = float(t)
        with open(path) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                m = line_re.match(line)
                if not m:
                    continue
                name, labels, value = m.group(1), m.group(3) or "", m.group(4)
                lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                lab["bftcluster"] = "kmmr-local"
                lab["replica"] = replica
                try:
                    v = float(value)
                except ValueError:
                    continue
                series[(name, tuple(sorted(lab.items())))].append((t, v))
    for v in series.values():
        v.sort()
    return series


class Parser:
    """A recursive-descent parser of the PromQL the dashboard uses."""

    def __init__(self, text):
        self.toks = re.findall(r'[a-zA-Z_][a-zA-Z0-9_:]*|\d+\.\d+|\d+|\{[^}]*\}|\[[^\]]*\]|[(),/\-]', text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want=None):
        tok = self.peek()
        if want is not None and tok != want:
            raise ValueError(f"expected {want!r}, got {tok!r} in {' '.join(self.toks)}")
        self.i += 1
        return tok

    def expr(self):
        left = self.term()
        while self.peek() in ("/", "-"):
            op = self.take()
            left = ("bin", op, left, self.term())
        return left

    def term(self):
        tok = self.take()
        if tok == "(":
            e = self.expr()
            self.take(")")
            return e
        if tok == "sum":
            by = []
            if self.peek() == "by":
                self.take()
                self.take("(")
                while self.peek() != ")":
                    t = self.take()
                    if t != ",":
                        by.append(t)
                self.take(")")
            self.take("(")
            e = self.expr()
            self.take(")")
            return ("sum", by, e)
        if tok == "rate":
            self.take("(")
            sel = self.term()
            rng = self.take()
            if not rng.startswith("["):
                raise ValueError("rate needs a range")
            self.take(")")
            return ("rate", sel)
        if tok == "histogram_quantile":
            self.take("(")
            q = float(self.take())
            self.take(",")
            e = self.expr()
            self.take(")")
            return ("hq", q, e)
        if re.match(r"[a-zA-Z_]", tok):
            if self.peek() and self.peek().startswith("{"):
                self.take()  # label matchers are dashboard variables: every series matches
            return ("sel", tok)
        raise ValueError(f"unsupported token {tok!r}")


def evaluate(node, series, times):
    """{labels tuple: [value or nan per time]} for the node at each time."""
    kind = node[0]
    if kind == "sel":
        out = {}
        for (name, labels), pts in series.items():
            if name != node[1]:
                continue
            vals = []
            j = 0
            for t in times:
                while j + 1 < len(pts) and pts[j + 1][0] <= t:
                    j += 1
                vals.append(pts[j][1] if pts and pts[j][0] <= t else math.nan)
            out[labels] = vals
        return out, {labels: pts for (name, labels), pts in series.items() if name == node[1]}
    if kind == "rate":
        _, raw = evaluate(node[1], series, times)
        out = {}
        for labels, pts in raw.items():
            vals = []
            for t in times:
                window = [p for p in pts if t - RATE_WINDOW <= p[0] <= t]
                if len(window) < 2:
                    vals.append(math.nan)
                    continue
                (t0, v0), (t1, v1) = window[0], window[-1]
                vals.append(max(v1 - v0, 0.0) / (t1 - t0) if t1 > t0 else math.nan)
            out[labels] = vals
        return out, None
    if kind == "sum":
        inner, _ = evaluate(node[2], series, times)
        out = {}
        for labels, vals in inner.items():
            key = tuple((k, v) for k, v in labels if k in node[1])
            acc = out.setdefault(key, [math.nan] * len(times))
            for i, v in enumerate(vals):
                if not math.isnan(v):
                    acc[i] = v if math.isnan(acc[i]) else acc[i] + v
        return out, None
    if kind == "hq":
        inner, _ = evaluate(node[2], series, times)
        groups = defaultdict(list)
        for labels, vals in inner.items():
            d = dict(labels)
            le = float(d.pop("le"))
            groups[tuple(sorted(d.items()))].append((le, vals))
        out = {}
        for labels, buckets in groups.items():
            buckets.sort()
            vals = []
            for i in range(len(times)):
                counts = [(le, b[i]) for le, b in buckets]
                total = counts[-1][1]
                if math.isnan(total) or total <= 0:
                    vals.append(math.nan)
                    continue
                rank = node[1] * total
                prev_le, prev_c = 0.0, 0.0
                v = math.nan
                for le, c in counts:
                    if c >= rank:
                        if math.isinf(le):
                            v = prev_le
                        else:
                            v = prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1)
                        break
                    prev_le, prev_c = le, c
                vals.append(v)
            out[labels] = vals
        return out, None
    if kind == "bin":
        a, _ = evaluate(node[2], series, times)
        b, _ = evaluate(node[3], series, times)
        out = {}
        for labels, va in a.items():
            if labels not in b:
                continue
            vb = b[labels]
            if node[1] == "/":
                out[labels] = [x / y if y else math.nan for x, y in zip(va, vb)]
            else:
                out[labels] = [x - y for x, y in zip(va, vb)]
        return out, None
    raise ValueError(f"unknown node {kind}")


def legend(fmt, labels):
    d = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: d.get(m.group(1), ""), fmt)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    scrapes, out_png = sys.argv[1], sys.argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    dash_path = os.path.join(here, "..", "..", "charts", "kmmr", "files", "grafana-dashboard.json")
    with open(dash_path) as f:
        dashboard = json.load(f)
    series = parse_scrapes(scrapes)
    if not series:
        sys.exit(f"render.py: no scrapes (r<replica>-<time>.prom) in {scrapes}")
    t_all = sorted({t for pts in series.values() for t, _ in pts})
    t0 = t_all[0]
    times = sorted({round(t) for t in t_all})
    panels = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.2 * rows), squeeze=False)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#444")
        ax.tick_params(colors="#ccc", labelsize=7)
        ax.set_title(panel["title"], color="#eee", fontsize=10, loc="left")
        drawn = 0
        for target in panel["targets"]:
            vals, _ = evaluate(Parser(target["expr"]).expr(), series, times)
            for labels, v in sorted(vals.items()):
                if all(math.isnan(x) for x in v):
                    continue
                ax.plot([t - t0 for t in times], v, linewidth=1, label=legend(target["legendFormat"], labels))
                drawn += 1
        if drawn:
            ax.legend(fontsize=6, loc="upper left", ncol=2, facecolor="#181b1f", labelcolor="#ccc", edgecolor="#444")
            unit = panel["fieldConfig"]["defaults"].get("unit", "")
            ax.set_xlabel(f"seconds   unit: {unit}", color="#999", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no such series in this run\n(operator metrics need a cluster)",
                    ha="center", va="center", color="#999", transform=ax.transAxes, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("KmMR dashboard panels rendered with matplotlib from a real local run's /metrics (not Grafana)",
                 color="#eee", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out_png, dpi=70, facecolor=fig.get_facecolor())
    print(f"render.py: {len(panels)} panels, {len(series)} series, written to {out_png}")


if __name__ == "__main__":
    main()
