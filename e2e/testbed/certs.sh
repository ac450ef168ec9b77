#!/usr/bin/env bash
# Creates the test bed's PKI with openssl under $RUN_DIR/pki, once: a CA, the apiserver's
# serving certificate, client certificates for the admin (group system:masters), the controller
# manager, the scheduler, the kubelet, kube-proxy and the apiserver's kubelet client, and the
# service-account signing key pair. All keys are ECDSA P-256. Existing files are kept.
set -euo pipefail
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

mkdir -p "$PKI"
cd "$PKI"
umask 077

newkey() { [[ -s $1 ]] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -s ca.crt ]]; then
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=kmmr-testbed-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out ca.crt 2>/dev/null
fi

# The aggregation layer's front proxy has a CA of its own, as in kubeadm.
if [[ ! -s front-proxy-ca.crt ]]; then
  newkey front-proxy-ca.key
  openssl req -x509 -new -key front-proxy-ca.key -sha256 -days 3650 -subj "/CN=kmmr-testbed-front-proxy-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out front-proxy-ca.crt 2>/dev/null
fi

# sign NAME SUBJECT EXTENDED-KEY-USAGE [SUBJECT-ALT-NAMES]
sign() {
  local name="$1" subj="$2" eku="$3" san="${4:-}" ca="${5:-ca}"
  [[ -s $name.crt ]] && return 0
  newkey "$name.key"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n $san ]] && echo "subjectAltName=$san"
  } >"$name.ext"
  openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -sha256 -days 3650 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

sign apiserver "/CN=kube-apiserver" serverAuth \
  "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,IP:127.0.0.1,IP:$SERVICE_IP,IP:$NODE_IP"
sign admin "/O=system:masters/CN=kmmr-admin" clientAuth
sign controller-manager "/CN=system:kube-controller-manager" clientAuth
sign scheduler "/CN=system:kube-scheduler" clientAuth
sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
sign kubelet-serving "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,IP:$NODE_IP,IP:127.0.0.1"
sign kube-proxy "/CN=system:kube-proxy" clientAuth
sign coredns "/CN=system:coredns" clientAuth
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
sign front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca

if [[ ! -s sa.key ]]; then
  newkey sa.key
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
fi
chmod 600 ./*.key
