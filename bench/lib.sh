# Shared by the benchmark scripts in bench/: starting and stopping etcd and KmMR clusters on
# loopback, process-group bookkeeping, and CPU and memory readings from /proc. Sourced, not run:
# the caller sets `here`, `repo`, ETCD_BASE, KMMR_BASE, KMMR_BIN and defines log and die, and
# sources e2e/testbed/versions.sh first.

build_etcd() {
  local bin="$ETCD_BIN/etcd"
  if [[ -x $bin ]]; then log "etcd $ETCD_VERSION: cached at $bin"; return; fi
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$repo/e2e/testbed/etcd/go.mod" \
    || die "e2e/testbed/etcd/go.mod does not pin etcd $ETCD_VERSION: run e2e/testbed/gen-mod.sh"
  log "etcd $ETCD_VERSION: building (as e2e/testbed/build.sh does) into $ETCD_BIN"
  mkdir -p "$ETCD_BIN"
  (cd "$repo/e2e/testbed/etcd" && CGO_ENABLED=0 nice -n 15 go build -trimpath -ldflags "-s -w" \
      -o "$ETCD_BIN/.etcd.tmp" go.etcd.io/etcd/server/v3)
  mv -f "$ETCD_BIN/.etcd.tmp" "$bin"
}

# etcd's own Put load generator (bench/etcd-bench), cached by client version and source hash in
# $KMMR_BENCH_CACHE; sets ETCD_BENCH.
build_etcd_bench() {
  local mod="$repo/bench/etcd-bench" client_v hash dir
  client_v="$(sed -n 's/^[[:space:]]*go.etcd.io\/etcd\/client\/v3 \(v[^ ]*\).*/\1/p' "$mod/go.mod")"
  [[ -n $client_v ]] || die "$mod/go.mod does not require go.etcd.io/etcd/client/v3"
  [[ ${client_v%.*} == "${ETCD_VERSION%.*}" ]] \
    || die "etcd-bench uses client $client_v but the server is $ETCD_VERSION: align bench/etcd-bench/go.mod"
  hash="$(cat "$mod/go.mod" "$mod/go.sum" "$mod"/*.go | sha256sum | cut -c1-12)"
  dir="$KMMR_BENCH_CACHE/etcd-bench-$client_v-$hash"
  ETCD_BENCH="$dir/etcd-bench"
  if [[ -x $ETCD_BENCH ]]; then log "etcd-bench: cached at $ETCD_BENCH"; return; fi
  log "etcd-bench: building (client $client_v) into $dir"
  mkdir -p "$dir"
  (cd "$mod" && CGO_ENABLED=0 nice -n 15 go build -trimpath -o "$dir/.etcd-bench.tmp" .)
  mv -f "$dir/.etcd-bench.tmp" "$ETCD_BENCH"
}

# ---------------------------------------------------------------- processes
pgids=()  # process groups started here (each server is a session leader: setsid)
work=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local g
  for g in "${pgids[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  for g in "${pgids[@]}"; do { wait "$g"; } 2>/dev/null || true; done
  [[ -n $work && -d $work ]] && rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Stops process groups: the signal to each leader, then SIGKILL to what is left of the groups
