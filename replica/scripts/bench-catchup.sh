#!/usr/bin/env bash
# The catch-up benchmark (tests/durability.rs, `catch_up_time_for_a_large_state`) with the
# resident memory of every replica sampled once a second, and a guard that kills the run when
# the machine's available memory falls under KMMR_MIN_AVAIL_MIB (default 3072) or the free disk
# under KMMR_MIN_DISK_MIB (default 2048). KMMR_CATCHUP_PERIOD sets the checkpoint period.
#
#   replica/scripts/bench-catchup.sh <MiB of values> [output directory]
#
# Prints the test's own report, then the peak RSS of each replica. The samples are in
# <output>/rss.tsv (seconds, replica, RSS in KiB, the process's pid), the test output in
# <output>/test.log. Build first:
#   cargo test --release -p kmmr-replica --test durability --no-run
set -euo pipefail
mib=${1:?usage: bench-catchup.sh <MiB> [output dir]}
out=${2:-kmmr-bench-catchup-$mib}
min_avail=${KMMR_MIN_AVAIL_MIB:-3072}
# The replicas' data directories are under $TMPDIR: stop before they fill the disk.
min_disk=${KMMR_MIN_DISK_MIB:-2048}
here=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

touch "$out/started"
cd "$here"
KMMR_CATCHUP_MIB=$mib cargo test --release -p kmmr-replica --test durability catch_up \
    -- --ignored --nocapture >"$out/test.log" 2>&1 &
test_pid=$!

: >"$out/rss.tsv"
start=$(date +%s)
aborted=
while kill -0 "$test_pid" 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    # Replicas of this benchmark only: their config lives in the test's own directory.
    for pid in $(pgrep -f 'kmmr-replica.*kmmr-dur-catchup' || true); do
        cfg=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -o 'r[0-9]*\.toml' || true)
        rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        [ -n "$cfg" ] && [ -n "$rss" ] && printf '%s\t%s\t%s\t%s\n' "$now" "${cfg%.toml}" "$rss" "$pid" >>"$out/rss.tsv"
    done
    avail=$(awk '/^MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
    disk=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}')
    if [ "$avail" -lt "$min_avail" ] || [ "$disk" -lt "$min_disk" ]; then
        echo "available memory $avail MiB, disk $disk MiB: stopping the benchmark" >&2
        aborted=1
        for pid in $(pgrep -f 'kmmr-replica.*kmmr-dur-catchup' || true); do kill "$pid" 2>/dev/null || true; done
        kill "$test_pid" 2>/dev/null || true
        break
    fi
    sleep 1
done
wait "$test_pid" && status=0 || status=$?
# A killed test leaves its cluster directory (gigabytes) behind: remove it.
if [ -n "$aborted" ]; then
    find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'kmmr-dur-catchup-*' -newer "$out/started" \
        -exec rm -rf {} +
fi

grep -E '^(loaded|catch-up|test result)|panicked' "$out/test.log" || true
echo "peak RSS per replica (MiB):"
awk -F'\t' '{ if ($3 > peak[$2]) peak[$2] = $3 } END { for (r in peak) printf "  %s %d\n", r, peak[r] / 1024 }' "$out/rss.tsv" | sort
echo "peak total RSS (MiB):"
awk -F'\t' '{ sum[$1] += $3 } END { m = 0; for (t in sum) if (sum[t] > m) m = sum[t]; printf "  %d\n", m / 1024 }' "$out/rss.tsv"
[ -z "$aborted" ] || exit 1
exit "$status"
