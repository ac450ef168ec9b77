#!/usr/bin/env python3
"""Tables like the paper's from bench/paper/run.sh's points.csv, as markdown on stdout.

    bench/paper/table.py RESULTS/points.csv

For each scenario: one row per flood rate, and for each cluster size the median consensus time
(p50 of one closed-loop write) of etcd (the paper's KmMC) and KmMR, the median over repetitions,
with each system's slowdown against its own point without a flood. Scenario 1 is the paper's
Table 2; scenario 2 is what its Figures 7 and 8 plot. Then, per scenario, the p99, the writes
completed, the leader changes, and the flooded member's CPU, memory and bandwidth left.
"""

import csv
import statistics
import sys
from collections import defaultdict

SYSTEMS = [("etcd", "KmMC (etcd)"), ("kmmr", "KmMR")]


def load(path):
    """Points by the flooded member's role, each keyed (scenario, n, rate, system)."""
    by_role = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # Runs before the column existed flooded the leader.
            role = row.get("victim_role") or "leader"
            key = (row["scenario"], int(row["n"]), float(row["rate"]), row["system"])
            by_role[role][key].append(row)
    return by_role


def median(rows, field):
    return statistics.median(float(r[field]) for r in rows)


def bandwidth(rows):
    values = [float(r["bandwidth_left_mbit"]) for r in rows if r.get("bandwidth_left_mbit")]
    return f"{statistics.median(values):.1f}" if values else "-"


def drops(rows):
    values = [float(r["victim_drops_per_s"]) for r in rows if r.get("victim_drops_per_s")]
    return f"{statistics.median(values):.0f}" if values else "-"


def fmt_ms(v):
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def scenario_table(points, scenario, role, out):
    ns = sorted({k[1] for k in points if k[0] == scenario})
    rates = sorted({k[2] for k in points if k[0] == scenario})
    if not ns:
        return
    crashed = {
        (n, s): points[k][0]["crashed"]
        for k in points
        for n, s in [(k[1], k[3])]
        if k[0] == scenario
    }
    title = {
        "1": "Scenario 1: nobody crashed, one member flooded (the paper's Table 2)",
        "2": "Scenario 2: the tolerated crashes spent, then one more member flooded "
        "(the paper's Figures 7 and 8)",
    }[scenario]
    out.write(f"### {title}; the {role} flooded\n\n")
    out.write("Median consensus time in ms (slowdown against no flood)")
    if scenario == "2":
        parts = [
            f"n={n}: etcd {crashed.get((n, 'etcd'), '?')} crashed, KmMR {crashed.get((n, 'kmmr'), '?')}"
            for n in ns
        ]
        out.write("; " + "; ".join(parts))
    out.write(".\n\n")
    header = ["flood, share of link"]
    for n in ns:
        for _, name in SYSTEMS:
            header.append(f"{name} n={n}")
    out.write("| " + " | ".join(header) + " |\n")
    out.write("|" + "---|" * len(header) + "\n")
    for rate in rates:
        cells = [f"{rate:g}"]
        for n in ns:
            for system, _ in SYSTEMS:
                rows = points.get((scenario, n, rate, system))
                base = points.get((scenario, n, 0.0, system))
                if not rows:
                    cells.append("-")
                    continue
                v = median(rows, "p50_ms")
                cell = fmt_ms(v)
                if base and rate > 0:
                    b = median(base, "p50_ms")
                    cell += f" ({v / b:.1f}x)" if b > 0 else ""
                cells.append(cell)
        out.write("| " + " | ".join(cells) + " |\n")
    out.write("\n")
    out.write(
        "| n | system | flood | p99 ms | max ms | writes | errors | leader changes "
        "| victim CPU % | victim RSS MiB | flood reaching the victim, Mbit/s "
        "| inbound drops/s | bandwidth left, Mbit/s |\n"
    )
    out.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for n in ns:
        for system, name in SYSTEMS:
            for rate in rates:
                rows = points.get((scenario, n, rate, system))
                if not rows:
                    continue
                out.write(
                    f"| {n} | {name} | {rate:g} | {fmt_ms(median(rows, 'p99_ms'))} "
                    f"| {fmt_ms(median(rows, 'max_ms'))} | {median(rows, 'ops'):.0f} "
                    f"| {median(rows, 'errors'):.0f} | {median(rows, 'leader_changes'):.0f} "
                    f"| {median(rows, 'victim_cpu_pct'):.0f} | {median(rows, 'victim_rss_mib'):.0f} "
                    f"| {median(rows, 'victim_rx_mbit'):.0f} | {drops(rows)} | {bandwidth(rows)} |\n"
                )
    out.write("\n")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: table.py POINTS_CSV")
    try:
        by_role = load(sys.argv[1])
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"table.py: cannot read {sys.argv[1]}: {e}")
    reps = max((len(v) for points in by_role.values() for v in points.values()), default=0)
    sys.stdout.write(f"Medians over {reps} repetition(s) per point.\n\n")
    for role in ("leader", "follower"):
        for scenario in ("1", "2"):
            scenario_table(by_role.get(role, {}), scenario, role, sys.stdout)


if __name__ == "__main__":
    main()
