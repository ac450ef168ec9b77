#!/usr/bin/env bash
# The paper's DDoS experiments (section 5 of the KmMR paper) on this machine, KmMR against etcd
# (the paper's KmMC) side by side: every member in a network namespace of its own behind a shaped
# link, one closed-loop client (one write at a time, as the paper's work nodes), and a flooder
# (bench/paper/flood) aimed at one member from an attacker namespace.
#
#   sudo bench/paper/run.sh [options]        (needs root: namespaces, veth, tc)
#
#   --systems "kmmr etcd"  KmMR (kmmr.sh: durable, KV service) and etcd (etcd.sh: fsync on)
#   --n "5 7"           cluster sizes
#   --scenarios "1 2"   1: nobody crashed; 2: the most crashes the protocol tolerates first
#                       (KmMR f, etcd a minority: never started), then the flood on one more
#                       member, which the quorum then needs
#   --rates "0 0.5 1 1.2"   flood rates as fractions of the link rate
#   --link-mbit 100     every link's rate, both ways (tbf)
#   --seconds 8         measured seconds per point (the flood lasts exactly this long)
#   --warmup 2          seconds of writes before the flood starts
#   --reps 3            repetitions of every point
#   --flood-size 1400   bytes of each flood datagram; 65495 floods with IP fragments, as the
#                       paper's hping3 did (the victim must reassemble them)
#   --bandwidth-seconds 2  after the window, iperf3 measures for this long what is left of the
#                       victim's link, the flood still on (0: not measured)
#   --victim leader     the member to flood: the leader (KmMR's first leader, etcd's elected one)
#                       or a follower
#   --out DIR           where points.csv, the logs, the table (results.md) and the plots go
#                       (default bench/paper/results/<time>; report.sh makes table and plots)
#   --smoke             CI's short run: n=4, scenario 2, rates 0 and 1, 4 s, 1 repetition, both
#                       systems; fails unless each made progress without a flood, iperf3
#                       measured the link, the flood reached its victim, and nothing is left
#                       behind
#
# Points are interleaved: each (scenario, n, rate) runs on every system before the next, and
# repetitions come last, so a slow phase of a shared machine does not fall on one system or one
# point only. Each point gets fresh namespaces, keys and data, and everything a point created
# (processes, namespaces, the links and their qdiscs, which die with their namespaces) is removed
# when the point ends, when the script exits, and when it is interrupted; a run killed outright
# is cleaned up by the next one. A point costs warmup + seconds + bandwidth-seconds + 5-6 s (start, stop, namespaces).
#
# Binaries: KMMR_BIN, KMMR_PUT_BIN and FLOOD_BIN, else `cargo build --release` of them;
# etcd and bench/etcd-bench are built from their Go modules and cached (bench/lib.sh).
# KMMR_PROTOCOL_EXTRA: lines added to every replica's [protocol] table (a test of a tunable,
# e.g. 'slow_leader_floor_ms = 5\n'). BENCH_TMP: where members keep their data (a disk, not
# tmpfs: fsync must cost what it costs).
#
# Columns of points.csv: system,scenario,n,crashed,victim,rate,flood_mbit,rep,ops,p50_ms,p99_ms,
# max_ms,errors,leader_changes,victim_cpu_pct,victim_rss_mib,flood_sent_mbit,victim_rx_mbit,
# bandwidth_left_mbit,victim_role,victim_drops_per_s
#   victim         the flooded member's index; victim_role: leader or follower (--victim)
#   ops            writes that started and were acknowledged within the flood window
#   p50/p99/max    their time, client to acknowledgement (one in flight: a write's consensus
#                  time as the client sees it); a write still waiting at the window's end is
#                  not counted, so a stall shows as few ops
#   errors         writes that failed within the window
#   leader_changes during the window (KmMR: regency steps; etcd: leader changes seen), the
#                  most any member reports
#   victim_*       the flooded member's CPU during the window (percent of one core) and its
#                  peak resident memory (VmHWM)
#   flood_sent     what the flooder sent; victim_rx: all that reached the victim's interface
#   victim_drops_per_s  packets per second the shaper on the victim's inbound link dropped in the
#                  window (its queue was full): flood and legitimate traffic alike
#   bandwidth_left what iperf3 (TCP, client to victim) got through the victim's link in the
#                  --bandwidth-seconds after the window, the flood still on (empty when 0)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

