#!/usr/bin/env bash
# Scrapes /metrics of every replica of a local cluster once a second while a workload runs, for
# render.py. Starts `kmmr-replica local` with replica 0 equivocating, runs `bench` against it,
# then a quiet spell, and stops it.
#
#   docs/dashboard/capture.sh OUT_DIR [SECONDS]
#
# Needs target/release/kmmr-replica (cargo build --release -p kmmr-replica) and curl. Picks a
# free base port itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${1:?usage: capture.sh OUT_DIR [SECONDS]}"
seconds="${2:-40}"
bin=target/release/kmmr-replica
[[ -x $bin ]] || { echo "capture.sh: $bin is missing: run cargo build --release -p kmmr-replica" >&2; exit 1; }
command -v curl > /dev/null || { echo "capture.sh: curl is missing" >&2; exit 1; }
# A base port whose replica, client and HTTP ports (base+i, +1000+i, +2000+i) are all free.
base="$(python3 - <<'PY'
import random, socket
for _ in range(200):
    base = random.randrange(20000, 30000)
    try:
        socks = []
        for off in (0, 1000, 2000):
            for i in range(4):
                s = socket.socket(); s.bind(("127.0.0.1", base + off + i)); socks.append(s)
        print(base); break
    except OSError:
        pass
PY
)"
mkdir -p "$out"
dir="$(mktemp -d)/cluster"
"$bin" local --n 4 --byzantine 1 --byzantine-mode equivocate --keep-running --dir "$dir" \
  --base-port "$base" > "$out/local.log" 2>&1 &
local_pid=$!
trap 'kill "$local_pid" 2> /dev/null || true; wait "$local_pid" 2> /dev/null || true' EXIT
for _ in $(seq 60); do "$bin" status --cluster "$dir" > /dev/null 2>&1 && break; sleep 1; done
scrape() {
  local t
  t="$(date +%s.%N)"
  for i in 0 1 2 3; do
    curl -sf --max-time 2 "http://127.0.0.1:$((base + 2000 + i))/metrics" > "$out/r$i-$t.prom" || true
  done
}
( end=$((SECONDS + seconds)); while ((SECONDS < end)); do scrape; sleep 1; done ) &
scraper=$!
sleep 5
"$bin" bench --cluster "$dir" --op put --clients 8 --duration $((seconds / 2)) > "$out/bench.log" 2>&1 || true
wait "$scraper"
echo "capture.sh: $(ls "$out"/*.prom | wc -l) scrapes in $out (base port $base)"
