#!/usr/bin/env bash
# Brings the KmMR test bed up, idempotently, and waits until it is ready.
#
#   e2e/testbed/up.sh           Tier A: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
#   e2e/testbed/up.sh --node    Tier A plus Tier B: a node (containerd, kubelet, kube-proxy, CNI)
#   e2e/testbed/up.sh --store kmmr [--node]
#                               The control plane's state on KmMR instead of etcd: a local cluster
#                               of 4 durable replicas and the etcd gateway the apiserver talks to
#                               (also KMMR_TESTBED_STORE=kmmr). One of the 4 replicas lies: it
#                               corrupts what it sends (KMMR_TESTBED_BYZANTINE=<mode> picks another
#                               of `kmmr-replica local`'s modes, =none makes all 4 correct).
#                               Two masters, as the paper's KmMR runs them: a second
#                               kube-apiserver on a gateway of its own, which the controller
#                               manager and the scheduler use while kubectl and the kubelet use
#                               the first, so every object goes through both
#                               (KMMR_TESTBED_APISERVERS=1 runs one)
#
# Everything runs inside the network namespace $NETNS (kmmr-testbed), which has a loopback
# interface, a port-less bridge kmmr0 carrying the node address, the pods' bridge, and no route
# out. The host reaches the apiserver on 127.0.0.1:$HOST_PORT through a socat pair joined by a
# unix socket, so no IP route at all connects the host to the namespace. If the namespace cannot
# be made (not root, no socat), Tier A runs on the host's loopback instead.
#
# Writes the admin kubeconfig to $RUN_DIR/kubeconfig (default ~/.cache/kmmr-testbed/run/kubeconfig)
# and prints `export KUBECONFIG=...`. Stop with e2e/testbed/down.sh.
set -euo pipefail
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

want_node=0
store="${KMMR_TESTBED_STORE:-etcd}"
while (($#)); do
  case "$1" in
    --node) want_node=1;;
    --no-node) want_node=0;;
    --store) store="${2:-}"; shift;;
    --store=*) store="${1#--store=}";;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0;;
    *) die "unknown argument $1";;
  esac
  shift
done
[[ ${KMMR_TESTBED_NODE:-} == 1 ]] && want_node=1
apiservers=1
case "$store" in
  etcd) store_procs=(etcd);;
  kmmr)
    store_procs=(kmmr-store etcd-gateway)
    apiservers="${KMMR_TESTBED_APISERVERS:-2}"
    [[ $apiservers == 1 || $apiservers == 2 ]] || die "KMMR_TESTBED_APISERVERS must be 1 or 2, not '$apiservers'"
    ((apiservers == 2)) && store_procs+=(etcd-gateway-2);;
  *) die "--store must be etcd or kmmr, not '$store'";;
esac

control_plane=("${store_procs[@]}" kube-apiserver kube-controller-manager kube-scheduler)
((apiservers == 2)) && control_plane+=(kube-apiserver-2)

all_alive() { local n; for n in "$@"; do alive "$n" || return 1; done; }

ready() { kubectl_ get --raw /readyz; }

# --- already up? -------------------------------------------------------------------------------
if [[ -f "$RUN_DIR/mode" ]] && [[ "$(cat "$RUN_DIR/store" 2>/dev/null || echo etcd)" == "$store" ]] \
  && all_alive "${control_plane[@]}" && ready >/dev/null 2>&1; then
  mode="$(cat "$RUN_DIR/mode")"
  if [[ $want_node == 0 ]] || { [[ -f "$RUN_DIR/node" ]] && all_alive containerd kubelet kube-proxy coredns; }; then
    log "test bed already up ($mode)"
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    exit 0
  fi
  if [[ ! -f "$RUN_DIR/node" ]]; then
    log "control plane up; adding the node"
    "$here/node.sh" up
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    exit 0
  fi
fi
# Anything half up (or a stale run directory) is torn down first.
"$here/down.sh" --quiet

# --- binaries, certificates ----------------------------------------------------------------------
targets=(control-plane)
[[ $want_node == 1 ]] && targets+=(node)
"$here/build.sh" "${targets[@]}"
export PATH="$K8S_BIN:$ETCD_BIN:$PATH"
rm -rf "$LOGS"; mkdir -p "$RUN_DIR" "$LOGS" "$PIDS"
"$here/certs.sh"

