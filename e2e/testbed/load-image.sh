#!/usr/bin/env bash
# Packs local files into an OCI image (mkimage.sh) and imports it into the test bed node's
# containerd, where pods can use it with imagePullPolicy: Never or IfNotPresent. No registry.
#   load-image.sh REF SRC[=DEST]... [-- mkimage options]
# e.g. load-image.sh kmmr.local/replica:dev target/release/kmmr-replica
set -euo pipefail
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
(($# >= 2)) || { sed -n '2,5p' "${BASH_SOURCE[0]}" >&2; exit 2; }
ref="$1"; shift
sock="$RUN_DIR/node-state/containerd/containerd.sock"
[[ -S $sock && -f "$RUN_DIR/node" ]] || die "no node: start the test bed with e2e/testbed/up.sh --node"
tar="$(mktemp --suffix=.tar)"
trap 'rm -f "$tar"' EXIT
"$here/mkimage.sh" --name "$ref" --out "$tar" "$@"
ctr --address "$sock" --namespace k8s.io images import "$tar" >/dev/null
images="$(ctr --address "$sock" --namespace k8s.io images ls -q)"
grep -qx "$ref" <<<"$images" || die "$ref not imported"
log "imported $ref into the node's containerd"
