#!/usr/bin/env bash
# Two builds of kmmr-replica side by side in one run, interleaved so that both see the same
# machine: each round starts a fresh local cluster (no-op service, 0/0, BFT-SMaRt's
# micro-benchmark) with binary A, measures, stops it, then the same with B.
#
#   replica/scripts/bench-ab.sh A_BINARY B_BINARY [rounds, default 3] [seconds, default 5]
#
# Extra `local` flags in KMMR_LOCAL_FLAGS (default: --n 4 --no-durable). Prints one line per
# run and the median of each (binary, load) at the end. Ports 26000-28003, directory
# kmmr-bench-ab/ (replaced).
set -euo pipefail
a=${1:?binary A}; b=${2:?binary B}; rounds=${3:-3}; secs=${4:-5}
flags=${KMMR_LOCAL_FLAGS:---n 4 --no-durable}
dir=kmmr-bench-ab
base=26000
results=$(mktemp)
pid=
# Whatever ends the script (a failed bench, an interrupt, set -e), the cluster goes with it.
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$results"
    rm -rf "$dir" "$dir.out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for bin in "$a" "$b"; do
    [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
done

run_one() {
    local label=$1 bin=$2
    rm -rf "$dir"
    # shellcheck disable=SC2086
    "$bin" local $flags --service noop --keep-running --dir "$dir" --base-port $base \
        >"$dir.out" 2>&1 &
    pid=$!
    for _ in $(seq 150); do
        grep -q "local cluster" "$dir.out" 2>/dev/null && break
        sleep 0.2
    done
    grep -q "local cluster" "$dir.out" || {
        cat "$dir.out" >&2
        for log in "$dir"/r*.log; do echo "--- $log" >&2; tail -20 "$log" >&2; done
        kill $pid
        exit 1
    }
    for load in "--clients 1" "--clients 50 --window 8"; do
        # shellcheck disable=SC2086
        line=$("$bin" bench --cluster "$dir" $load --duration "$secs" --warmup 2 --json) || {
            echo "bench $load against $label ($bin) failed; the cluster's output:" >&2
            cat "$dir.out" >&2
            exit 1
        }
        printf '%s\t%s\t%s\n' "$label" "$load" "$line" | tee -a "$results"
    done
    kill -INT $pid
    wait $pid || true
    pid=
}

for r in $(seq "$rounds"); do
    echo "round $r of $rounds (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    run_one A "$a"
    run_one B "$b"
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, load, js = line.rstrip("\n").split("\t", 2)
    rows.setdefault((load, label), []).append(json.loads(js))
def med(xs, k):
    return statistics.median(x[k] for x in xs)
print("| load | A ops/s | B ops/s | B/A | A p50 us | B p50 us | B/A |")
print("|---|---|---|---|---|---|---|")
for load in sorted({l for l, _ in rows}):
    a, b = rows[(load, "A")], rows[(load, "B")]
    ta, tb = med(a, "ops_per_sec"), med(b, "ops_per_sec")
    la, lb = med(a, "p50_us"), med(b, "p50_us")
    print(f"| {load} | {ta:,.0f} | {tb:,.0f} | {tb/ta:.2f} | {la:,.0f} | {lb:,.0f} | {lb/la:.2f} |")
PY
