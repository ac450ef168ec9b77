#!/usr/bin/env bash
# Installs what the test bed needs from Debian, once: socat (host <-> namespace bridge), openssl,
# gcc and static libc (pause), and for the node containerd, runc, the CNI plugins, iptables and
# conntrack. Debian's containerd (1.6.20) is started only by node.sh, with its own config; the
# package installs no running service on a machine whose PID 1 is not systemd.
set -euo pipefail
pkgs=(socat curl openssl ca-certificates gcc libc6-dev iproute2 util-linux procps
  containerd runc containernetworking-plugins iptables conntrack)
missing=()
for p in "${pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "install-deps: Go is required (the Go toolchain is not installed by this script)" >&2; exit 1; }
