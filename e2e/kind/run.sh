#!/usr/bin/env bash
# Runs KmMR's end-to-end tests on kind: builds the replica and operator images with the
# Dockerfile, creates a kind cluster (unless one of that name exists), loads the images into it
# with `kind load docker-image`, and runs the same tests the project's own test bed runs (chart,
# CRD admission, the operator's lifecycle, every example in examples/) against it.
#
#   e2e/kind/run.sh                    build, create the cluster kmmr-e2e, test, delete it
#   KMMR_KIND_KEEP=1 e2e/kind/run.sh   keep the cluster afterwards
#   e2e/kind/run.sh -- --nocapture     arguments after -- go to cargo test
#
# Needs docker (or a compatible engine), kind, kubectl, helm (v3) and cargo on PATH.
# Variables: KMMR_KIND_CLUSTER (kmmr-e2e), KMMR_IMAGE_TAG (e2e), KMMR_KIND_NODE_IMAGE (kind's
# default node image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

missing=()
for tool in docker kind kubectl helm cargo; do
  command -v "$tool" > /dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "e2e/kind/run.sh: missing on PATH: ${missing[*]}. Install them (docker, kind, kubectl, helm v3, cargo) and run again." >&2
  exit 2
fi
if ! docker info > /dev/null 2>&1; then
  echo "e2e/kind/run.sh: docker is installed but its engine does not answer (docker info failed): start it, or run as a user allowed to use it." >&2
  exit 2
fi

cluster="${KMMR_KIND_CLUSTER:-kmmr-e2e}"
tag="${KMMR_IMAGE_TAG:-e2e}"
[[ $tag == latest ]] && { echo "e2e/kind/run.sh: KMMR_IMAGE_TAG=latest: use a fixed tag (kind load needs one)" >&2; exit 2; }
[[ ${1:-} == -- ]] && shift
replica="kmmr/replica:$tag"
operator="kmmr/operator:$tag"

echo "== building $replica and $operator"
docker build --target replica -t "$replica" .
docker build --target operator -t "$operator" .

created=0
if ! kind get clusters 2> /dev/null | grep -qx "$cluster"; then
  echo "== creating kind cluster $cluster"
  kind create cluster --name "$cluster" ${KMMR_KIND_NODE_IMAGE:+--image "$KMMR_KIND_NODE_IMAGE"} --wait 120s
  created=1
fi
cleanup() {
  if ((created)) && [[ ${KMMR_KIND_KEEP:-} != 1 ]]; then
    echo "== deleting kind cluster $cluster"
    kind delete cluster --name "$cluster" || true
  fi
}
trap cleanup EXIT

echo "== loading the images into $cluster"
kind load docker-image --name "$cluster" "$replica" "$operator"

kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" > "$kubeconfig"
export KUBECONFIG="$kubeconfig"
export KMMR_REPLICA_IMAGE="$replica" KMMR_OPERATOR_IMAGE="$operator"
kubectl get nodes -o wide

echo "== running the e2e tests"
# The cluster's tests; the README test (e2e/tests/readme.rs) needs root and no cluster.
cargo test -p kmmr-e2e --test chart --test examples --test operator --test testbed "$@"
cargo test -p kmmr-crds -p kmmr-operator "$@"
