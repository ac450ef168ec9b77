# shellcheck shell=bash
# Shared by up.sh and down.sh. Sourced, never run.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
source "$here/versions.sh"

# Fixed layout of the test bed. Addresses below exist only inside the network namespace NETNS,
# which has no route out: nothing sent to a pod, service or node address can leave it.
NETNS="${KMMR_TESTBED_NETNS:-kmmr-testbed}"
HOST_PORT="${KMMR_TESTBED_PORT:-16443}"   # apiserver as seen from the host's loopback
NODE_NAME=kmmr-node
NODE_IP=10.250.0.10                       # on the bridge kmmr0 inside NETNS only
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1                      # the `kubernetes` service
DNS_IP=10.96.0.10                         # the `kube-dns` service (CoreDNS on the node address)
CLUSTER_DOMAIN=cluster.local
CGROUP_NAME=kmmr-testbed                  # every process of the test bed lives below this cgroup
ETCD_DATA="${KMMR_TESTBED_ETCD_DATA:-/dev/shm/kmmr-testbed-etcd}"  # tmpfs

PKI="$RUN_DIR/pki"
LOGS="$RUN_DIR/logs"
PIDS="$RUN_DIR/pids"
KUBECONFIG_PATH="$RUN_DIR/kubeconfig"
BRIDGE_SOCK="$RUN_DIR/apiserver.sock"

log() { printf '[testbed %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# alive NAME: the process recorded in pids/NAME.pid still runs the same program.
alive() {
  local f="$PIDS/$1.pid" pid exe
  [[ -f $f ]] || return 1
  read -r pid exe <"$f" || return 1
  [[ -n $pid && -d /proc/$pid ]] || return 1
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$exe" ]]
}

# cgroup_dirs: the test bed's cgroup directories that exist, in every hierarchy.
cgroup_dirs() {
  local d
  for d in /sys/fs/cgroup/*/"$CGROUP_NAME" /sys/fs/cgroup/"$CGROUP_NAME"; do
    [[ -d $d ]] && printf '%s\n' "$d"
  done
  return 0
}

# cgroup_procs: the cgroup.procs files of the test bed's cgroup in every v1 hierarchy that
# kubelet uses, created on demand (cpuset needs its cpus and mems copied from the parent).
cgroup_procs() {
  local d
  for d in /sys/fs/cgroup/*/; do
    [[ -f "${d}cgroup.procs" ]] || continue
    case "$d" in */unified/) continue;; esac
    mkdir -p "$d$CGROUP_NAME" 2>/dev/null || continue
    if [[ $d == */cpuset/ && ! -s "$d$CGROUP_NAME/cpuset.cpus" ]]; then
      cat "${d}cpuset.cpus" >"$d$CGROUP_NAME/cpuset.cpus" 2>/dev/null || true
      cat "${d}cpuset.mems" >"$d$CGROUP_NAME/cpuset.mems" 2>/dev/null || true
    fi
    printf '%s\n' "$d$CGROUP_NAME/cgroup.procs"
  done
}

# start NAME ns|host CMD...: start CMD detached, with its output in logs/NAME.log and "PID
# program" in pids/NAME.pid, inside the test bed's cgroup and, for "ns", its network namespace.
# nsenter switches only the network namespace (ip netns exec would also remount /sys and so
# hide the cgroup hierarchies from kubelet).
start() {
  local name="$1" where="$2"; shift 2
  local exe
  exe="$(readlink -f "$(command -v "$1")")" || die "$1 not found"
  mkdir -p "$LOGS" "$PIDS"
  rm -f "$PIDS/$name.pid"
  local -a pre=()
  [[ $where == ns ]] && pre=(nsenter "--net=/run/netns/$NETNS")
  local procs
  procs="$(cgroup_procs | tr '\n' ' ')"
  # The inner shell joins the cgroup, records its own PID and the program it becomes, then
  # execs it, so the PID file names the program itself and everything it forks is in the cgroup.
  # umask 022 whatever the caller's: containerd creates image snapshot roots with it, and a
  # 077 root directory makes every image unusable to non-root containers (the dynamic loader
  # cannot read its libraries: "libgcc_s.so.1: Permission denied").
  setsid "${pre[@]}" bash -c '
    umask 022
    for f in $3; do echo $$ >"$f" 2>/dev/null || true; done
    echo "$$ $1" >"$2"; shift 3; exec "$@"' _ "$exe" "$PIDS/$name.pid" "$procs" "$@" \
    </dev/null >>"$LOGS/$name.log" 2>&1 &
  local i pid=""
  for ((i = 0; i < 50; i++)); do [[ -s "$PIDS/$name.pid" ]] && break; sleep 0.1; done
  [[ -s "$PIDS/$name.pid" ]] && read -r pid _ <"$PIDS/$name.pid"
  [[ -n $pid ]] || die "$name did not start (see $LOGS/$name.log)"
  log "started $name (pid $pid)"
}

# wait_for DESCRIPTION SECONDS CMD...: run CMD every second until it succeeds, at most SECONDS
# times. Gives up at once if a process named in $WATCH (space-separated pid-file names) died.
wait_for() {
  local what="$1" secs="$2"; shift 2
  local i n
  for ((i = 0; i < secs; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    for n in ${WATCH:-}; do
      alive "$n" || { log "$n died while waiting for $what (see $LOGS/$n.log)"; return 1; }
    done
    sleep 1
  done
  log "timed out after ${secs}s waiting for $what"
  return 1
}

kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=10s "$@"; }
