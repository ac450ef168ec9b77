#!/usr/bin/env bash
# KmMR against etcd, side by side in one run on loopback (the project's target: "at n=5 and n=7,
# ahead of etcd on both latency and throughput with durability on for both").
#
#   bench/compare-etcd.sh [seconds per point, default 5]
#
# For n in 5 7 and each load (1 client x 1 in flight, 64 x 1, 50 x 8), runs every system on a
# fresh cluster, interleaved and repeated REPS times (the order rotates each repetition), and
# prints a markdown table of medians with kmmr/etcd ratios. Systems:
#   etcd       etcd $ETCD_VERSION (e2e/testbed/versions.sh), n members, defaults (fsync on), plain
#              HTTP; load from bench/etcd-bench: a Put of an empty value to a per-client key.
#   kmmr-kv    `kmmr-replica local --n N --service kv` (durable by default); load from
#              bench/kmmr-put: a KV Put of an empty value to a per-client key.
#   kmmr-noop  `kmmr-replica local --n N --service noop`; load from `kmmr-replica bench`
#              (0-byte requests and replies, BFT-SMaRt's 0/0 micro-benchmark).
# Every client has its own connection(s) and keeps `window` requests in flight (closed loop);
# a point measures DURATION seconds after WARMUP seconds.
#
# Builds what is missing: etcd into the test bed's cache ($KMMR_TESTBED_CACHE/etcd-<v>/bin),
# etcd-bench into $KMMR_BENCH_CACHE/etcd-bench-<client version>-<source hash>/, and
# kmmr-replica and kmmr-put-bench with cargo (in $CARGO_TARGET_DIR, default target/).
#
# Environment (all optional):
#   REPS=3            repetitions of each point (the median is reported)
#   WARMUP=2          warm-up seconds of each point
#   NS="5 7"          cluster sizes
#   LOADS="1x1 64x1 50x8"               clients x window
#   SYSTEMS="etcd kmmr-kv kmmr-noop"
#   KMMR_BIN, KMMR_PUT_BIN              use these binaries instead of building them
#   KMMR_LOCAL_ARGS   extra arguments to `kmmr-replica local` (e.g. "--replica-threads 2")
#   BENCH_TMP=/tmp    parent of the run's data directories (must be a real disk: fsync matters)
#   RESULTS_DIR       where results.jsonl, table.md and logs of failures go
#                     (default $KMMR_BENCH_CACHE/results/<date>)
#   ETCD_BASE=26100 KMMR_BASE=27100     loopback ports (etcd: base+2i client, +1 peer;
#                     kmmr: base+i, base+1000+i, base+2000+i)
set -euo pipefail

secs=${1:-5}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=../e2e/testbed/versions.sh
source "$repo/e2e/testbed/versions.sh"

REPS=${REPS:-3}
WARMUP=${WARMUP:-2}
NS=${NS:-"5 7"}
LOADS=${LOADS:-"1x1 64x1 50x8"}
SYSTEMS=${SYSTEMS:-"etcd kmmr-kv kmmr-noop"}
ETCD_BASE=${ETCD_BASE:-26100}
KMMR_BASE=${KMMR_BASE:-27100}
KMMR_BENCH_CACHE="${KMMR_BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-bench}"
RESULTS_DIR=${RESULTS_DIR:-$KMMR_BENCH_CACHE/results/$(date +%Y%m%d-%H%M%S)}
target_dir=${CARGO_TARGET_DIR:-$repo/target}