log() { printf '[paper %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

systems="kmmr etcd" ns_list="5 7" scenarios="1 2" rates="0 0.5 1 1.2" link=100
seconds=8 warmup=2 reps=3 victim=leader out="" smoke=0 flood_size=1400 bw_seconds=2
while (($#)); do
  [[ $1 == --smoke || $1 == -h || $1 == --help ]] || (($# >= 2)) || die "$1 needs a value (see --help)"
  case $1 in
    --systems) systems=$2; shift 2 ;;
    --n) ns_list=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --link-mbit) link=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --victim) victim=$2; shift 2 ;;
    --flood-size) flood_size=$2; shift 2 ;;
    --bandwidth-seconds) bw_seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --smoke) smoke=1; ns_list=4 scenarios=2 rates="0 1" seconds=4 warmup=2 reps=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
int() { [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3 && $2 <= $4)) || die "$1 must be an integer in $3..$4, not '$2'"; }
for sys in $systems; do [[ $sys == kmmr || $sys == etcd ]] || die "--systems takes kmmr and etcd, not '$sys'"; done
for n in $ns_list; do int --n "$n" 4 13; done
for s in $scenarios; do [[ $s == 1 || $s == 2 ]] || die "--scenarios takes 1 and 2, not '$s'"; done
for r in $rates; do
  [[ $r =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v r="$r" 'BEGIN { exit !(r <= 2) }' \
    || die "--rates takes fractions of the link rate from 0 to 2, not '$r'"
done
int --link-mbit "$link" 1 10000
int --seconds "$seconds" 1 600
int --warmup "$warmup" 1 600
int --reps "$reps" 1 20
int --flood-size "$flood_size" 1 65507
int --bandwidth-seconds "$bw_seconds" 0 60
[[ $victim == leader || $victim == follower ]] || die "--victim is leader or follower, not '$victim'"
((EUID == 0)) || die "needs root for network namespaces, veth pairs and tc (run it with sudo)"
for t in ip tc curl python3; do command -v "$t" >/dev/null || die "$t is not installed"; done
[[ " $systems " != *" etcd "* ]] || command -v go >/dev/null \
  || die "go is not installed (etcd and its client are built from their Go modules)"
if ((bw_seconds > 0)) && ! command -v iperf3 >/dev/null; then
  log "installing iperf3 (Debian's package) for the bandwidth measurement"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 >/dev/null; } \
    || die "iperf3 is not installed and apt-get could not install it (or pass --bandwidth-seconds 0)"
fi
IPERF_PORT=5201
tmp=${BENCH_TMP:-${TMPDIR:-/tmp}}
case $(stat -f -c %T "$tmp") in
  tmpfs | ramfs) die "$tmp is in memory: fsync would cost nothing; set BENCH_TMP to a directory on a disk" ;;
esac

# shellcheck source=net.sh
source "$here/net.sh"
# shellcheck source=kmmr.sh
source "$here/kmmr.sh"
# shellcheck source=etcd.sh
source "$here/etcd.sh"
# shellcheck source=../../e2e/testbed/versions.sh
source "$repo/e2e/testbed/versions.sh"
# bench/lib.sh's builds (etcd, etcd-bench); its process bookkeeping and traps are not used here.
KMMR_BENCH_CACHE="${KMMR_BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-bench}"
# shellcheck source=../lib.sh
source "$repo/bench/lib.sh"
trap - EXIT INT TERM
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

if [[ -z ${KMMR_BIN:-} || -z ${KMMR_PUT_BIN:-} || -z ${FLOOD_BIN:-} ]]; then
  log "building kmmr-replica, kmmr-put-bench and kmmr-flood (cargo build --release)"
  (cd "$repo" && nice -n 10 cargo build --release -q -p kmmr-replica -p kmmr-put-bench -p kmmr-flood)
  target=${CARGO_TARGET_DIR:-$repo/target}
  KMMR_BIN=${KMMR_BIN:-$target/release/kmmr-replica}
  KMMR_PUT_BIN=${KMMR_PUT_BIN:-$target/release/kmmr-put-bench}
  FLOOD_BIN=${FLOOD_BIN:-$target/release/kmmr-flood}
