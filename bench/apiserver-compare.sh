#!/usr/bin/env bash
# The same kube-apiserver on KmMR and on etcd, side by side in one run on loopback (issue 14's
# performance target: the apiserver on KmMR within 10% of the one on etcd on every figure).
#
#   bench/apiserver-compare.sh [measured seconds of the create figure, default 10]
#
# Each point starts a fresh store and a fresh kube-apiserver ($K8S_VERSION, the test bed's
# binary) on it, runs bench/apiserver-load (16 clients creating ConfigMaps, a LIST of 10,000,
# the delay from a write to its watch event) and stops everything. Stores, durable on both sides:
#   etcd   etcd $ETCD_VERSION, ETCD_MEMBERS members (default 3), default flags (fsync on)
#   kmmr   `kmmr-replica local --n KMMR_N` (default 4, durable) and one kmmr-etcd-gateway, which
#          the apiserver's --etcd-servers names; KMMR_BYZANTINE=<mode> runs replica 1 in that
#          Byzantine mode (for example corrupt)
# Points are interleaved (the order alternates each repetition), REPS times (default 3), and a
# markdown table of medians with kmmr/etcd ratios is printed.
#
# Environment (all optional):
#   REPS=3 WARMUP=2 CLIENTS=16 LIST_OBJECTS=10000 LIST_REPS=15 WATCH_WRITES=200 VALUE_SIZE=100
#   STORES="etcd kmmr"  ETCD_MEMBERS=3  KMMR_N=4  KMMR_BYZANTINE (unset: every replica correct)
#   KMMR_LOCAL_ARGS   extra arguments to `kmmr-replica local`
#   BENCH_TMP=/tmp    parent of the run's data directories (must be a real disk: fsync matters)
#   RESULTS_DIR       results.jsonl, table.md, the apiserver's /metrics at the end of each point
#                     (metrics/<store>-r<rep>.txt), the gateway's (metrics/gateway-r<rep>.txt),
#                     each replica's and etcd member's (metrics/{replica,etcd}-m<i>-r<rep>.txt)
#                     and the logs of failed points
#                     (default $KMMR_BENCH_CACHE/apiserver-<date>)
#   ETCD_BASE=26300 KMMR_BASE=27300   loopback ports of the stores (the gateway and the
#                     apiserver take ports the OS says are free)
#   KMMR_BIN, KMMR_GATEWAY_BIN, LOAD_BIN   use these binaries instead of building them
#   BENCH_ETCD_METRICS=basic  etcd's --metrics; `extensive` adds the time etcd spends on each
#                     RPC (grpc_server_handling_seconds), to set beside the gateway's
#                     kmmr_etcd_gateway_request_duration_seconds (it costs etcd a little). Not
#                     ETCD_METRICS: etcd reads ETCD_* variables as its flags, and refuses both.
set -euo pipefail

secs=${1:-10}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=../e2e/testbed/versions.sh
source "$repo/e2e/testbed/versions.sh"

REPS=${REPS:-3}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-16}
LIST_OBJECTS=${LIST_OBJECTS:-10000}
LIST_REPS=${LIST_REPS:-15}
WATCH_WRITES=${WATCH_WRITES:-200}
VALUE_SIZE=${VALUE_SIZE:-100}
STORES=${STORES:-"etcd kmmr"}
ETCD_MEMBERS=${ETCD_MEMBERS:-3}
KMMR_N=${KMMR_N:-4}
ETCD_BASE=${ETCD_BASE:-26300}
KMMR_BASE=${KMMR_BASE:-27300}
KMMR_BENCH_CACHE="${KMMR_BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-bench}"
RESULTS_DIR=${RESULTS_DIR:-$KMMR_BENCH_CACHE/apiserver-$(date +%Y%m%d-%H%M%S)}
target_dir=${CARGO_TARGET_DIR:-$repo/target}

