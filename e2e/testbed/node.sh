#!/usr/bin/env bash
# Tier B: one node, kmmr-node, inside the test bed's network namespace. Called by up.sh --node
# and down.sh; not meant to be run by hand.
#
#   node.sh up     containerd (Debian's, own config, socket and directories under $RUN_DIR),
#                  the locally built pause image, kubelet (cgroupfs driver, cgroup root
#                  /kmmr-testbed), kube-proxy (iptables mode), a bridge CNI network; waits for
#                  the node to be Ready.
#   node.sh down   stops them, the pods' processes, unmounts what they mounted, restores the
#                  kernel settings kubelet changed, and removes the node's state.
#
# The pods' bridge cni0 (10.244.0.0/24) and every pod live inside the namespace, which has no
# default route: pod and service traffic cannot leave it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

NODE_DIR="$RUN_DIR/node-state"
CTRD_DIR="$NODE_DIR/containerd"
CTRD_SOCK="$CTRD_DIR/containerd.sock"
KUBELET_DIR="$NODE_DIR/kubelet"
POD_LOGS="$NODE_DIR/pod-logs"
CNI_CONF="$NODE_DIR/cni/net.d"
CNI_BIN="${KMMR_TESTBED_CNI_BIN:-/usr/lib/cni}"
PAUSE_REF="registry.k8s.io/pause:$PAUSE_VERSION"
PAUSE_TAR="$KMMR_TESTBED_CACHE/pause-$PAUSE_VERSION/pause.tar"
SYSCTL_SAVED="$RUN_DIR/sysctl.saved"
# Fixed host paths that kubelet, containerd's shims and CNI create whatever they are configured
# with. Those that did not exist before the node started are removed when it stops.
HOST_PATHS=(/var/lib/kubelet /run/containerd /var/lib/cni /var/log/containers /var/log/pods
  /usr/libexec/kubernetes)
HOST_PATHS_NEW="$RUN_DIR/host-paths.new"
# Host-wide kernel settings kubelet writes when protectKernelDefaults is false.
KUBELET_SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)

ctr_() { ctr --address "$CTRD_SOCK" --namespace k8s.io "$@"; }

