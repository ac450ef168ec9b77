#!/usr/bin/env python3
"""Plots like the paper's Figures 7-11 from bench/paper/run.sh's points.csv, both systems on
each plot, medians over repetitions (with the spread of repetitions as error bars).

    plot.py RESULTS/points.csv OUT_DIR

Writes, for scenario 2 and each cluster size n it finds:
  consensus-time-n<n>.png    median consensus time against flood rate (Figures 7, 8; log scale)
  victim-cpu-n<n>.png        the flooded member's CPU (Figure 9)
  victim-ram-n<n>.png        the flooded member's peak resident memory (Figure 10)
  bandwidth-n<n>.png         the bandwidth left to it, by iperf3 (Figure 11)
and consensus-time-scenario1-n<n>.png for scenario 1; with the follower flooded (run.sh --victim
follower), the same names end in -follower. Needs matplotlib (run.sh installs it into a
cached virtual environment).
"""

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = [("etcd", "KmMC (etcd, Raft)", "tab:red", "s"), ("kmmr", "KmMR (BFT-SMaRt)", "tab:blue", "o")]
METRICS = {
    "consensus-time": ("p50_ms", "median consensus time (ms)", True),
    "victim-cpu": ("victim_cpu_pct", "flooded member's CPU (% of one core)", False),
    "victim-ram": ("victim_rss_mib", "flooded member's peak RSS (MiB)", False),
    "bandwidth": ("bandwidth_left_mbit", "bandwidth left to the flooded member (Mbit/s)", False),
}


def load(path):
    """Points by the flooded member's role, each keyed (scenario, n, system)."""
    by_role = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # Runs before the column existed flooded the leader.
            role = row.get("victim_role") or "leader"
            by_role[role][(row["scenario"], int(row["n"]), row["system"])].append(row)
    return by_role


def series(rows, field, link):
    by_rate = defaultdict(list)
    for r in rows:
        if r.get(field):  # older runs have no bandwidth column; --bandwidth-seconds 0 leaves it empty
            by_rate[float(r["rate"])].append(float(r[field]))
    xs = sorted(by_rate)
    mids = [statistics.median(by_rate[x]) for x in xs]
    lo = [m - min(by_rate[x]) for x, m in zip(xs, mids)]
    hi = [max(by_rate[x]) - m for x, m in zip(xs, mids)]
    return [x * link for x in xs], mids, lo, hi


def plot(points, scenario, n, name, out_dir, role):
    field, ylabel, log = METRICS[name]
    fig, ax = plt.subplots(figsize=(6, 4))
    link = _link([r for s, *_ in SYSTEMS for r in points.get((scenario, n, s), [])])
    drawn = False
    for system, label, colour, marker in SYSTEMS:
        rows = points.get((scenario, n, system))
        if not rows:
            continue
        xs, ys, lo, hi = series(rows, field, link)
        if not xs:
            continue
        drawn = True
        crashed = rows[0]["crashed"]
        ax.errorbar(xs, ys, yerr=[lo, hi], label=f"{label}, {crashed} crashed", color=colour,
                    marker=marker, capsize=3)
    if not drawn:  # a metric this run did not measure
        plt.close(fig)
        return
    ax.set_xlabel(f"flood rate on one member (Mbit/s; its link: {link:g} Mbit/s)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"scenario {scenario}, n={n}, the {role} flooded")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    suffix = f"-scenario1-n{n}" if scenario == "1" else f"-n{n}"
    suffix += "" if role == "leader" else f"-{role}"
    fig.savefig(out_dir / f"{name}{suffix}.png", dpi=120)
    plt.close(fig)


def _link(rows):
    """The link rate in Mbit/s: a flood's Mbit/s over its share of the link."""
    for r in rows:
        if float(r["rate"]) > 0:
            return float(r["flood_mbit"]) / float(r["rate"])
    return 0.0


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py POINTS_CSV OUT_DIR")
    try:
        by_role = load(sys.argv[1])
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"plot.py: cannot read {sys.argv[1]}: {e}")
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for role, mine in sorted(by_role.items()):
        for n in sorted({k[1] for k in mine if k[0] == "2"}):
            for name in METRICS:
                plot(mine, "2", n, name, out_dir, role)
        for n in sorted({k[1] for k in mine if k[0] == "1"}):
            plot(mine, "1", n, "consensus-time", out_dir, role)


if __name__ == "__main__":
    main()
