# The paper experiments' network, sourced by bench/paper/run.sh: every member, the client and the
# attacker in a network namespace of its own, each joined by a veth pair to a bridge that lives in
# one more namespace (the hub), so that nothing is attached to the machine's own network and no
# packet has a route out. Every link is shaped with tbf in both directions: bandwidth is then a
# resource a flood can exhaust, which loopback cannot show.
#
#   net_up PREFIX N MBIT    namespaces PREFIX-hub, PREFIX-m0..m(N-1), PREFIX-cl, PREFIX-at
#   net_down PREFIX         kills what runs in them and deletes them (idempotent)
#   net_addr m0|cl|at       the address of a node (10.77.0.10+i, .100, .200)
#
# This kernel has no sch_netem, so links get no added delay; tbf alone bounds the rate.
# Names stay under 16 characters: PREFIX is short (run.sh uses kp<pid>).

NET_SUBNET=10.77.0.0/24

net_addr() { # node
  case $1 in
    m*) echo "10.77.0.$((10 + ${1#m}))" ;;
    cl) echo 10.77.0.100 ;;
    at) echo 10.77.0.200 ;;
    *) return 1 ;;
  esac
}

# Shapes one interface's egress: the rate, a burst of 2 ms at that rate (at least 16 KiB), and
# at most 5 ms of queue, beyond which tbf drops, as a switch port's buffer would.
net_shape() { # ns dev mbit
  local burst=$(($3 * 1000000 / 8 / 500))
  ((burst >= 16384)) || burst=16384
  tc -n "$1" qdisc replace dev "$2" root tbf rate "${3}mbit" burst "$burst" latency 5ms
}

net_nodes() { # n: the node names of a network with n members
  local i
  for ((i = 0; i < $1; i++)); do echo "m$i"; done
  echo cl
  echo at
}

net_up() { # prefix n mbit
  local p=$1 n=$2 mbit=$3 node
  ip netns add "$p-hub"
  ip -n "$p-hub" link add br0 type bridge
  ip -n "$p-hub" link set br0 up
  ip -n "$p-hub" link set lo up
  for node in $(net_nodes "$n"); do
    ip netns add "$p-$node"
    ip -n "$p-hub" link add "$node" type veth peer name eth0 netns "$p-$node"
    ip -n "$p-hub" link set "$node" master br0 up
    ip -n "$p-$node" addr add "$(net_addr "$node")/24" dev eth0
    ip -n "$p-$node" link set eth0 up
    ip -n "$p-$node" link set lo up
    net_shape "$p-hub" "$node" "$mbit"     # into the node
    net_shape "$p-$node" eth0 "$mbit"      # out of the node
  done
}

# Kills every process in the namespaces (a namespace outlives a process only through its
# mount under /run/netns, but a process keeps the interfaces alive), then deletes them.
net_down() { # prefix
  local ns pids
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$1-" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$1-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

# Namespaces left by a run that was killed outright (SIGKILL leaves no trap to run): any kp<pid>
# whose process is gone.
net_reap_stale() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^kp[0-9]+-hub$' || true); do
    pid=${ns#kp}
    pid=${pid%-hub}
    kill -0 "$pid" 2>/dev/null || net_down "kp$pid"
  done
}

# Packets the shaper on the link into a node dropped so far (its queue was full): what a flood
# costs the node's own traffic.
net_drops() { # prefix node
  tc -s -n "$1-hub" qdisc show dev "$2" | awk '/dropped/ { sub(",", "", $7); print $7; exit }'
}

# Bytes a node's interface received so far (what reached it through its shaped link).
net_rx_bytes() { # prefix node
  ip netns exec "$1-$2" cat /sys/class/net/eth0/statistics/rx_bytes
}
