#!/usr/bin/env bash
# `local` started COUNT times in a row on random base ports (issue 15): half below the kernel's
# ephemeral range, half inside it, where outgoing connections take their local ports. Each run
# starts a 4-replica cluster in a fresh directory, runs a checked workload of 20 operations, and
# stops. About 0.2 s a run on a quiet 2-core machine.
#
#   replica/scripts/local-starts.sh BINARY [COUNT, default 200]
#
# Inside the ephemeral range a port can be the local end of a recent outgoing connection, held
# in TIME_WAIT for 60 s. The earlier runs' own clients and replicas leave thousands, but they
# dial with SO_REUSEADDR, so those keep no listener off a port (before that, 13 of 100 starts
# inside the range were refused). Another program's can: `local` must then refuse at once,
# saying which port and why; anything else is a failure. So the script exits non-zero if a run below the range failed, or if a run inside it
# failed any other way than that refusal. It prints a line per failed run and a summary. A base
# port whose ports are already listened on is skipped: that is someone else's. Directories go
# under a temporary one, removed on exit.
set -euo pipefail
bin=${1:?the kmmr-replica binary}
count=${2:-200}
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
[[ $count =~ ^[0-9]+$ ]] || { echo "COUNT is a whole number" >&2; exit 2; }
read -r eph_low eph_high </proc/sys/net/ipv4/ip_local_port_range
work=$(mktemp -d "${TMPDIR:-/tmp}/kmmr-local-starts.XXXXXX")
trap 'pkill -f -- "--dir $work/" 2>/dev/null || true; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

listening() { # base: whether any of the layout's 12 ports has a listener
    local b=$1 i
    for i in 0 1 2 3; do
        for off in 0 1000 2000; do
            ss -Hltn "sport = :$((b + off + i))" | grep -q . && return 0
        done
    done
    return 1
}

ok=0 failed=0 refused=0 skipped=0 times=()
start=$SECONDS
for ((run = 1; run <= count; run++)); do
    inside=$((run % 2 == 0))
    if ((inside)); then
        base=$((eph_low + (RANDOM * 32768 + RANDOM) % (eph_high - eph_low - 2004)))
    else
        base=$((10000 + RANDOM % (eph_low - 10000 - 2004)))
    fi
    if listening "$base"; then
        skipped=$((skipped + 1))
        continue
    fi
    t0=$(date +%s%N)
    if timeout 120 "$bin" local --n 4 --dir "$work/c$run" --base-port "$base" --workload 20 \
        >"$work/out" 2>&1; then
        ok=$((ok + 1))
    elif ((inside)) && grep -q "is in use by a connection that closed within the last minute" "$work/out"; then
        refused=$((refused + 1))
    else
        failed=$((failed + 1))
        echo "run $run, base port $base: failed"
        tail -3 "$work/out" | sed 's/^/    /'
    fi
    times+=($((($(date +%s%N) - t0) / 1000000)))
    rm -rf "$work/c$run"
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(sed -n "$(((${#times[@]} + 1) / 2))p" <<<"$sorted")
echo "starts: $ok ok, $failed failed, $refused refused at once inside the ephemeral range" \
    "($eph_low-$eph_high) for a port in TIME_WAIT, $skipped base ports skipped (listened on);" \
    "a run took ${median} ms (median), $(tail -1 <<<"$sorted") ms (max); $((SECONDS - start)) s in all"
((failed == 0))
