#!/usr/bin/env bash
# Stops everything e2e/testbed/up.sh started, idempotently: the node first (pods, containerd's
# mounts), then every process by its PID file, then any straggler left in the test bed's cgroup,
# then the network namespace and the etcd tmpfs directory. Certificates and logs are kept.
#   e2e/testbed/down.sh [--quiet]
set -euo pipefail
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
quiet=0; [[ ${1:-} == --quiet ]] && quiet=1
say() { [[ $quiet == 1 ]] || log "$@"; }

if [[ -x "$here/node.sh" ]] && [[ -f "$RUN_DIR/node" || -d "$RUN_DIR/node-state" ]]; then
  "$here/node.sh" down || log "node tear-down reported an error; continuing"
fi

# stop NAME...: SIGTERM the recorded processes, wait up to $GRACE (default 10) seconds, SIGKILL.
stop() {
  local n pid exe pids=() grace="${GRACE:-10}"
  for n in "$@"; do
    if alive "$n"; then
      read -r pid exe <"$PIDS/$n.pid"
      say "stopping $n (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$PIDS/$n.pid"
  done
  local i p left
  for ((i = 0; i < grace * 10; i++)); do
    left=0
    for p in "${pids[@]}"; do [[ -d /proc/$p ]] && left=1; done
    [[ $left == 0 ]] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}

stop bridge-outer bridge-inner
stop kube-scheduler kube-controller-manager
# The apiserver drains watches for a long time; its state is in etcd, which goes next anyway.
GRACE=3 stop kube-apiserver kube-apiserver-2
stop etcd etcd-gateway etcd-gateway-2 kmmr-store
if [[ -d $PIDS ]]; then
  # Anything else that was recorded (the node's processes, if node.sh could not stop them).
  for f in "$PIDS"/*.pid; do [[ -e $f ]] && stop "$(basename "$f" .pid)"; done
fi

# Stragglers: every process still in the test bed's cgroup (socat's per-connection children,
# container processes). Bounded: 3 rounds of TERM, then KILL.
sweep() {
  local sig="$1" d p n=0
  while read -r d; do
    while read -r p; do
      [[ -n $p && $p != "$$" ]] || continue
      kill "-$sig" "$p" 2>/dev/null && n=$((n + 1))
    done < <(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
  done < <(cgroup_dirs)
  return $((n == 0 ? 1 : 0))
}
for sig in TERM TERM TERM KILL KILL; do
  sweep "$sig" || break
  say "signalled stragglers with SIG$sig"
  sleep 1
done
# Remove the cgroups, deepest first.
while read -r d; do
  find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
done < <(cgroup_dirs)

if [[ -e /run/netns/$NETNS ]]; then
  ip netns pids "$NETNS" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  ip netns del "$NETNS" && say "removed network namespace $NETNS"
fi
rm -rf "$ETCD_DATA" "$BRIDGE_SOCK" "$RUN_DIR/mode" "$RUN_DIR/node" "$PIDS" "$RUN_DIR"/*kubeconfig
say "test bed down"