log() { printf '[apiserver-compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $secs =~ ^[0-9]+([.][0-9]+)?$ ]] || die "seconds must be a number, not '$secs'"
for v in REPS CLIENTS LIST_OBJECTS LIST_REPS WATCH_WRITES ETCD_MEMBERS KMMR_N; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
((REPS > 0 && CLIENTS > 0)) || die "REPS and CLIENTS must be positive"
BENCH_ETCD_METRICS=${BENCH_ETCD_METRICS:-basic}
[[ $BENCH_ETCD_METRICS == basic || $BENCH_ETCD_METRICS == extensive ]] \
  || die "BENCH_ETCD_METRICS must be basic or extensive, not '$BENCH_ETCD_METRICS'"
for t in cargo curl jq python3 setsid timeout ss openssl; do
  command -v "$t" >/dev/null || die "$t is needed and not on PATH"
done
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

# shellcheck source=lib.sh
source "$here/lib.sh"

# ---------------------------------------------------------------- builds
build_all() {
  [[ -x $K8S_BIN/kube-apiserver ]] || {
    log "kube-apiserver $K8S_VERSION: building with e2e/testbed/build.sh control-plane (once; long)"
    "$repo/e2e/testbed/build.sh" control-plane >&2
  }
  build_etcd
  if [[ -z ${KMMR_BIN:-} || -z ${KMMR_GATEWAY_BIN:-} || -z ${LOAD_BIN:-} ]]; then
    log "cargo build --release (kmmr-replica, kmmr-etcd-gateway, kmmr-apiserver-load; target dir $target_dir)"
    (cd "$repo" && CARGO_TARGET_DIR="$target_dir" env -u OUT_DIR nice -n 10 cargo build --release -q \
      -p kmmr-replica -p kmmr-etcd-gateway -p kmmr-apiserver-load)
  fi
  KMMR_BIN=${KMMR_BIN:-$target_dir/release/kmmr-replica}
  KMMR_GATEWAY_BIN=${KMMR_GATEWAY_BIN:-$target_dir/release/kmmr-etcd-gateway}
  LOAD_BIN=${LOAD_BIN:-$target_dir/release/kmmr-apiserver-load}
  local b
  for b in "$KMMR_BIN" "$KMMR_GATEWAY_BIN" "$LOAD_BIN"; do
    [[ -x $b ]] || die "not an executable: $b"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- the apiserver
pki=""
apiserver_pid=""
apiserver_url=""
# Starts a kube-apiserver on `servers` (a comma-separated list of URLs) and writes a kubeconfig
# for its admin to $1/kubeconfig.
start_apiserver() { # dir servers
  local dir=$1 servers=$2 port
  port=$(free_port)
  setsid "$K8S_BIN/kube-apiserver" --etcd-servers "$servers" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --authorization-mode RBAC --profiling=false \
    --v=1 >"$dir/kube-apiserver.log" 2>&1 &
  apiserver_pid=$!
  apiserver_url="https://127.0.0.1:$port"
  pgids+=("$apiserver_pid")
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {server: "https://127.0.0.1:$port", certificate-authority: "$pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$pki/admin.crt", client-key: "$pki/admin.key"}
contexts:
- name: bench
  context: {cluster: bench, user: admin}
current-context: bench
EOF
  local deadline=$((SECONDS + 180))
  until curl -sf -m 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$port/readyz" >/dev/null; do
    ((SECONDS < deadline)) || { tail -20 "$dir/kube-apiserver.log" >&2; die "kube-apiserver not ready within 180 s"; }
    kill -0 "$apiserver_pid" 2>/dev/null || { tail -20 "$dir/kube-apiserver.log" >&2; die "kube-apiserver exited"; }
    sleep 0.5
  done
}

gateway_pid=""
gateway_metrics_url=""
start_gateway() { # cluster-dir -> $gateway_url, $gateway_metrics_url
  local dir=$1 port mport
  port=$(free_port)
  mport=$(free_port)
  while [[ $mport == "$port" ]]; do mport=$(free_port); done
  setsid "$KMMR_GATEWAY_BIN" --cluster "$dir" --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$mport" >"$dir.gateway.log" 2>&1 &
  gateway_pid=$!
  gateway_metrics_url="http://127.0.0.1:$mport/metrics"
  pgids+=("$gateway_pid")
  gateway_url="http://127.0.0.1:$port"
  local deadline=$((SECONDS + 60))
  until ss -Hltn "sport = :$port" | grep -q .; do
    ((SECONDS < deadline)) || { tail -5 "$dir.gateway.log" >&2; die "the gateway did not listen within 60 s"; }
    kill -0 "$gateway_pid" 2>/dev/null || { tail -5 "$dir.gateway.log" >&2; die "the gateway exited"; }
    sleep 0.2
  done
}

# ---------------------------------------------------------------- one point
run_point() { # store rep
  local store=$1 rep=$2
  local dir="$work/$store-r$rep" servers store_pids=() out json
  mkdir -p "$dir"
  case $store in
    etcd)
      start_etcd "$ETCD_MEMBERS" "$dir/etcd"
      servers=$(sed 's|\([^,]*\)|http://\1|g' <<<"$endpoints")
      store_pids=("${server_pids[@]}") ;;
    kmmr)
      local byz=()
      [[ -n ${KMMR_BYZANTINE:-} ]] && byz=(--byzantine 1 --byzantine-mode "$KMMR_BYZANTINE")
      KMMR_LOCAL_ARGS="${byz[*]} ${KMMR_LOCAL_ARGS:-}" start_kmmr "$KMMR_N" kv "$dir/kmmr"
      start_gateway "$dir/kmmr"
      servers=$gateway_url
      store_pids=("${server_pids[@]}" "$gateway_pid") ;;
    *) die "unknown store $store" ;;
  esac
  start_apiserver "$dir" "$servers"
  local c0 a0 g0=0 c1 a1 g1=0 mb0 mt0 mb1 mt1 t0 t1 limit
  limit=$(python3 -c "import math; print(math.ceil($WARMUP + $secs + 600 + $LIST_OBJECTS / 20 + $WATCH_WRITES))")
  c0=$(cpu_ticks "${store_pids[@]}"); a0=$(cpu_ticks "$apiserver_pid")
  [[ $store == kmmr ]] && g0=$(cpu_ticks "$gateway_pid")
  read -r mb0 mt0 < <(machine_ticks); t0=$(date +%s.%N)
  if ! out=$(timeout "$limit" "$LOAD_BIN" --kubeconfig "$dir/kubeconfig" --clients "$CLIENTS" \
      --duration "$secs" --warmup "$WARMUP" --value-size "$VALUE_SIZE" \
      --list-objects "$LIST_OBJECTS" --list-reps "$LIST_REPS" --watch-writes "$WATCH_WRITES" --json 2>"$dir/load.err"); then
    mkdir -p "$RESULTS_DIR/failed"
    cp -r "$dir" "$RESULTS_DIR/failed/" 2>/dev/null || true
    log "$store rep $rep FAILED: $(tail -3 "$dir/load.err" | tr '\n' ' ') (logs in $RESULTS_DIR/failed)"
    json='{"failed":true}'
  else
    json=$(tail -1 <<<"$out")
  fi
  c1=$(cpu_ticks "${store_pids[@]}"); a1=$(cpu_ticks "$apiserver_pid")
  [[ $store == kmmr ]] && g1=$(cpu_ticks "$gateway_pid")
  read -r mb1 mt1 < <(machine_ticks); t1=$(date +%s.%N)
  local rss
  rss=$(peak_rss_kib "${store_pids[@]}")
  # The apiserver's own view of its store (etcd_request_duration_seconds, the watch cache's
  # consistent reads and their waits), kept to explain a figure.
  mkdir -p "$RESULTS_DIR/metrics"
  curl -sf -m 10 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$apiserver_url/metrics" \
    >"$RESULTS_DIR/metrics/$store-r$rep.txt" 2>/dev/null || true
  # The stores' own: etcd's fsyncs and (with BENCH_ETCD_METRICS=extensive) handling times; the
  # replicas' consensus latency, batch sizes and promise fsyncs; the gateway's handling times and
  # how its reads outside the order ended (kmmr_etcd_gateway_unordered_reads_total).
  local m
  case $store in
    etcd)
      for ((m = 0; m < ETCD_MEMBERS; m++)); do
        curl -sf -m 10 "http://127.0.0.1:$((ETCD_BASE + 2 * m))/metrics" \
          >"$RESULTS_DIR/metrics/etcd-m$m-r$rep.txt" 2>/dev/null || true
      done ;;
    kmmr)
      for ((m = 0; m < KMMR_N; m++)); do
        curl -sf -m 10 "http://127.0.0.1:$((KMMR_BASE + 2000 + m))/metrics" \
          >"$RESULTS_DIR/metrics/replica-m$m-r$rep.txt" 2>/dev/null || true
      done
      curl -sf -m 10 "$gateway_metrics_url" \
        >"$RESULTS_DIR/metrics/gateway-r$rep.txt" 2>/dev/null || true ;;
  esac
  stop_groups TERM "$apiserver_pid"
  case $store in
    etcd) stop_etcd ;;
    kmmr) stop_groups TERM "$gateway_pid"; stop_kmmr ;;
  esac
  local pct="100 / $(getconf CLK_TCK) / ($t1 - $t0)"
  jq -c --arg store "$store" --argjson rep "$rep" --argjson rss "$rss" \
    --argjson scpu "$(python3 -c "print(round(($c1 - $c0) * $pct, 1))")" \
    --argjson acpu "$(python3 -c "print(round(($a1 - $a0) * $pct, 1))")" \
    --argjson gcpu "$([[ $store == kmmr ]] && python3 -c "print(round(($g1 - $g0) * $pct, 1))" || echo null)" \
    --argjson busy "$(python3 -c "print(round(100 * ($mb1 - $mb0) / max(1, $mt1 - $mt0), 1))")" \
    --arg load "$(cut -d' ' -f1 /proc/loadavg)" \
    '. + {store: $store, rep: $rep, store_rss_kib: $rss, store_cpu_pct: $scpu,
          gateway_cpu_pct: $gcpu, apiserver_cpu_pct: $acpu, machine_busy_pct: $busy, loadavg1: ($load | tonumber)}' \
    <<<"$json" >>"$RESULTS_DIR/results.jsonl"
  log "$(tail -1 "$RESULTS_DIR/results.jsonl" | jq -r '"\(.store) rep \(.rep): create \(.create.ops_per_sec // 0 | round)/s p50 \(.create.p50_us // 0) us p99 \(.create.p99_us // 0) us; list \(.list.median_ms // 0 | round) ms (fill \(.list.fill_per_sec // 0 | round)/s); watch p50 \(.watch.p50_us // 0) us p99 \(.watch.p99_us // 0) us; store CPU \(.store_cpu_pct)% (gateway \(.gateway_cpu_pct)%), apiserver CPU \(.apiserver_cpu_pct)%, machine busy \(.machine_busy_pct)%, load \(.loadavg1)"')"
  rm -rf "$dir" "$dir".*
}