log() { printf '[compare-etcd %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $secs =~ ^[0-9]+([.][0-9]+)?$ ]] || die "seconds per point must be a number, not '$secs'"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer"
for t in go cargo curl jq python3 setsid timeout ss /usr/bin/time; do
  command -v "$t" >/dev/null || die "$t is needed and not on PATH"
done
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

# ---------------------------------------------------------------- builds
build_kmmr() {
  if [[ -n ${KMMR_BIN:-} ]]; then
    [[ -x $KMMR_BIN ]] || die "KMMR_BIN=$KMMR_BIN is not an executable"
  else
    log "kmmr-replica: cargo build --release -p kmmr-replica (target dir $target_dir)"
    (cd "$repo" && CARGO_TARGET_DIR="$target_dir" env -u OUT_DIR nice -n 10 cargo build --release -q -p kmmr-replica)
    KMMR_BIN="$target_dir/release/kmmr-replica"
  fi
  if [[ -n ${KMMR_PUT_BIN:-} ]]; then
    [[ -x $KMMR_PUT_BIN ]] || die "KMMR_PUT_BIN=$KMMR_PUT_BIN is not an executable"
  elif [[ " $SYSTEMS " == *" kmmr-kv "* ]]; then
    log "kmmr-put-bench: cargo build --release -p kmmr-put-bench (target dir $target_dir)"
    (cd "$repo" && CARGO_TARGET_DIR="$target_dir" env -u OUT_DIR nice -n 10 cargo build --release -q -p kmmr-put-bench)
    KMMR_PUT_BIN="$target_dir/release/kmmr-put-bench"
  fi
}

# shellcheck source=lib.sh
source "$here/lib.sh"

# ---------------------------------------------------------------- one point
# Runs one system at one (n, clients, window) on a fresh cluster and appends a JSON line to
# $RESULTS_DIR/results.jsonl.
run_point() { # system n clients window rep
  local sys=$1 n=$2 clients=$3 window=$4 rep=$5
  local dir="$work/$sys-n$n-${clients}x$window-r$rep" out json cmd=() logs=() pat
  local limit
  limit=$(python3 -c "import math; print(math.ceil($WARMUP + $secs + 60 + $clients * 0.5))")
  case $sys in
    etcd)
      start_etcd "$n" "$dir"
      cmd=("$ETCD_BENCH" --endpoints "$endpoints") ;;
    kmmr-kv)
      start_kmmr "$n" kv "$dir"
      cmd=("$KMMR_PUT_BIN" --cluster "$dir") ;;
    kmmr-noop)
      start_kmmr "$n" noop "$dir"
      cmd=("$KMMR_BIN" bench --cluster "$dir") ;;
    *) die "unknown system $sys" ;;
  esac
  cmd+=(--clients "$clients" --window "$window" --duration "$secs" --warmup "$WARMUP" --json)
  # Leader changes during the client's run: etcd's raft logs each election it sees, kmmr each
  # regency it installs.
  if [[ $sys == etcd ]]; then
    pat="elected leader"; for ((i = 0; i < n; i++)); do logs+=("$dir/m$i.log"); done
  else
    pat="new regency installed"; for ((i = 0; i < n; i++)); do logs+=("$dir/r$i.log"); done
  fi
  local c0 c1 mb0 mt0 mb1 mt1 t0 t1 lc0 lc1
  lc0=$(log_counts "$pat" "${logs[@]}")
  c0=$(cpu_ticks "${server_pids[@]}"); read -r mb0 mt0 < <(machine_ticks); t0=$(date +%s.%N)
  if ! out=$(/usr/bin/time -f 'CPU %U %S' -o "$dir.time" timeout "$limit" "${cmd[@]}" 2>"$dir.err"); then
    mkdir -p "$RESULTS_DIR/failed"
    cp -r "$dir" "$dir.err" "$RESULTS_DIR/failed/" 2>/dev/null || true
    [[ -f $dir.out ]] && cp "$dir.out" "$RESULTS_DIR/failed/"
    log "$sys n=$n ${clients}x$window rep $rep FAILED: $(tail -3 "$dir.err" | tr '\n' ' ') (logs in $RESULTS_DIR/failed)"
    json='{"failed":true}'
  else
    json=$(tail -1 <<<"$out")
  fi
  c1=$(cpu_ticks "${server_pids[@]}"); read -r mb1 mt1 < <(machine_ticks); t1=$(date +%s.%N)
  lc1=$(log_counts "$pat" "${logs[@]}")
  local rss client_cpu
  rss=$(peak_rss_kib "${server_pids[@]}")
  client_cpu=$(awk '/^CPU/{print $2 + $3}' "$dir.time" 2>/dev/null || echo 0)
  case $sys in etcd) stop_etcd ;; *) stop_kmmr ;; esac
  # CPU in percent of one core over the whole client run (warm-up included); machine busy in
  # percent of all cores (every process on the machine, not only ours).
  jq -c --arg sys "$sys" --argjson n "$n" --argjson rep "$rep" --argjson rss "$rss" \
    --argjson scpu "$(python3 -c "print(round(100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0), 1))")" \
    --argjson ccpu "$(python3 -c "print(round(100 * ${client_cpu:-0} / ($t1 - $t0), 1))")" \
    --argjson busy "$(python3 -c "print(round(100 * ($mb1 - $mb0) / max(1, $mt1 - $mt0), 1))")" \
    --arg load "$(cut -d' ' -f1 /proc/loadavg)" \
    --argjson lchanges "$(count_growth "$lc0" "$lc1")" \
    '. + {system: $sys, n: $n, rep: $rep, rss_kib: $rss, server_cpu_pct: $scpu,
          client_cpu_pct: $ccpu, machine_busy_pct: $busy, loadavg1: ($load | tonumber),
          leader_changes: $lchanges}' \
    <<<"$json" >>"$RESULTS_DIR/results.jsonl"
  log "$(tail -1 "$RESULTS_DIR/results.jsonl" | jq -r '"\(.system) n=\(.n) \(.clients // "?")x\(.window // "?") rep \(.rep): \(.ops_per_sec // 0 | round) ops/s, p50 \(.p50_us // 0) us, p99 \(.p99_us // 0) us, errors \(.errors // "-"), peak RSS \(.rss_kib / 1024 | round) MiB, server CPU \(.server_cpu_pct)%, client CPU \(.client_cpu_pct)%, machine busy \(.machine_busy_pct)%, leader changes \(.leader_changes)"')"
  rm -rf "$dir" "$dir.out" "$dir.err" "$dir.time"
}

