# etcd's side of the paper experiments (the paper's KmMC), sourced by bench/paper/run.sh: etcd
# $ETCD_VERSION with its defaults (fsync on), member i in namespace PREFIX-m<i>, and
# bench/etcd-bench as the closed-loop client (one Put in flight) in PREFIX-cl. The functions are
# those kmmr.sh describes.

ETCD_CLIENT_PORT=2379 ETCD_PEER_PORT=2380

# Raft tolerates the crash of a minority.
etcd_crashed() { echo $((($1 - 1) / 2)); }

etcd_url() { echo "http://$(net_addr "m$1"):$2"; }

etcd_start() { # dir n up
  local dir=$1 n=$2 up=$3 i cluster=""
  for ((i = 0; i < n; i++)); do
    cluster+="${cluster:+,}m$i=$(etcd_url "$i" $ETCD_PEER_PORT)"
  done
  for ((i = 0; i < up; i++)); do
    ip netns exec "$prefix-m$i" setsid "$ETCD_BIN/etcd" --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "$(etcd_url "$i" $ETCD_CLIENT_PORT)" \
      --advertise-client-urls "$(etcd_url "$i" $ETCD_CLIENT_PORT)" \
      --listen-peer-urls "$(etcd_url "$i" $ETCD_PEER_PORT)" \
      --initial-advertise-peer-urls "$(etcd_url "$i" $ETCD_PEER_PORT)" \
      --initial-cluster "$cluster" --initial-cluster-token "paper-$prefix" \
      --initial-cluster-state new >"$dir/m$i.log" 2>&1 </dev/null &
    pids[i]=$!
    disown "$!"  # stopped by run.sh, killed with the namespaces when slow: no job report
  done
  local deadline=$((SECONDS + 30))
  for ((i = 0; i < up; i++)); do
    until in_client curl -sf -m 1 "$(etcd_url "$i" $ETCD_CLIENT_PORT)/health" | grep -q '"health":"true"'; do
      ((SECONDS < deadline)) || { tail -5 "$dir/m$i.log" >&2; die "etcd member $i not healthy within 30 s"; }
      sleep 0.2
    done
  done
}

# The member that reports itself leader (or the first other one, for a follower).
etcd_victim() { # mode up
  local i leader=""
  for ((i = 0; i < $2; i++)); do
    [[ $(metric "$(etcd_url "$i" $ETCD_CLIENT_PORT)/metrics" etcd_server_is_leader) == 1 ]] && leader=$i
  done
  [[ -n $leader ]] || die "no etcd member says it leads"
  if [[ $1 == leader ]]; then echo "$leader"; else echo $(((leader + 1) % $2)); fi
}

etcd_client() { # dir
  local endpoints="" i
  for ((i = 0; i < up_count; i++)); do
    endpoints+="${endpoints:+,}$(net_addr "m$i"):$ETCD_CLIENT_PORT"
  done
  in_client timeout "$((warmup + seconds + 40))" "$ETCD_BENCH" --endpoints "$endpoints" \
    --clients 1 --window 1 --warmup "$warmup" --duration "$seconds" --key-prefix paper/ --json \
    >"$1/bench.json" 2>"$1/client.err" &
  client_pid=$!
}

etcd_leader_changes() { # up
  local i best=0 v
  for ((i = 0; i < $1; i++)); do
    v=$(metric "$(etcd_url "$i" $ETCD_CLIENT_PORT)/metrics" etcd_server_leader_changes_seen_total)
    [[ -n $v ]] && ((${v%.*} > best)) && best=${v%.*}
  done
  echo "$best"
}