# --- network namespace -------------------------------------------------------------------------
mode=host
if [[ ${KMMR_TESTBED_HOST_MODE:-} != 1 && $(id -u) == 0 ]] && command -v socat >/dev/null; then
  if ip netns add "$NETNS" 2>/dev/null; then
    mode=ns
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" link add kmmr0 type bridge
    ip -n "$NETNS" addr add "$NODE_IP/24" dev kmmr0
    ip -n "$NETNS" link set kmmr0 up
    # No default route: the namespace knows only loopback, 10.250.0.0/24 and, later, the pods'
    # bridge. A packet to any other address fails with "network unreachable" inside it.
    if [[ -n "$(ip -n "$NETNS" route show default)" ]]; then die "namespace $NETNS has a default route"; fi
  else
    log "cannot create network namespace $NETNS; running Tier A on the host's loopback"
  fi
fi
[[ $mode == host && $want_node == 1 ]] && die "Tier B needs root, socat and a network namespace"
echo "$mode" >"$RUN_DIR/mode"

if [[ $mode == ns ]]; then
  where=ns; api_port=6443; api_bind=0.0.0.0; advertise=$NODE_IP
else
  where=host; api_port=$HOST_PORT; api_bind=127.0.0.1; advertise=127.0.0.1
fi
# Ports on the loopback of wherever the control plane runs (the namespace, or the host).
etcd_port=${KMMR_TESTBED_ETCD_PORT:-2379}
[[ $mode == host ]] && etcd_port=${KMMR_TESTBED_ETCD_PORT:-23790}

# --- kubeconfigs -------------------------------------------------------------------------------
b64() { base64 -w0 <"$1"; }
write_kubeconfig() { # file user server
  local file="$1" user="$2" server="$3"
  umask 077
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmmr-testbed
  cluster:
    server: $server
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$PKI/$user.crt")
    client-key-data: $(b64 "$PKI/$user.key")
contexts:
- name: kmmr-testbed
  context:
    cluster: kmmr-testbed
    user: $user
current-context: kmmr-testbed
EOF
}
inner="https://127.0.0.1:$api_port"
# With two apiservers the controllers use the second one, on the next port, loopback only.
api2_port=$((api_port + 1))
controllers="$inner"
((apiservers == 2)) && controllers="https://127.0.0.1:$api2_port"
write_kubeconfig "$KUBECONFIG_PATH" admin "https://127.0.0.1:$HOST_PORT"
write_kubeconfig "$RUN_DIR/controller-manager.kubeconfig" controller-manager "$controllers"
write_kubeconfig "$RUN_DIR/scheduler.kubeconfig" scheduler "$controllers"

echo "$store" >"$RUN_DIR/store"
if [[ $store == etcd ]]; then
# --- etcd (tmpfs data, loopback only) ------------------------------------------------------------
rm -rf "$ETCD_DATA"; mkdir -p "$ETCD_DATA"; chmod 700 "$ETCD_DATA"
start etcd "$where" etcd --name kmmr-testbed --data-dir "$ETCD_DATA" --unsafe-no-fsync \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
  --initial-cluster "kmmr-testbed=http://127.0.0.1:$((etcd_port + 1))" \
  --listen-metrics-urls "http://127.0.0.1:$((etcd_port + 2))" \
  --log-level warn --quota-backend-bytes 2147483648
else
# --- KmMR (4 durable replicas and the etcd gateway, loopback only) --------------------------------
# The project's own binaries, built here unless KMMR_STORE_BIN names a directory holding them.
if [[ -z ${KMMR_STORE_BIN:-} ]]; then
  (cd "$here/../.." && cargo build -p kmmr-replica --bin kmmr-replica -p kmmr-etcd-gateway --bin kmmr-etcd-gateway)
  KMMR_STORE_BIN="$(cd "$here/../.." && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug"
fi
kmmr_dir="$RUN_DIR/kmmr"
kmmr_port=${KMMR_TESTBED_KMMR_PORT:-24100}
in_where() { if [[ $where == ns ]]; then nsenter "--net=/run/netns/$NETNS" "$@"; else "$@"; fi; }
rm -rf "$kmmr_dir"
# The control plane must not depend on any one replica telling the truth: by default one of them
# corrupts its frames and lies in its replies, and the gateway must still serve only what a
# quorum of correct replicas decided.
byzantine="${KMMR_TESTBED_BYZANTINE:-corrupt}"
byzantine_args=()
[[ $byzantine != none ]] && byzantine_args=(--byzantine 1 --byzantine-mode "$byzantine")
start kmmr-store "$where" "$KMMR_STORE_BIN/kmmr-replica" local --n 4 --dir "$kmmr_dir" \
  --base-port "$kmmr_port" --keep-running "${byzantine_args[@]}"
