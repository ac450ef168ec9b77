# shellcheck shell=bash
# Versions of everything the KmMR test bed builds. Sourced by the test bed scripts.
# After changing a version, run ./gen-mod.sh to regenerate the wrapper Go modules.
K8S_VERSION=v1.34.4      # k8s.io/kubernetes; staging modules are pinned to v0.${minor}.${patch}
ETCD_VERSION=v3.6.16     # go.etcd.io/etcd/server/v3
HELM_VERSION=v3.19.5     # helm.sh/helm/v3 (uses the k8s.io v0.34 client libraries)
COREDNS_VERSION=v1.14.7  # github.com/coredns/coredns: cluster DNS for the node, run as a process
PAUSE_VERSION=3.10.1     # tag of the locally built pause image (the name containerd's sandbox_image uses)

# Where built binaries, certificates and run state live (outside the repository).
KMMR_TESTBED_CACHE="${KMMR_TESTBED_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-testbed}"
# Tools live in sbin directories and Go in /usr/local/go on these machines; a CI environment
# may not have them on PATH.
for _d in /usr/local/go/bin /usr/local/sbin /usr/sbin /sbin; do
  [[ -d $_d && ":$PATH:" != *":$_d:"* ]] && PATH="$PATH:$_d"
done
unset _d
export PATH
K8S_BIN="$KMMR_TESTBED_CACHE/kubernetes-$K8S_VERSION/bin"
ETCD_BIN="$KMMR_TESTBED_CACHE/etcd-$ETCD_VERSION/bin"
HELM_BIN="$KMMR_TESTBED_CACHE/helm-$HELM_VERSION/bin"
COREDNS_BIN="$KMMR_TESTBED_CACHE/coredns-$COREDNS_VERSION/bin"
RUN_DIR="${KMMR_TESTBED_RUN:-$KMMR_TESTBED_CACHE/run}"