# after 10 s; reaps them and forgets them.
stop_groups() { # signal pgid...
  local sig=$1 g i alive
  shift
  for g in "$@"; do kill "-$sig" "$g" 2>/dev/null || true; done
  for ((i = 0; i < 100; i++)); do
    alive=0
    for g in "$@"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for g in "$@"; do
    kill -KILL -- "-$g" 2>/dev/null || true
    { wait "$g"; } 2>/dev/null || true
  done
  local keep=() k
  for k in "${pgids[@]}"; do [[ " $* " == *" $k "* ]] || keep+=("$k"); done
  pgids=("${keep[@]}")
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

# Sums user+system CPU ticks of the given pids (0 for any that has gone).
cpu_ticks() {
  local p t=0 f
  for p in "$@"; do
    if f=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null); then t=$((t + ${f% *} + ${f#* })); fi
  done
  echo "$t"
}
# Busy and total jiffies of the whole machine (all processes, everyone's).
machine_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8; exit}' /proc/stat; }
# Largest peak RSS (VmHWM, KiB) among the given pids.
peak_rss_kib() {
  local p m=0 v
  for p in "$@"; do
    v=$(awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    ((${v:-0} > m)) && m=$v
  done
  echo "$m"
}

# Leader changes: lines matching a pattern in each server log, one count per log.
log_counts() { # pattern files...
  local pat=$1 f
  shift
  for f in "$@"; do grep -c -- "$pat" "$f" 2>/dev/null || true; done | paste -sd' '
}
# The largest per-log growth between two log_counts (each server logs each change it sees).
count_growth() { # "before" "after"
  python3 -c 'import sys; a, b = (list(map(int, x.split())) for x in sys.argv[1:3]); print(max([y - x for x, y in zip(a, b)] or [0]))' "$1" "$2"
}

# ---------------------------------------------------------------- clusters
server_pids=()
start_etcd() { # n dir -> endpoints on stdout-free global $endpoints
  local n=$1 dir=$2 i cluster="" p token="bench-$1-$RANDOM"
  mkdir -p "$dir"
  for ((i = 0; i < n; i++)); do
    port_free $((ETCD_BASE + 2 * i)) && port_free $((ETCD_BASE + 2 * i + 1)) \
      || die "port $((ETCD_BASE + 2 * i)) or $((ETCD_BASE + 2 * i + 1)) is taken: set ETCD_BASE"
    cluster+="${cluster:+,}m$i=http://127.0.0.1:$((ETCD_BASE + 2 * i + 1))"
  done
  endpoints=""
  server_pids=()
  for ((i = 0; i < n; i++)); do
    p=$((ETCD_BASE + 2 * i))
    endpoints+="${endpoints:+,}127.0.0.1:$p"
    setsid "$ETCD_BIN/etcd" --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:$p" --advertise-client-urls "http://127.0.0.1:$p" \
      --listen-peer-urls "http://127.0.0.1:$((p + 1))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((p + 1))" \
      --initial-cluster "$cluster" --initial-cluster-token "$token" \
      --initial-cluster-state new --metrics "${BENCH_ETCD_METRICS:-basic}" >"$dir/m$i.log" 2>&1 &
    pgids+=($!)
    server_pids+=($!)
  done
  local deadline=$((SECONDS + 60))
  for ((i = 0; i < n; i++)); do
    until curl -sf -m 2 "http://127.0.0.1:$((ETCD_BASE + 2 * i))/health" | grep -q '"health":"true"'; do
      ((SECONDS < deadline)) || { tail -5 "$dir/m$i.log" >&2; die "etcd member $i not healthy within 60 s"; }
      kill -0 "${server_pids[$i]}" 2>/dev/null || { tail -5 "$dir/m$i.log" >&2; die "etcd member $i exited"; }
      sleep 0.2
    done
  done
}

stop_etcd() {
  stop_groups TERM "${server_pids[@]}"
  server_pids=()
}

kmmr_local=""
start_kmmr() { # n service dir
  local n=$1 service=$2 dir=$3 i
  for ((i = 0; i < n; i++)); do
    for p in $((KMMR_BASE + i)) $((KMMR_BASE + 1000 + i)) $((KMMR_BASE + 2000 + i)); do
      port_free "$p" || die "port $p is taken: set KMMR_BASE"
    done
  done
  # shellcheck disable=SC2086 # KMMR_LOCAL_ARGS is a list of words
  setsid "$KMMR_BIN" local --n "$n" --service "$service" --keep-running --dir "$dir" \
    --base-port "$KMMR_BASE" ${KMMR_LOCAL_ARGS:-} >"$dir.out" 2>&1 &
  kmmr_local=$!
  pgids+=("$kmmr_local")
  local deadline=$((SECONDS + 60))
  until grep -q "local cluster" "$dir.out" 2>/dev/null; do
    ((SECONDS < deadline)) || { tail -5 "$dir.out" >&2; die "kmmr local n=$n not up within 60 s"; }
    kill -0 "$kmmr_local" 2>/dev/null || { tail -5 "$dir.out" >&2; die "kmmr local n=$n exited"; }
    sleep 0.2
  done
  mapfile -t server_pids < <(pgrep -P "$kmmr_local")
  ((${#server_pids[@]} == n)) || die "expected $n replica processes under kmmr local, found ${#server_pids[@]}"
}

stop_kmmr() {
  stop_groups INT "$kmmr_local"
  server_pids=()
}

