#!/usr/bin/env bash
# The paper's DDoS experiments (section 5 of the KmMR paper) on this machine: a KmMR cluster
# (durable, KV service) with every replica in a network namespace of its own behind a shaped
# link, one closed-loop client (one write at a time, as the paper's work nodes), and a flooder
# (bench/paper/flood) aimed at one replica from an attacker namespace.
#
#   sudo bench/paper/run.sh [options]        (needs root: namespaces, veth, tc)
#
#   --n "5 7"           cluster sizes
#   --scenarios "1 2"   1: nobody crashed; 2: f replicas crashed first (not started), then the
#                       flood on one more, which the quorum then needs
#   --rates "0 0.25 0.5 0.75 1 1.2"   flood rates as fractions of the link rate
#   --link-mbit 100     every link's rate, both ways (tbf)
#   --seconds 20        measured seconds per point (the flood lasts exactly this long)
#   --warmup 5          seconds of writes before the flood starts
#   --reps 3            repetitions of every point (interleaved: all points, then again)
#   --victim leader     leader (replica 0, the first leader) or follower (replica 1)
#   --out DIR           where points.csv and the logs go (default bench/paper/results/<time>)
#   --smoke             CI's short run: n=4, scenario 2, rates 0 and 1, 4 s, 1 repetition;
#                       fails unless the run without flood made progress and the flood ran
#
# Each point gets fresh namespaces, keys and data, and everything a point created (processes,
# namespaces, the links and their qdiscs, which die with their namespaces) is removed when the
# point ends, when the script exits, and when it is interrupted; a run killed outright is
# cleaned up by the next one. A point costs warmup + seconds + about 3 s.
#
# Binaries: KMMR_BIN and FLOOD_BIN, else `cargo build --release -p kmmr-replica -p kmmr-flood`.
# KMMR_PROTOCOL_EXTRA: lines added to every replica's [protocol] table (a test of a tunable,
# e.g. 'slow_leader_floor_ms = 5\n').
#
# Columns of points.csv: system,scenario,n,crashed,victim,rate,flood_mbit,rep,ops,p50_ms,p99_ms,
# max_ms,stall_ms,leader_changes,victim_cpu_pct,victim_rss_mib,flood_sent_mbit,victim_rx_mbit
#   ops            writes acknowledged during the flood window
#   p50/p99/max    time from one acknowledgement to the next (one write in flight: its consensus
#                  time as the client sees it), over the window
#   stall_ms       time from the last acknowledgement to the window's end (a stalled cluster)
#   leader_changes regency steps during the window (the highest regency any replica reports)
#   victim_*       the flooded replica's CPU (percent of one core) and peak resident memory
#   flood_sent     what the flooder sent; victim_rx: all that reached the victim's interface
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=net.sh
source "$here/net.sh"

log() { printf '[paper %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

ns_list="5 7" scenarios="1 2" rates="0 0.25 0.5 0.75 1 1.2" link=100 seconds=20 warmup=5
reps=3 victim=leader out="" smoke=0
while (($#)); do
  case $1 in
    --n) ns_list=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --link-mbit) link=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --victim) victim=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --smoke) smoke=1; ns_list=4 scenarios=2 rates="0 1" seconds=4 warmup=2 reps=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
int() { [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3 && $2 <= $4)) || die "$1 must be an integer in $3..$4, not '$2'"; }
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
[[ $victim == leader || $victim == follower ]] || die "--victim is leader or follower, not '$victim'"
((EUID == 0)) || die "needs root for network namespaces, veth pairs and tc (run it with sudo)"
for t in ip tc curl python3; do command -v "$t" >/dev/null || die "$t is not installed"; done

if [[ -z ${KMMR_BIN:-} || -z ${FLOOD_BIN:-} ]]; then
  log "building kmmr-replica and kmmr-flood (cargo build --release)"
  (cd "$repo" && nice -n 10 cargo build --release -q -p kmmr-replica -p kmmr-flood)
  target=${CARGO_TARGET_DIR:-$repo/target}
  KMMR_BIN=${KMMR_BIN:-$target/release/kmmr-replica}
  FLOOD_BIN=${FLOOD_BIN:-$target/release/kmmr-flood}
fi
[[ -x $KMMR_BIN && -x $FLOOD_BIN ]] || die "no executable at $KMMR_BIN or $FLOOD_BIN"