# --- up ----------------------------------------------------------------------------------------
node_up() {
  [[ "$(cat "$RUN_DIR/mode" 2>/dev/null)" == ns ]] || die "the node needs the control plane in namespace $NETNS"
  local c
  for c in containerd containerd-shim-runc-v2 runc ctr iptables conntrack; do
    command -v "$c" >/dev/null || die "$c is missing: run e2e/testbed/install-deps.sh"
  done
  [[ -x $CNI_BIN/bridge && -x $CNI_BIN/host-local && -x $CNI_BIN/loopback ]] \
    || die "CNI plugins missing in $CNI_BIN: run e2e/testbed/install-deps.sh"
  [[ -s $PAUSE_TAR ]] || "$here/build.sh" pause
  export PATH="$K8S_BIN:$PATH"

  # Whatever an earlier attempt left behind goes first.
  node_down
  rm -rf "$NODE_DIR"
  mkdir -p "$CTRD_DIR" "$KUBELET_DIR" "$POD_LOGS" "$CNI_CONF" "$NODE_DIR/cni/ipam"

  # Per-namespace settings the pods' bridge and kube-proxy need; the host's are not touched.
  nsenter --net="/run/netns/$NETNS" sh -c '
    sysctl -qw net.ipv4.ip_forward=1
    sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
    sysctl -qw net.bridge.bridge-nf-call-ip6tables=1 2>/dev/null || true'

  cat >"$CNI_CONF/10-kmmr.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "kmmr",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{ "subnet": "$NODE_POD_CIDR" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOF

  cat >"$CTRD_DIR/config.toml" <<EOF
version = 2
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_DIR/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_REF"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  # This machine withholds CAP_SYS_RESOURCE, so no process may lower its OOM score below its
  # parent's; runc fails on kubelet's -998 for sandboxes unless containerd clamps it.
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CTRD_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$CNI_CONF"
    max_conf_num = 1
EOF
  start containerd ns containerd --config "$CTRD_DIR/config.toml"
  WATCH=containerd wait_for "containerd" 60 ctr_ version || { tail -n 20 "$LOGS/containerd.log" >&2; die "containerd did not start"; }
  ctr_ images import "$PAUSE_TAR" >/dev/null
  local images
  images="$(ctr_ images ls -q)"
  grep -qx "$PAUSE_REF" <<<"$images" || die "pause image $PAUSE_REF not imported"
  log "containerd ready, $PAUSE_REF imported"

  # kubeconfigs for kubelet and kube-proxy, pointing at the apiserver on the namespace's loopback.
  local u
  for u in kubelet kube-proxy coredns; do
    cat >"$RUN_DIR/$u.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmmr-testbed
  cluster: { server: "https://127.0.0.1:6443", certificate-authority: "$PKI/ca.crt" }
users:
- name: $u
  user: { client-certificate: "$PKI/$u.crt", client-key: "$PKI/$u.key" }
contexts:
- name: kmmr-testbed
  context: { cluster: kmmr-testbed, user: $u }
current-context: kmmr-testbed
EOF
  done

  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_NAME
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CTRD_SOCK
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $PKI/ca.crt }
authorization:
  mode: Webhook
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_IP]
resolvConf: ""
podCIDR: $NODE_POD_CIDR
podLogsDir: $POD_LOGS
volumePluginDir: $NODE_DIR/volume-plugins
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
enableServer: true
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
evictionPressureTransitionPeriod: 10s
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
fileCheckFrequency: 10s
maxPods: 30
EOF

  if [[ ! -f $HOST_PATHS_NEW ]]; then
    local hp
    for hp in "${HOST_PATHS[@]}"; do [[ -e $hp ]] || echo "$hp"; done >"$HOST_PATHS_NEW"
  fi

  # kubelet writes host-wide kernel settings: remember them, down restores them.
  if [[ ! -f $SYSCTL_SAVED ]]; then
    local k
    for k in "${KUBELET_SYSCTLS[@]}"; do
      [[ -r /proc/sys/$k ]] && echo "$k $(cat "/proc/sys/$k")"
    done >"$SYSCTL_SAVED.tmp"
    mv "$SYSCTL_SAVED.tmp" "$SYSCTL_SAVED"
  fi

  start_dns

  start kubelet ns kubelet --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$RUN_DIR/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$KUBELET_DIR" --v=1

  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: $RUN_DIR/kube-proxy.kubeconfig
