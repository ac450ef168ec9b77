#!/usr/bin/env bash
# Installs moto's S3 server (PyPI: moto[server], pinned below) into a virtualenv cached by
# version outside the repository, once, and prints the path of its `moto_server` executable.
# The S3 backup tests (replica/tests/s3.rs) run it on loopback as a real S3 endpoint: signatures,
# multipart uploads, listings and S3's own error answers, with no mock in our code.
#
#   export KMMR_MOTO_SERVER="$(replica/scripts/install-moto.sh)"
#
# A warm run costs well under a second. A virtualenv's scripts name its interpreter by absolute
# path, so it is built in place; the stamp file written last marks it whole, and an install that
# was interrupted (no stamp) is removed and made again.
set -euo pipefail
MOTO_VERSION=5.2.5
cache="${KMMR_MOTO_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-moto}"
venv="$cache/$MOTO_VERSION"
log() { printf '[install-moto %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ -f "$venv/.installed" && -x "$venv/bin/moto_server" ]]; then
  echo "$venv/bin/moto_server"
  exit 0
fi
py=$(command -v python3 || true)
[[ -n $py ]] || { log "python3 is required (PyPI's moto is a Python package)"; exit 1; }
if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian's python3 ships venv and ensurepip separately.
  log "installing python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
log "installing moto[server]==$MOTO_VERSION into $venv"
rm -rf "$venv"
mkdir -p "$cache"
"$py" -m venv "$venv"
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check \
  "moto[server]==$MOTO_VERSION" >&2 || ! "$venv/bin/python" -c 'import moto.server'; then
  rm -rf "$venv"
  log "installing moto[server]==$MOTO_VERSION failed"
  exit 1
fi
touch "$venv/.installed"
echo "$venv/bin/moto_server"