out=${out:-$here/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/logs"
csv=$out/points.csv
echo "system,scenario,n,crashed,victim,rate,flood_mbit,rep,ops,p50_ms,p99_ms,max_ms,stall_ms,leader_changes,victim_cpu_pct,victim_rss_mib,flood_sent_mbit,victim_rx_mbit" >"$csv"

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

PEER_PORT=11000 HTTP_PORT=13000

# Keys, view and configs for n replicas at their namespace addresses (peer port 11000, clients
# on 12000 by the view's convention, HTTP on 13000).
make_cluster() { # dir n
  local dir=$1 n=$2 i f=$((($2 - 1) / 3))
  mkdir -p "$dir"
  "$KMMR_BIN" keygen --out "$dir/admin.key" >"$dir/admin.pub"
  {
    echo "id = 0"
    echo "f = $f"
    echo "admin_key = \"$(cat "$dir/admin.pub")\""
    for ((i = 0; i < n; i++)); do
      printf '\n[[members]]\nid = %d\naddress = "%s:%d"\nkey = "%s"\n' "$i" \
        "$(net_addr "m$i")" "$PEER_PORT" "$("$KMMR_BIN" keygen --out "$dir/r$i.key")"
    done
  } >"$dir/view.toml"
  for ((i = 0; i < n; i++)); do
    printf 'id = %d\nkey_file = "r%d.key"\nview_file = "view.toml"\ndata_dir = "data/r%d"\nhttp_listen = "%s:%d"\n\n[protocol]\ndurable = true\n%b' \
      "$i" "$i" "$i" "$(net_addr "m$i")" "$HTTP_PORT" "${KMMR_PROTOCOL_EXTRA:-}" >"$dir/r$i.toml"
    mkdir -p "$dir/data/r$i"
  done
}

metric() { # replica name: a metric's value on that replica, from the client's namespace
  ip netns exec "$prefix-cl" curl -sf -m 2 "http://$(net_addr "m$1"):$HTTP_PORT/metrics" 2>/dev/null \
    | awk -v m="$2" '$1 == m { print $2; exit }'
}

max_regency() { # replicas...
  local r best=0 v
  for r in "$@"; do
    v=$(metric "$r" kmmr_regency)
    [[ -n $v ]] && ((${v%.*} > best)) && best=${v%.*}
  done
  echo "$best"
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# One point: fresh namespaces and cluster, warm-up, then the flood for `seconds` while the
# client writes; a line in points.csv.
run_point() { # scenario n rate rep
  local scenario=$1 n=$2 rate=$3 rep=$4 f=$((($2 - 1) / 3))
  local crashed=0 v=0 i dir pids=() up=() tag
  [[ $scenario == 2 ]] && crashed=$f
  [[ $victim == follower ]] && v=1
  tag="s$scenario-n$n-r$rate-$rep"
  dir=$(mktemp -d "${TMPDIR:-/tmp}/kmmr-paper.XXXXXX")
  point_dir=$dir
  net_up "$prefix" "$n" "$link"
  make_cluster "$dir" "$n"
  # Scenario 2 crashes the last f replicas: they never start.
  for ((i = 0; i < n - crashed; i++)); do
    ip netns exec "$prefix-m$i" setsid "$KMMR_BIN" run --config "$dir/r$i.toml" \
      >"$dir/r$i.log" 2>&1 </dev/null &
    pids+=($!)
    up+=("$i")
  done
  local deadline=$((SECONDS + 30))
  for i in "${up[@]}"; do
    until ip netns exec "$prefix-cl" curl -sf -m 1 -o /dev/null "http://$(net_addr "m$i"):$HTTP_PORT/healthz"; do
      ((SECONDS < deadline)) || { tail -5 "$dir/r$i.log" >&2; die "replica $i not healthy within 30 s ($tag)"; }
      sleep 0.2
    done
  done
  # The client: one write at a time; each acknowledgement is stamped as it arrives.
  ip netns exec "$prefix-cl" "$KMMR_BIN" writes "paper/" --cluster "$dir" \
    --seconds "$((warmup + seconds + 2))" --interval-ms 0 2>"$dir/client.err" \
    | python3 -u -c 'import sys, time
for line in sys.stdin:
    if line.startswith("acked"):
        print(f"{time.time():.6f}", flush=True)' >"$dir/acks" &
  local client=$!
  sleep "$warmup"
  local victim_pid=${pids[$v]} mbit t0 t1 c0 c1 r0 r1 rx0 rx1 rss=0 flood_out=""
  mbit=$(awk -v r="$rate" -v l="$link" 'BEGIN { printf "%d", r * l + 0.5 }')
  r0=$(max_regency "${up[@]}")
  c0=$(cpu_ticks "$victim_pid")
  rx0=$(net_rx_bytes "$prefix" "m$v")
  t0=$(date +%s.%N)
  local flood=""
  if ((mbit > 0)); then
    ip netns exec "$prefix-at" "$FLOOD_BIN" udp --target "$(net_addr "m$v"):$PEER_PORT" \
      --allow "$NET_SUBNET" --mbit "$mbit" --seconds "$seconds" --max-packets 1000000000 \
      --size 1400 >"$dir/flood.json" 2>"$dir/flood.err" &
    flood=$!
  fi
  for ((i = 0; i < seconds * 2; i++)); do
    sleep 0.5
    local now
    now=$(rss_kib "$victim_pid")
    ((now > rss)) && rss=$now
  done
  [[ -z $flood ]] || wait "$flood" || log "flood exited with $? ($tag): $(tail -2 "$dir/flood.err")"
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$victim_pid")
  rx1=$(net_rx_bytes "$prefix" "m$v")
  r1=$(max_regency "${up[@]}")
  log "$tag: regency $r0 before the flood, $r1 after"
  wait "$client" 2>/dev/null || true
  [[ -s $dir/flood.json ]] && flood_out=$(tail -1 "$dir/flood.json")
  local hz row
  hz=$(getconf CLK_TCK)
  row=$(python3 - "$dir/acks" "$t0" "$t1" <<'EOF'
import sys
acks = [float(l) for l in open(sys.argv[1]) if l.strip()]
t0, t1 = float(sys.argv[2]), float(sys.argv[3])
gaps, prev = [], None
for t in acks:
    if prev is not None and t0 <= t <= t1:
        gaps.append((t - max(prev, t0)) * 1000)
    prev = t
inside = [t for t in acks if t0 <= t <= t1]
last = inside[-1] if inside else t0
gaps.sort()
pct = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else 0.0
print(f"{len(inside)},{pct(0.5):.3f},{pct(0.99):.3f},{(gaps[-1] if gaps else 0.0):.3f},{(t1 - last) * 1000:.1f}")
EOF
)
  local sent
  sent=$(python3 -c 'import json, sys
s = sys.argv[1]
print("%.1f" % (json.loads(s).get("achieved_mbit", 0) if s else 0))' "$flood_out")
  printf 'kmmr,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n' "$scenario" "$n" "$crashed" "$v" "$rate" \
    "$mbit" "$rep" "$row" "$((r1 - r0))" \
    "$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", (b - a) / hz / (t1 - t0) * 100 }')" \
    "$((rss / 1024))" "$sent" \
    "$(awk -v a="$rx0" -v b="$rx1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", (b - a) * 8 / 1e6 / (t1 - t0) }')" \
    >>"$csv"
  log "$tag: $(tail -1 "$csv")"
  # Replicas stop on SIGTERM; what is left after 5 s dies with the namespaces.
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.1
  done
  net_down "$prefix"
  { wait "${pids[@]}"; } 2>/dev/null || true
  mkdir -p "$out/logs/$tag"
  cp "$dir"/*.log "$dir/client.err" "$out/logs/$tag/" 2>/dev/null || true
  [[ -f $dir/flood.err ]] && cp "$dir/flood.err" "$out/logs/$tag/"
  rm -rf "$dir"
  point_dir=""
}

log "link ${link} Mbit/s, ${seconds} s per point after ${warmup} s, ${reps} repetition(s); results in $out"
for ((rep = 1; rep <= reps; rep++)); do
  for scenario in $scenarios; do
    for n in $ns_list; do
      for rate in $rates; do
        run_point "$scenario" "$n" "$rate" "$rep"
      done
    done
  done
done
log "done: $csv"
column -s, -t "$csv" >&2 || cat "$csv" >&2

if ((smoke)); then
  # The harness must not rot: the point without flood made progress, the flood ran at a
  # measurable rate, and nothing it created is left.
  python3 - "$csv" "$link" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
link = float(sys.argv[2])
quiet = [r for r in rows if float(r["rate"]) == 0]
flooded = [r for r in rows if float(r["rate"]) > 0]
assert quiet and int(quiet[0]["ops"]) > 0, f"no write acknowledged without a flood: {quiet}"
assert flooded and float(flooded[0]["flood_sent_mbit"]) > 0.5 * link, f"the flood did not run: {flooded}"
assert float(flooded[0]["victim_rx_mbit"]) > 0.5 * link, f"the flood did not reach the victim: {flooded}"
print("paper smoke: ok", file=sys.stderr)
EOF
  net_down "$prefix"
  left=$(ip netns list | grep -c "^$prefix-" || true)
  ((left == 0)) || die "$left namespaces left behind"
fi
