#!/usr/bin/env python3
"""Turns bench/apiserver-compare.sh's results.jsonl into a markdown table: the median of each
figure per store over its repetitions, and the kmmr/etcd ratio of each (creates/s: higher is
better for kmmr; times: lower is better for kmmr)."""
import argparse
import json
import statistics
from collections import defaultdict

# (label, path in a result, unit, higher is better)
FIGURES = [
    ("creates/s, {clients}", ("create", "ops_per_sec"), "", True),
    ("create p50", ("create", "p50_us"), "ms", False),
    ("create p99", ("create", "p99_us"), "ms", False),
    ("creates/s while filling the list", ("list", "fill_per_sec"), "", True),
    ("LIST of all objects", ("list", "median_ms"), "ms*", False),
    ("write to watch event p50", ("watch", "p50_us"), "ms", False),
    ("write to watch event p99", ("watch", "p99_us"), "ms", False),
    ("store CPU (% of a core)", ("store_cpu_pct",), "", False),
    ("of which the gateway", ("gateway_cpu_pct",), "", False),
    ("apiserver CPU (% of a core)", ("apiserver_cpu_pct",), "", False),
    ("store peak RSS (largest process)", ("store_rss_kib",), "MiB", False),
]


def get(result, path):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def show(value, unit):
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value / 1000:.1f} ms"
    if unit == "ms*":
        return f"{value:.0f} ms"
    if unit == "MiB":
        return f"{value / 1024:.0f} MiB"
    return f"{value:.0f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--header", default="")
    ap.add_argument("--footer", default="")
    args = ap.parse_args()
    by_store = defaultdict(list)
    failed = defaultdict(int)
    with open(args.results) as f:
        for line in f:
            r = json.loads(line)
            if r.get("failed"):
                failed[r["store"]] += 1
            else:
                by_store[r["store"]].append(r)
    stores = [s for s in ("etcd", "kmmr") if s in by_store] + sorted(
        s for s in by_store if s not in ("etcd", "kmmr")
    )
    if args.header:
        print(args.header + "\n")
    print("| figure | " + " | ".join(stores) + (" | kmmr/etcd |" if {"etcd", "kmmr"} <= set(stores) else " |"))
    print("|---" * (len(stores) + 1 + ({"etcd", "kmmr"} <= set(stores))) + "|")
    clients = sorted({r.get("clients") for rs in by_store.values() for r in rs} - {None})
    for label, path, unit, higher in FIGURES:
        label = label.format(
            clients="/".join(map(str, clients)) + (" client" if clients == [1] else " clients")
        )
        medians = {}
        for s in stores:
            xs = [v for v in (get(r, path) for r in by_store[s]) if v is not None]
            medians[s] = statistics.median(xs) if xs else None
        row = [label] + [show(medians[s], unit) for s in stores]
        if {"etcd", "kmmr"} <= set(stores):
            e, k = medians["etcd"], medians["kmmr"]
            row.append("-" if not e or k is None else f"{k / e:.2f}" + (" (higher is better)" if higher else ""))
        print("| " + " | ".join(row) + " |")
    loads = [r["loadavg1"] for rs in by_store.values() for r in rs]
    if loads:
        print(f"\nLoad average (1 min) at the end of each point: {min(loads):.1f} to {max(loads):.1f}.")
    for s, n in failed.items():
        print(f"\n{n} point(s) of {s} failed (logs in the results directory).")
    if args.footer:
        print("\n" + args.footer)


if __name__ == "__main__":
    main()
