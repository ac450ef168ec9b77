#!/usr/bin/env bash
# Durability on vs off, side by side in one run: a local n=4 cluster with the no-op service
# (BFT-SMaRt's 0/0 micro-benchmark, and 1 KiB requests), measured by `kmmr-replica bench`.
#
#   replica/scripts/bench-durability.sh [seconds per run, default 5]
#
# Needs a release build (cargo build --release -p kmmr-replica); set KMMR_BIN to use another
# binary. Uses ports 23000-25003 and the directory kmmr-bench-durability/ (replaced).
set -euo pipefail
secs=${1:-5}
bin=${KMMR_BIN:-${CARGO_TARGET_DIR:-target}/release/kmmr-replica}
dir=kmmr-bench-durability
base=23000
[ -x "$bin" ] || { echo "no binary at $bin: cargo build --release -p kmmr-replica" >&2; exit 1; }

run_mode() {
    local mode=$1 flag=$2
    "$bin" local --n 4 --service noop --keep-running --dir "$dir" --base-port $base $flag \
        >"$dir.$mode.out" 2>&1 &
    local pid=$!
    # `local` prints its banner once every replica is healthy.
    for _ in $(seq 100); do
        grep -q "local cluster" "$dir.$mode.out" 2>/dev/null && break
        sleep 0.2
    done
    for size in 0 1024; do
        for load in "--clients 1" "--clients 50 --window 8"; do
            printf '%-10s %5s B  %-22s ' "$mode" "$size" "$load"
            # shellcheck disable=SC2086
            "$bin" bench --cluster "$dir" $load --request-size $size --duration "$secs" --warmup 2
        done
    done
    kill -INT $pid
    wait $pid || true
    rm -f "$dir.$mode.out"
}

run_mode durable ""
run_mode no-durable --no-durable
rm -rf "$dir"