WATCH=kmmr-store wait_for "a quorum of KmMR replicas" 60 \
  in_where "$KMMR_STORE_BIN/kmmr-replica" status --cluster "$kmmr_dir" \
  || { tail -n 30 "$LOGS/kmmr-store.log" >&2; die "KmMR cluster not up"; }
start etcd-gateway "$where" "$KMMR_STORE_BIN/kmmr-etcd-gateway" --cluster "$kmmr_dir" \
  --listen "127.0.0.1:$etcd_port"
log "control plane state on KmMR: 4 replicas in $kmmr_dir (Byzantine: $byzantine), the etcd API on 127.0.0.1:$etcd_port"
if ((apiservers == 2)); then
  start etcd-gateway-2 "$where" "$KMMR_STORE_BIN/kmmr-etcd-gateway" --cluster "$kmmr_dir" \
    --listen "127.0.0.1:$((etcd_port + 10))"
  log "the second master's gateway on 127.0.0.1:$((etcd_port + 10))"
fi
fi

# --- kube-apiserver ----------------------------------------------------------------------------
# kube_apiserver NAME ETCD_URL BIND PORT EXTRA...
kube_apiserver() {
  local name="$1" etcd="$2" bind="$3" port="$4"; shift 4
  start "$name" "$where" kube-apiserver \
    --etcd-servers "$etcd" \
    --bind-address "$bind" --secure-port "$port" --advertise-address "$advertise" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --allow-privileged=true \
    --enable-aggregator-routing=true \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --profiling=false --v=1 "$@"
}
kube_apiserver kube-apiserver "http://127.0.0.1:$etcd_port" "$api_bind" "$api_port"
# The second master shares the node's address; it leaves the kubernetes Service's endpoints to
# the first (two reconcilers of one address and two ports would overwrite each other's port).
((apiservers == 2)) && kube_apiserver kube-apiserver-2 "http://127.0.0.1:$((etcd_port + 10))" \
  127.0.0.1 "$api2_port" --endpoint-reconciler-type none

if [[ $mode == ns ]]; then
  # Host loopback -> unix socket -> namespace loopback. No route joins the two namespaces.
  rm -f "$BRIDGE_SOCK"
  start bridge-inner ns socat "UNIX-LISTEN:$BRIDGE_SOCK,fork,mode=600" "TCP:127.0.0.1:$api_port"
  start bridge-outer host socat "TCP-LISTEN:$HOST_PORT,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$BRIDGE_SOCK"
fi

WATCH="${store_procs[*]} kube-apiserver" wait_for "the apiserver to be ready" "${KMMR_TESTBED_READY_TIMEOUT:-180}" ready \
  || { tail -n 30 "$LOGS/kube-apiserver.log" >&2; die "kube-apiserver not ready"; }
log "kube-apiserver ready"
if ((apiservers == 2)); then
  ready2() {
    in_where "$K8S_BIN/kubectl" --kubeconfig "$RUN_DIR/controller-manager.kubeconfig" \
      --request-timeout=10s get --raw /readyz
  }
  WATCH="${store_procs[*]} kube-apiserver-2" wait_for "the second apiserver to be ready" "${KMMR_TESTBED_READY_TIMEOUT:-180}" ready2 \
    || { tail -n 30 "$LOGS/kube-apiserver-2.log" >&2; die "the second kube-apiserver not ready"; }
  log "the second kube-apiserver ready on 127.0.0.1:$api2_port: the controller manager and the scheduler use it"
fi

# --- controller manager and scheduler ------------------------------------------------------------
start kube-controller-manager "$where" kube-controller-manager \
  --kubeconfig "$RUN_DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$RUN_DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$RUN_DIR/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 10257 --leader-elect=false \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --flex-volume-plugin-dir "$RUN_DIR/flexvolume" \
  --use-service-account-credentials=true \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --allocate-node-cidrs=true --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --profiling=false --v=1
start kube-scheduler "$where" kube-scheduler \
  --kubeconfig "$RUN_DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig "$RUN_DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig "$RUN_DIR/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false --profiling=false --v=1

# The service-account controller creating `default` shows the controller manager works (with two
# masters: it wrote through the second and kubectl reads through the first).
WATCH="kube-apiserver kube-controller-manager" wait_for "the default service account" 120 kubectl_ -n default get serviceaccount default \
  || { tail -n 30 "$LOGS/kube-controller-manager.log" >&2; die "controller manager not working"; }
log "control plane ready ($mode): $(kubectl_ version 2>/dev/null | tr '\n' ' ')"

if [[ $want_node == 1 ]]; then
  "$here/node.sh" up
fi
echo "export KUBECONFIG=$KUBECONFIG_PATH"