# ---------------------------------------------------------------- main
# ring's build script reruns when OUT_DIR changes (rerun-if-env-changed), and a rerun rebuilds
# everything above it: builds here run without an OUT_DIR of the caller's.
build_etcd
build_etcd_bench
build_kmmr

mkdir -p "${BENCH_TMP:-${TMPDIR:-/tmp}}" "$RESULTS_DIR"
work=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/compare-etcd.XXXXXX")
fstype=$(stat -f -c %T "$work")
[[ $fstype != tmpfs && $fstype != ramfs ]] \
  || die "$work is on $fstype: fsync would cost nothing; set BENCH_TMP to a directory on a disk"
: >"$RESULTS_DIR/results.jsonl"

read -ra systems <<<"$SYSTEMS"
points=0
for n in $NS; do for load in $LOADS; do points=$((points + REPS * ${#systems[@]})); done; done
log "$points points of ${WARMUP}+${secs} s: systems $SYSTEMS, n in $NS, loads $LOADS, $REPS reps; data in $work ($fstype)"
log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
uptime_start=$(uptime)
for n in $NS; do
  for load in $LOADS; do
    [[ $load =~ ^([0-9]+)x([0-9]+)$ ]] || die "a load is <clients>x<window>, not '$load'"
    for ((rep = 0; rep < REPS; rep++)); do
      # Rotate the order so that no system always runs first (or right after another).
      for ((k = 0; k < ${#systems[@]}; k++)); do
        run_point "${systems[$(((k + rep) % ${#systems[@]}))]}" "$n" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$rep"
      done
    done
  done
done
uptime_end=$(uptime)

python3 "$here/table.py" "$RESULTS_DIR/results.jsonl" \
  --header "Side by side on $(nproc) cores, loopback, ${WARMUP} s warm-up + ${secs} s per point, median of $REPS; etcd $ETCD_VERSION (fsync on) vs kmmr-replica ($(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?'), durable)." \
  --footer "Machine load: at start \`${uptime_start# }\`; at end \`${uptime_end# }\`." \
  | tee "$RESULTS_DIR/table.md"
log "raw results: $RESULTS_DIR/results.jsonl; table: $RESULTS_DIR/table.md"
