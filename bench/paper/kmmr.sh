# KmMR's side of the paper experiments, sourced by bench/paper/run.sh: a durable KV cluster with
# replica i in namespace PREFIX-m<i>, and a closed-loop client in PREFIX-cl. The interface every
# system file provides (run.sh calls <system>_<name>):
#   crashed N        how many members scenario 2 crashes first: the most the protocol tolerates
#   start DIR N UP   keys, configs, and members 0..UP-1 started and healthy; sets pids[i]
#   victim MODE UP   the member to flood: the leader, or a follower
#   client DIR       starts the client in the background (warmup, then seconds measured, one
#                    write in flight, JSON in DIR/bench.json); sets client_pid
#   leader_changes UP  a counter of leader changes (the highest any member reports)
# Globals from run.sh: prefix, KMMR_BIN, KMMR_PUT_BIN, warmup, seconds, and net.sh's functions.

KMMR_PEER_PORT=11000 KMMR_HTTP_PORT=13000

kmmr_crashed() { echo $((($1 - 1) / 3)); }

# Keys, view and configs for n replicas at their namespace addresses (peer port 11000, clients
# on 12000 by the view's convention, HTTP on 13000).
kmmr_make_cluster() { # dir n
  local dir=$1 n=$2 i f=$((($2 - 1) / 3))
  mkdir -p "$dir"
  "$KMMR_BIN" keygen --out "$dir/admin.key" >"$dir/admin.pub"
  {
    echo "id = 0"
    echo "f = $f"
    echo "admin_key = \"$(cat "$dir/admin.pub")\""
    for ((i = 0; i < n; i++)); do
      printf '\n[[members]]\nid = %d\naddress = "%s:%d"\nkey = "%s"\n' "$i" \
        "$(net_addr "m$i")" "$KMMR_PEER_PORT" "$("$KMMR_BIN" keygen --out "$dir/r$i.key")"
    done
  } >"$dir/view.toml"
  for ((i = 0; i < n; i++)); do
    printf 'id = %d\nkey_file = "r%d.key"\nview_file = "view.toml"\ndata_dir = "data/r%d"\nhttp_listen = "%s:%d"\n\n[protocol]\ndurable = true\n%b' \
      "$i" "$i" "$i" "$(net_addr "m$i")" "$KMMR_HTTP_PORT" "${KMMR_PROTOCOL_EXTRA:-}" >"$dir/r$i.toml"
    mkdir -p "$dir/data/r$i"
  done
}

kmmr_start() { # dir n up
  local dir=$1 n=$2 up=$3 i
  kmmr_make_cluster "$dir" "$n"
  for ((i = 0; i < up; i++)); do
    ip netns exec "$prefix-m$i" setsid "$KMMR_BIN" run --config "$dir/r$i.toml" \
      >"$dir/m$i.log" 2>&1 </dev/null &
    pids[i]=$!
    disown "$!"  # stopped by run.sh, killed with the namespaces when slow: no job report
  done
  local deadline=$((SECONDS + 30))
  for ((i = 0; i < up; i++)); do
    until in_client curl -sf -m 1 -o /dev/null "http://$(net_addr "m$i"):$KMMR_HTTP_PORT/healthz"; do
      ((SECONDS < deadline)) || { tail -5 "$dir/m$i.log" >&2; die "replica $i not healthy within 30 s"; }
      sleep 0.2
    done
  done
}

# Replica 0 leads first; scenario 2 crashes the last f, so replica 1 is always up.
kmmr_victim() { [[ $1 == leader ]] && echo 0 || echo 1; }

# bench/kmmr-put: KmMR's counterpart of etcd-bench, with the same options and output.
kmmr_client() { # dir
  in_client timeout "$((warmup + seconds + 40))" "$KMMR_PUT_BIN" --cluster "$1" --clients 1 \
    --window 1 --warmup "$warmup" --duration "$seconds" --key-prefix paper/ --json \
    >"$1/bench.json" 2>"$1/client.err" &
  client_pid=$!
}

kmmr_leader_changes() { # up
  local i best=0 v
  for ((i = 0; i < $1; i++)); do
    v=$(metric "http://$(net_addr "m$i"):$KMMR_HTTP_PORT/metrics" kmmr_regency)
    [[ -n $v ]] && ((${v%.*} > best)) && best=${v%.*}
  done
  echo "$best"
}
