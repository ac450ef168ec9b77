#!/usr/bin/env bash
# Leader changes under values of 1 MiB from many clients (issue 15): a local cluster (n=4,
# durable, key-value) serves HEAVY clients each putting 1 MiB values in a closed loop, and one
# more client putting 100-byte values, while the script freezes the leader (SIGSTOP) CHANGES
# times, each time until the other replicas have installed a new regency, then resumes it.
#
#   replica/scripts/heavy-values.sh BINARY [SECONDS, default 60] [HEAVY, default 150] [CHANGES, default 3]
#
# It prints each leader change and how long it took to complete, and at the end the heavy
# clients' throughput and the small client's latency (p50, p99, max). It exits non-zero when a
# leader change does not complete within 60 s, when the small client's p99 is 1 s or more, when
# a replica exits, or when a write after the run does not read back. Ports from
# KMMR_BASE_PORT (27000) up, directory kmmr-heavy-values/ (replaced); traffic stays on
# loopback, and the cluster stops with the script however it ends (a frozen replica is resumed
# first). It takes SECONDS + about 15 s.
set -euo pipefail
bin=${1:?the kmmr-replica binary}
secs=${2:-60}
heavy=${3:-150}
changes=${4:-3}
base=${KMMR_BASE_PORT:-27000}
dir=kmmr-heavy-values
pid=
frozen=
cleanup() {
    [ -n "$frozen" ] && kill -CONT "$frozen" 2>/dev/null || true
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir" "$dir.out" "$dir.heavy" "$dir.small"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
[[ $secs =~ ^[0-9]+$ && $heavy =~ ^[0-9]+$ && $changes =~ ^[0-9]+$ ]] \
    || { echo "SECONDS, HEAVY and CHANGES are whole numbers" >&2; exit 2; }
((secs >= 10 * (changes + 1))) || { echo "give each leader change at least 10 s: SECONDS >= $((10 * (changes + 1)))" >&2; exit 2; }

metric() { # metric NAME REPLICA: the value of an unlabelled metric, empty if unreachable
    # A loaded replica may not answer in time: that is an empty value, not the script's end
    # (set -e with pipefail would otherwise exit on curl's timeout).
    { curl -s --max-time 2 "http://127.0.0.1:$((base + 2000 + $2))/metrics" || true; } \
        | awk -v m="$1" '$1 == m { print $2 }'
}
replica_pid() { # the process of replica i under `local`
    local p
    for p in $(pgrep -P "$pid"); do
        tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "/r$1.toml" && { echo "$p"; return; }
    done
}
rss_mib() { awk '/^VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo 0; }

rm -rf "$dir"
"$bin" local --n 4 --service kv --keep-running --dir "$dir" --base-port "$base" >"$dir.out" 2>&1 &
pid=$!
for _ in $(seq 150); do
    grep -q "local cluster" "$dir.out" 2>/dev/null && break
    sleep 0.2
done
grep -q "local cluster" "$dir.out" || { cat "$dir.out" >&2; exit 1; }
echo "$(date +%T) load $(cut -d' ' -f1 /proc/loadavg): $heavy clients putting 1 MiB values, one putting 100 bytes, $secs s, $changes leader changes forced"
"$bin" bench --cluster "$dir" --op put --request-size $((1 << 20)) --clients "$heavy" --window 1 \
    --duration "$secs" --warmup 2 --json >"$dir.heavy" 2>&1 &
heavy_pid=$!
"$bin" bench --cluster "$dir" --op put --request-size 100 --clients 1 --window 1 \
    --duration "$secs" --warmup 2 --json >"$dir.small" 2>&1 &
small_pid=$!

failed=0
step=$((secs / (changes + 1)))
for ((k = 1; k <= changes; k++)); do
    sleep "$step"
    # A loaded replica may not answer within 2 s: ask until one does.
    regency=""
    for _ in $(seq 30); do
        for i in 0 1 2 3; do
            regency=$(metric kmmr_regency "$i")
            [ -n "$regency" ] && break 2
        done
    done
    [ -n "$regency" ] || { echo "no replica reported its regency" >&2; failed=1; break; }
    regency=${regency%.*}
    leader=$((regency % 4))
    frozen=$(replica_pid "$leader")
    [ -n "$frozen" ] || { echo "replica $leader is not running" >&2; failed=1; break; }
    kill -STOP "$frozen"
    t0=$(date +%s%N)
    done_ms=""
    while (( ($(date +%s%N) - t0) / 1000000 < 60000 )); do
        all=1
        for i in 0 1 2 3; do
            [ "$i" = "$leader" ] && continue
            r=$(metric kmmr_regency "$i")
            [ -n "$r" ] && [ "${r%.*}" -gt "$regency" ] || all=0
        done
        if [ "$all" = 1 ]; then done_ms=$(( ($(date +%s%N) - t0) / 1000000 )); break; fi
        sleep 0.1
    done
    sleep 1
    kill -CONT "$frozen"
    frozen=
    if [ -n "$done_ms" ]; then
        echo "$(date +%T) load $(cut -d' ' -f1 /proc/loadavg): leader change $k away from frozen replica $leader (regency $regency) completed in $done_ms ms"
    else
        echo "$(date +%T): leader change $k away from frozen replica $leader (regency $regency) did not complete in 60 s"
        failed=1
    fi
done
wait "$heavy_pid" || true
wait "$small_pid" || true
regencies=""
for i in 0 1 2 3; do
    regencies+=" $(metric kmmr_regency "$i")"
    p=$(replica_pid "$i")
    [ -n "$p" ] || { echo "replica $i exited" >&2; failed=1; continue; }
    rss+=" $(rss_mib "$p")"
done
echo "regencies:$regencies; peak RSS (MiB):${rss:-}"
python3 - "$dir.heavy" "$dir.small" <<'EOF' || failed=1
import json, sys
def last(path):
    lines = [l for l in open(path) if l.startswith("{")]
    if not lines:
        sys.exit(f"{path}: no result: {open(path).read()[-500:]}")
    return json.loads(lines[-1])
h, s = last(sys.argv[1]), last(sys.argv[2])
print(f"1 MiB puts: {h['ops_per_sec']:.1f}/s ({h['ops']} in {h['seconds']:.0f} s, {h['errors']} errors), "
      f"p50 {h['p50_us'] / 1000:.0f} ms, p99 {h['p99_us'] / 1000:.0f} ms")
print(f"100-byte puts: {s['ops']} ({s['errors']} errors), p50 {s['p50_us'] / 1000:.1f} ms, "
      f"p99 {s['p99_us'] / 1000:.1f} ms, max {s['max_us'] / 1000:.1f} ms")
if s["p99_us"] >= 1_000_000 or s["errors"] or not s["ops"]:
    sys.exit("the small client's p99 is 1 s or more, or it had errors")
EOF
# The cluster still serves after it all: a write, then a linearizable read of it.
"$bin" put --cluster "$dir" heavy-values/after ok >/dev/null 2>&1 \
    && "$bin" get --cluster "$dir" -o json heavy-values/after 2>/dev/null | grep -q '"ok"' \
    || { echo "a write after the run did not read back" >&2; failed=1; }
exit "$failed"
