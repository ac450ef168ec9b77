#!/usr/bin/env bash
# Builds the test bed's binaries from their Go modules into a cache keyed by version, outside the
# repository:
#   $KMMR_TESTBED_CACHE/kubernetes-<v>/bin: kube-apiserver kube-controller-manager kube-scheduler
#                                           kubelet kube-proxy kubectl
#   $KMMR_TESTBED_CACHE/etcd-<v>/bin:       etcd etcdctl
#   $KMMR_TESTBED_CACHE/helm-<v>/bin:       helm
# A binary that is already there is not rebuilt, so a warm start costs nothing. Each binary is
# linked to a temporary name and renamed, so an interrupted build never leaves a half binary.
#
# Usage: build.sh [all|control-plane|node|tools|helm|etcd|pause]...   (default: all)
#   control-plane: etcd kube-apiserver kube-controller-manager kube-scheduler kubectl
#   node:          kubelet kube-proxy coredns, the pause image
#   tools:         helm kubectl
#   etcd:          etcd etcdctl (the etcd gateway's tests)
# Flags mirror upstream's hack/lib/golang.sh: -trimpath, -tags selinux,notest,grpcnotrace,
# -ldflags "-s -w -X <version vars>", CGO_ENABLED=0 except for kubelet.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
source "$here/versions.sh"

log() { printf '[testbed-build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

grep -q "k8s.io/kubernetes $K8S_VERSION" "$here/k8s/go.mod" \
  && grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$here/etcd/go.mod" \
  && grep -q "helm.sh/helm/v3 $HELM_VERSION" "$here/helm/go.mod" \
  && grep -q "github.com/coredns/coredns $COREDNS_VERSION" "$here/coredns/go.mod" \
  || { log "wrapper go.mod files do not match versions.sh: run e2e/testbed/gen-mod.sh"; exit 1; }

# Go builds share two cores with other work: keep them polite unless told otherwise.
NICE=(nice -n "${KMMR_TESTBED_NICE:-15}")
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
# Go's build cache grows by gigabytes building Kubernetes, and the binaries are cached by version
# anyway: a private cache shared by this run's builds, removed when it ends, keeps the disk free
# for the rest of the tests (a CI run once ran out of space). KMMR_TESTBED_GOCACHE=keep uses the
# user's cache instead, for someone rebuilding often.
if [[ ${KMMR_TESTBED_GOCACHE:-} != keep ]]; then
  GOCACHE="$(mktemp -d "${TMPDIR:-/tmp}/kmmr-gocache.XXXXXX")"
  export GOCACHE
  trap 'rm -rf "$GOCACHE"' EXIT
fi

# Reproducible build date: the time the module version was published.
module_time() { # module@version -> seconds since epoch
  local info
  info="$(go mod download -json "$1" | sed -n 's/^[[:space:]]*"Info": "\(.*\)",$/\1/p')"
  date -u -d "$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")" +%s
}

build_one() { # moddir outdir name package cgo ldflags tags
  local moddir="$1" out="$2" name="$3" pkg="$4" cgo="$5" ldflags="$6" tags="$7"
  if [[ -x "$out/$name" ]]; then log "$name: cached at $out/$name"; return 0; fi
  mkdir -p "$out"
  local start=$SECONDS
  log "$name: building $pkg (CGO_ENABLED=$cgo)"
  (cd "$here/$moddir" && CGO_ENABLED="$cgo" "${NICE[@]}" go build -trimpath ${tags:+-tags "$tags"} \
      -ldflags "$ldflags" -o "$out/.$name.tmp" "$pkg")
  mv -f "$out/.$name.tmp" "$out/$name"
  log "$name: built in $((SECONDS - start))s"
}

k8s_ldflags() {
  local date major minor
  date="$(date -u -d "@$(module_time "k8s.io/kubernetes@$K8S_VERSION")" +%Y-%m-%dT%H:%M:%SZ)"
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  local f="-s -w" p key val
  for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for key in gitVersion gitMajor gitMinor buildDate; do
      case $key in
        gitVersion) val="$K8S_VERSION";; gitMajor) val="$major";; gitMinor) val="$minor";; buildDate) val="$date";;
      esac
      f+=" -X $p.$key=$val"
    done
  done
  printf '%s' "$f"
}

build_k8s() { # names...
  local ld name cgo
  ld="$(k8s_ldflags)"
  for name in "$@"; do
    cgo=0; [[ $name == kubelet ]] && cgo=1
    build_one k8s "$K8S_BIN" "$name" "k8s.io/kubernetes/cmd/$name" "$cgo" "$ld" "selinux,notest,grpcnotrace"
  done
}

build_etcd() {
  build_one etcd "$ETCD_BIN" etcd go.etcd.io/etcd/server/v3 0 "-s -w" ""
  build_etcdctl
}

# The etcd gateway's tests run etcdctl against the gateway and against a real etcd.
build_etcdctl() {
  build_one etcd "$ETCD_BIN" etcdctl go.etcd.io/etcd/etcdctl/v3 0 "-s -w" ""
}

build_helm() {
  local minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local p
  for p in lint/rules chartutil; do
    ld+=" -X helm.sh/helm/v3/pkg/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/$p.k8sVersionMinor=$minor"
  done
  build_one helm "$HELM_BIN" helm helm.sh/helm/v3/cmd/helm 0 "$ld" ""
}

build_coredns() {
  build_one coredns "$COREDNS_BIN" coredns github.com/coredns/coredns 0 \
    "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" ""
}

# The pause image: upstream's build/pause/linux/pause.c from the pinned kubernetes module,
# compiled statically as upstream does, packed by mkimage.sh under the name containerd's
# sandbox_image uses.
build_pause() {
  local dir="$KMMR_TESTBED_CACHE/pause-$PAUSE_VERSION"
  if [[ -s $dir/pause.tar ]]; then log "pause: cached at $dir/pause.tar"; return 0; fi
  local src
  src="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c"
  [[ -f $src ]] || { log "pause: $src not found"; exit 1; }
  mkdir -p "$dir"
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-kmmr" -o "$dir/pause" "$src"
  strip "$dir/pause"
  "$here/mkimage.sh" --name "registry.k8s.io/pause:$PAUSE_VERSION" --out "$dir/pause.tar" "$dir/pause=/pause"
  log "pause: built $dir/pause.tar"
}

targets=("$@"); (( ${#targets[@]} )) || targets=(all)
total=$SECONDS
for t in "${targets[@]}"; do
  case "$t" in
    control-plane) build_etcd; build_k8s kube-apiserver kube-controller-manager kube-scheduler kubectl;;
    node) build_k8s kubelet kube-proxy; build_coredns; build_pause;;
    pause) build_pause;;
    tools) build_k8s kubectl; build_helm;;
    helm) build_helm;;
    etcd) build_etcd;;
    all) build_etcd; build_k8s kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; build_helm; build_coredns; build_pause;;
    *) log "unknown target $t"; exit 2;;
  esac
done
log "done in $((SECONDS - total))s"