oomScoreAdj: 0
conntrack:
  # 0 leaves the host-wide nf_conntrack_max and the timeouts as they are.
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
  start kube-proxy ns kube-proxy --config "$NODE_DIR/kube-proxy.yaml" --v=1

  node_ready() { [[ "$(kubectl_ get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }
  WATCH="containerd kubelet kube-proxy" wait_for "node $NODE_NAME to be Ready" "${KMMR_TESTBED_NODE_TIMEOUT:-180}" node_ready \
    || { grep -E '^[EF][0-9]{4}' "$LOGS/kubelet.log" | tail -n 15 >&2; die "node not Ready"; }
  touch "$RUN_DIR/node"
  log "node $NODE_NAME Ready"
}

# Cluster DNS: CoreDNS runs as a process in the namespace on the node address, answering only
# for cluster.local and the reverse zones (no forward plugin: nothing is asked upstream). The
# kube-dns service (10.96.0.10) points at it through a hand-made EndpointSlice.
start_dns() {
  [[ -x $COREDNS_BIN/coredns ]] || "$here/build.sh" node
  cat >"$NODE_DIR/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    ready 127.0.0.1:8181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $RUN_DIR/coredns.kubeconfig kmmr-testbed
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
EOF
  kubectl_ apply --server-side --field-manager kmmr-testbed -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: "system:coredns" }
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: "system:coredns" }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns" }
subjects:
- { apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns" }
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: { k8s-app: kube-dns, kubernetes.io/name: CoreDNS }
spec:
  clusterIP: $DNS_IP
  ports:
  - { name: dns, port: 53, protocol: UDP, targetPort: 53 }
  - { name: dns-tcp, port: 53, protocol: TCP, targetPort: 53 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-kmmr-node
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: kmmr-testbed
addressType: IPv4
endpoints:
- addresses: ["$NODE_IP"]
  conditions: { ready: true }
ports:
- { name: dns, port: 53, protocol: UDP }
- { name: dns-tcp, port: 53, protocol: TCP }
EOF
  start coredns ns "$COREDNS_BIN/coredns" -conf "$NODE_DIR/Corefile"
  dns_ready() { nsenter --net="/run/netns/$NETNS" curl -sf -m 2 http://127.0.0.1:8181/ready; }
  WATCH=coredns wait_for "CoreDNS" 60 dns_ready || { tail -n 20 "$LOGS/coredns.log" >&2; die "CoreDNS not ready"; }
  log "CoreDNS ready on $NODE_IP:53, service kube-dns $DNS_IP"
}

# --- down --------------------------------------------------------------------------------------
stop_pid() { # NAME: TERM, wait up to 10 s, KILL
  local pid exe i
  alive "$1" || { rm -f "$PIDS/$1.pid"; return 0; }
  read -r pid exe <"$PIDS/$1.pid"
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDS/$1.pid"
}

kill_cgroup() { # SUBPATH: KILL every process below the test bed's cgroup SUBPATH, bounded
  local round d p n
  for ((round = 0; round < 10; round++)); do
    n=0
    for d in /sys/fs/cgroup/*/"$CGROUP_NAME/$1"; do
      [[ -d $d ]] || continue
      while read -r p; do
        [[ -n $p ]] && kill -KILL "$p" 2>/dev/null && n=$((n + 1))
      done < <(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
    done
    ((n == 0)) && return 0
    sleep 0.5
  done
}

node_down() {
  stop_pid kubelet
  stop_pid kube-proxy
  stop_pid coredns
  # The pods' processes (kubelet put them below /kmmr-testbed/kubepods).
  kill_cgroup kubepods
  stop_pid containerd
  # containerd's shims outlive containerd; they are in the test bed's cgroup.
  local d p
  for d in /sys/fs/cgroup/*/"$CGROUP_NAME"; do
    [[ -d $d ]] || continue
    while read -r p; do
      [[ "$(readlink "/proc/$p/exe" 2>/dev/null)" == */containerd-shim-runc-v2 ]] && kill -KILL "$p" 2>/dev/null
    done < <(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
  done
  # Unmount everything below the node's directory, deepest first, bounded.
  local i m left
  for ((i = 0; i < 5; i++)); do
    left=0
    while read -r m; do
      left=1
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$NODE_DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    ((left == 0)) && break
  done
  # kubelet links container logs into /var/log/containers; remove the links that point to ours.
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$POD_LOGS/*" -delete 2>/dev/null || true
  fi
  if [[ -f $SYSCTL_SAVED ]]; then
    local k v
    while read -r k v; do echo "$v" >"/proc/sys/$k" 2>/dev/null || true; done <"$SYSCTL_SAVED"
    rm -f "$SYSCTL_SAVED"
  fi
  if [[ -f $HOST_PATHS_NEW ]]; then
    local hp
    while read -r hp; do
      # Only paths this node created, and /run/containerd only while no other containerd runs.
      [[ $hp == /run/containerd ]] && pgrep -x containerd >/dev/null && continue
      [[ -e $hp ]] && rm -rf --one-file-system -- "$hp"
    done <"$HOST_PATHS_NEW"
    rm -f "$HOST_PATHS_NEW"
  fi
  if [[ -n "$(awk -v d="$NODE_DIR/" 'index($2, d) == 1' /proc/self/mounts)" ]]; then
    log "mounts still present below $NODE_DIR; keeping it"
  else
    rm -rf "$NODE_DIR"
  fi
  rm -f "$RUN_DIR/node" "$RUN_DIR"/{kubelet,kube-proxy,coredns}.kubeconfig
}

case "${1:-}" in
  up) node_up;;
  down) node_down;;
  *) echo "usage: node.sh up|down" >&2; exit 2;;
esac