# ---------------------------------------------------------------- main
build_all
mkdir -p "${BENCH_TMP:-${TMPDIR:-/tmp}}" "$RESULTS_DIR"
work=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/apiserver-compare.XXXXXX")
fstype=$(stat -f -c %T "$work")
[[ $fstype != tmpfs && $fstype != ramfs ]] \
  || die "$work is on $fstype: fsync would cost nothing; set BENCH_TMP to a directory on a disk"
pki="$work/pki"
KMMR_TESTBED_RUN="$work" bash "$repo/e2e/testbed/certs.sh" >/dev/null
: >"$RESULTS_DIR/results.jsonl"
read -ra stores <<<"$STORES"
log "$((REPS * ${#stores[@]})) points: stores $STORES, $REPS reps, $CLIENTS clients, ${WARMUP}+${secs} s of creates, LIST of $LIST_OBJECTS ($LIST_REPS times), $WATCH_WRITES watched writes; kmmr n=$KMMR_N${KMMR_BYZANTINE:+ with replica 1 $KMMR_BYZANTINE}, etcd $ETCD_MEMBERS members"
uptime_start=$(uptime)
for ((rep = 0; rep < REPS; rep++)); do
  for ((k = 0; k < ${#stores[@]}; k++)); do
    run_point "${stores[$(((k + rep) % ${#stores[@]}))]}" "$rep"
  done
done
uptime_end=$(uptime)
python3 "$here/apiserver-table.py" "$RESULTS_DIR/results.jsonl" \
  --header "kube-apiserver $K8S_VERSION on each store, side by side on $(nproc) cores, loopback, median of $REPS; etcd $ETCD_VERSION ($ETCD_MEMBERS members, fsync on) vs KmMR ($(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?'), n=$KMMR_N durable${KMMR_BYZANTINE:+, replica 1 $KMMR_BYZANTINE}) through kmmr-etcd-gateway." \
  --footer "Machine load: at start \`${uptime_start# }\`; at end \`${uptime_end# }\`." \
  | tee "$RESULTS_DIR/table.md"
log "raw results: $RESULTS_DIR/results.jsonl; table: $RESULTS_DIR/table.md"