fi
for b in "$KMMR_BIN" "$KMMR_PUT_BIN" "$FLOOD_BIN"; do [[ -x $b ]] || die "no executable at $b"; done
if [[ " $systems " == *" etcd "* ]]; then
  build_etcd
  build_etcd_bench
fi

out=${out:-$here/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/logs"
csv=$out/points.csv
echo "system,scenario,n,crashed,victim,rate,flood_mbit,rep,ops,p50_ms,p99_ms,max_ms,errors,leader_changes,victim_cpu_pct,victim_rss_mib,flood_sent_mbit,victim_rx_mbit,bandwidth_left_mbit,victim_role,victim_drops_per_s" >"$csv"

prefix=kp$$
point_dir=""  # the point in progress: keys, data and logs
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  net_down "$prefix"
  [[ -z $point_dir ]] || rm -rf "$point_dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
net_reap_stale

in_client() { ip netns exec "$prefix-cl" "$@"; }

metric() { # url name: a metric's value, read from the client's namespace
  in_client curl -sf -m 2 "$1" 2>/dev/null | awk -v m="$2" '$1 == m { print $2; exit }'
}

# ops,p50_ms,p99_ms,max_ms,errors from the client's JSON line (etcd-bench and kmmr-put-bench
# print the same fields); zeros when it printed none.
bench_result() { # dir
  python3 - "$1/bench.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read().strip()
r = json.loads(text.splitlines()[-1]) if text else {}
ms = lambda k: r.get(k, 0) / 1000
print(f"{r.get('ops', 0)},{ms('p50_us'):.3f},{ms('p99_us'):.3f},{ms('max_us'):.3f},{r.get('errors', 0)}")
EOF
}

# One point: fresh namespaces and cluster, warm-up, then the flood for `seconds` while the
# client writes; a line in points.csv.
run_point() { # system scenario n rate rep
  local sys=$1 scenario=$2 n=$3 rate=$4 rep=$5
  local crashed=0 v i dir tag
  pids=()
  [[ $scenario == 2 ]] && crashed=$("${sys}_crashed" "$n")
  up_count=$((n - crashed))
  tag="$sys-s$scenario-n$n-r$rate-$rep"
  dir=$(mktemp -d "$tmp/kmmr-paper.XXXXXX")
  point_dir=$dir
  net_up "$prefix" "$n" "$link"
  # Scenario 2's crashed members are the last ones: they are never started.
  "${sys}_start" "$dir" "$n" "$up_count"
  v=$("${sys}_victim" "$victim" "$up_count")
  "${sys}_client" "$dir"
  sleep "$warmup"
  local victim_pid=${pids[$v]} mbit t0 t1 c0 c1 r0 r1 rx0 rx1 d0 d1 rss flood="" sent=0 bw=""
  mbit=$(awk -v r="$rate" -v l="$link" 'BEGIN { printf "%d", r * l + 0.5 }')
  if ((bw_seconds > 0)); then
    ip netns exec "$prefix-m$v" iperf3 -s -1 -p "$IPERF_PORT" >"$dir/iperf-server.err" 2>&1 &
    disown "$!"
  fi
  r0=$("${sys}_leader_changes" "$up_count")
  c0=$(cpu_ticks "$victim_pid")
  rx0=$(net_rx_bytes "$prefix" "m$v")
  d0=$(net_drops "$prefix" "m$v")
  t0=$(date +%s.%N)
  # The flood lasts the measured window, then the bandwidth measurement after it.
  if ((mbit > 0)); then
    ip netns exec "$prefix-at" "$FLOOD_BIN" udp --target "$(net_addr "m$v"):9" \
      --allow "$NET_SUBNET" --mbit "$mbit" --seconds "$((seconds + bw_seconds))" \
      --max-packets 1000000000 --size "$flood_size" >"$dir/flood.json" 2>"$dir/flood.err" &
    flood=$!
  fi
  sleep "$seconds"
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$victim_pid")
  rss=$(peak_rss_kib "$victim_pid")
  rx1=$(net_rx_bytes "$prefix" "m$v")
  d1=$(net_drops "$prefix" "m$v")
  r1=$("${sys}_leader_changes" "$up_count")
  # What is left of the victim's link for other traffic (iperf3's TCP, client to victim), while
  # the flood goes on and the cluster keeps working.
  if ((bw_seconds > 0)); then
    bw=$(in_client timeout "$((bw_seconds + 15))" iperf3 -c "$(net_addr "m$v")" -p "$IPERF_PORT" \
      -t "$bw_seconds" -J 2>"$dir/iperf.err" | python3 -c 'import json, sys
try:
    print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e6))
except (ValueError, KeyError):
    print(0)') || bw=0
  fi
  [[ -z $flood ]] || wait "$flood" || log "flood exited with $? ($tag): $(tail -2 "$dir/flood.err")"
  wait "$client_pid" 2>/dev/null || true
  [[ -s $dir/flood.json ]] && sent=$(python3 -c 'import json, sys
print("%.1f" % json.loads(open(sys.argv[1]).read().splitlines()[-1]).get("achieved_mbit", 0))' "$dir/flood.json")
  printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n' "$sys" "$scenario" "$n" "$crashed" "$v" \
    "$rate" "$mbit" "$rep" "$(bench_result "$dir")" "$((r1 - r0))" \
    "$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", (b - a) / hz / (t1 - t0) * 100 }')" \
    "$((rss / 1024))" "$sent" \
    "$(awk -v a="$rx0" -v b="$rx1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", (b - a) * 8 / 1e6 / (t1 - t0) }')" \
    "$bw" "$victim" \
    "$(awk -v a="$d0" -v b="$d1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (b - a) / (t1 - t0) }')" >>"$csv"
  log "$tag: $(tail -1 "$csv")"
  # Members stop on SIGTERM; what is left after 5 s dies with the namespaces.
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local p alive
  for ((i = 0; i < 50; i++)); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  net_down "$prefix"
  mkdir -p "$out/logs/$tag"
  cp "$dir"/*.log "$dir"/*.err "$out/logs/$tag/" 2>/dev/null || true
  rm -rf "$dir"
  point_dir=""
}

log "link ${link} Mbit/s, ${seconds} s per point after ${warmup} s, ${reps} repetition(s); results in $out"
for ((rep = 1; rep <= reps; rep++)); do
  for scenario in $scenarios; do
    for n in $ns_list; do
      for rate in $rates; do
        for sys in $systems; do
          run_point "$sys" "$scenario" "$n" "$rate" "$rep"
        done
      done
    done
  done
done
log "done: $csv"
column -s, -t "$csv" >&2 || cat "$csv" >&2
((smoke)) || "$here/report.sh" "$out"

if ((smoke)); then
  # The harness must not rot: the point without flood made progress, the flood ran at a
  # measurable rate, and nothing it created is left.
  python3 - "$csv" "$link" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
link = float(sys.argv[2])
for system in sorted({r["system"] for r in rows}):
    mine = [r for r in rows if r["system"] == system]
    quiet = [r for r in mine if float(r["rate"]) == 0]
    flooded = [r for r in mine if float(r["rate"]) > 0]
    assert quiet and int(quiet[0]["ops"]) > 0, f"{system}: no write acknowledged without a flood: {quiet}"
    assert flooded and float(flooded[0]["flood_sent_mbit"]) > 0.5 * link, f"{system}: the flood did not run: {flooded}"
    assert float(flooded[0]["victim_rx_mbit"]) > 0.5 * link, f"{system}: the flood did not reach the victim: {flooded}"
    assert float(quiet[0]["bandwidth_left_mbit"] or 0) > 0.5 * link, f"{system}: iperf3 measured no bandwidth without a flood: {quiet}"
print("paper smoke: ok", file=sys.stderr)
EOF
  net_down "$prefix"
  left=$(ip netns list | grep -c "^$prefix-" || true)
  ((left == 0)) || die "$left namespaces left behind"
fi
