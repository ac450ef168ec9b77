#!/usr/bin/env bash
# Leader changes on a host whose CPUs are taken by unrelated work (issue 15): a local cluster
# (n=4, durable, key-value, slow-leader detection on) serves 4 clients putting values while
# HOGS busy loops, at the same priority as the replicas, hold every core for SECONDS.
#
#   replica/scripts/busy-host.sh BINARY [SECONDS, default 60] [HOGS, default 2 per core]
#
# Every 5 s it prints the load average, the highest regency, the replicas' CPU wait
# (kmmr_cpu_wait_ratio) and how many slow-leader judgements they withheld; at the end, the
# leader changes during the run and the clients' throughput and latency. Ports from
# KMMR_BASE_PORT (25000) up, directory kmmr-busy-host/ (replaced). Traffic stays on loopback;
# the hogs and the cluster stop with the script, however it ends.
set -euo pipefail
bin=${1:?the kmmr-replica binary}
secs=${2:-60}
hogs=${3:-$((2 * $(nproc)))}
base=${KMMR_BASE_PORT:-25000}
dir=kmmr-busy-host
pid=
hog_pids=()
cleanup() {
    for h in "${hog_pids[@]}"; do kill "$h" 2>/dev/null || true; done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir" "$dir.out" "$dir.bench"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }

metric() { # metric NAME REPLICA: the value of an unlabelled metric, 0 if absent
    curl -s --max-time 2 "http://127.0.0.1:$((base + 2000 + $2))/metrics" \
        | awk -v m="$1" '$1 == m { print $2; found = 1 } END { if (!found) print 0 }'
}
snapshot() { # one line: load, max regency, CPU wait and withheld judgements per replica
    local regency=0 waits="" withheld=""
    for i in 0 1 2 3; do
        r=$(metric kmmr_regency "$i")
        [ "${r%.*}" -gt "$regency" ] && regency=${r%.*}
        waits+=" $(printf '%.2f' "$(metric kmmr_cpu_wait_ratio "$i")")"
        withheld+=" $(metric kmmr_slow_leader_withheld_total "$i")"
    done
    printf '%s load %s regency %s cpu_wait%s withheld%s\n' "$(date +%T)" \
        "$(cut -d' ' -f1 /proc/loadavg)" "$regency" "$waits" "$withheld"
    last_regency=$regency
}

rm -rf "$dir"
"$bin" local --n 4 --service kv --keep-running --dir "$dir" --base-port "$base" >"$dir.out" 2>&1 &
pid=$!
for _ in $(seq 150); do
    grep -q "local cluster" "$dir.out" 2>/dev/null && break
    sleep 0.2
done
grep -q "local cluster" "$dir.out" || { cat "$dir.out" >&2; exit 1; }
"$bin" bench --cluster "$dir" --op put --request-size 100 --clients 4 --window 1 \
    --duration "$((secs + 6))" --warmup 1 --json >"$dir.bench" 2>&1 &
bench=$!
sleep 3
snapshot
start_regency=$last_regency
for _ in $(seq "$hogs"); do
    timeout "$secs" sh -c 'while :; do :; done' &
    hog_pids+=($!)
done
end=$((SECONDS + secs))
while [ $SECONDS -lt $end ]; do
    sleep 5
    snapshot
done
wait "$bench" || { echo "the bench failed:" >&2; cat "$dir.bench" >&2; exit 1; }
snapshot
echo "leader changes while $hogs hogs held the cores for ${secs}s: $((last_regency - start_regency))"
echo "bench: $(tail -1 "$dir.bench")"
