#!/usr/bin/env python3
"""Turns bench/compare-etcd.sh's results.jsonl into a markdown table: the median of each
(n, load, system) over its repetitions, and kmmr/etcd ratios (ops/s: higher is better for kmmr;
latency and RSS: lower is better for kmmr)."""
import argparse
import json
import statistics
import sys
from collections import defaultdict


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(us):
    return "-" if us is None else f"{us / 1000:.2f} ms"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--header", default="")
    ap.add_argument("--footer", default="")
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.results) if l.strip()]
    groups = defaultdict(list)
    order = []
    for r in rows:
        load = (r.get("clients"), r.get("window"))
        key = (r["n"], load, r["system"])
        if key not in groups:
            order.append(key)
        groups[key].append(r)
    if not groups:
        sys.exit("no results")

    def stats(rs):
        ok = [r for r in rs if not r.get("failed")]
        return {
            "reps": len(rs),
            "failed": len(rs) - len(ok),
            "ops": median([r["ops_per_sec"] for r in ok]),
            "ops_lo": min([r["ops_per_sec"] for r in ok], default=None),
            "ops_hi": max([r["ops_per_sec"] for r in ok], default=None),
            "p50": median([r["p50_us"] for r in ok]),
            "p99": median([r["p99_us"] for r in ok]),
            "errors": sum(r.get("errors", 0) for r in ok),
            "rss": median([r["rss_kib"] / 1024 for r in ok]),
            "scpu": median([r["server_cpu_pct"] for r in ok]),
            "ccpu": median([r["client_cpu_pct"] for r in ok]),
            "busy": median([r["machine_busy_pct"] for r in ok]),
            "leader": [r.get("leader_changes") for r in ok],
        }

    if args.header:
        print(args.header + "\n")
    print("| n | clients x window | system | ops/s (min-max) | p50 | p99 | peak RSS / replica | "
          "server CPU (all replicas) | client CPU | machine busy | leader changes | errors | "
          "kmmr/etcd ops/s | kmmr/etcd p50 | kmmr/etcd p99 | kmmr/etcd RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Sorted by n, then load in the order run, then system in the order first seen.
    loads = []
    systems = []
    for n, load, system in order:
        if load not in loads:
            loads.append(load)
        if system not in systems:
            systems.append(system)
    for n in sorted({k[0] for k in order}):
        for load in loads:
            base = groups.get((n, load, "etcd"))
            e = stats(base) if base else None
            for system in systems:
                rs = groups.get((n, load, system))
                if not rs:
                    continue
                s = stats(rs)
                is_etcd = system == "etcd"
                cells = [
                    str(n), f"{load[0]} x {load[1]}", system,
                    "-" if s["ops"] is None else f"{s['ops']:,.0f}"
                    + (f" ({s['ops_lo']:,.0f}-{s['ops_hi']:,.0f})" if len(rs) > 1 else ""),
                    ms(s["p50"]), ms(s["p99"]),
                    "-" if s["rss"] is None else f"{s['rss']:.0f} MiB",
                    "-" if s["scpu"] is None else f"{s['scpu']:.0f}%",
                    "-" if s["ccpu"] is None else f"{s['ccpu']:.0f}%",
                    "-" if s["busy"] is None else f"{s['busy']:.0f}%",
                    "-" if None in s["leader"] else " ".join(map(str, s["leader"])),
                    str(s["errors"]) + (f" ({s['failed']}/{s['reps']} runs failed)" if s["failed"] else ""),
                ]
                if is_etcd or e is None:
                    cells += ["-"] * 4
                else:
                    cells += [ratio(s["ops"], e["ops"]), ratio(s["p50"], e["p50"]),
                              ratio(s["p99"], e["p99"]), ratio(s["rss"], e["rss"])]
                print("| " + " | ".join(cells) + " |")
    print()
    print("Medians of each point's repetitions. ops/s ratio > 1 and latency/RSS ratios < 1 mean "
          "kmmr ahead. CPU: percent of one core during the client's run (warm-up included); "
          "machine busy: percent of all cores, every process on the machine; leader changes: during "
          "the client's run, one number per repetition (etcd elections, kmmr regencies).")
    if args.footer:
        print("\n" + args.footer)


if __name__ == "__main__":
    main()
