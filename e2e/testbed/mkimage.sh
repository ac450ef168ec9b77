#!/usr/bin/env bash
# Turns local binaries into an OCI image archive, without a registry or a container engine:
# one uncompressed layer holding the files and, for dynamically linked programs, the shared
# libraries they load (from ldd) and the dynamic loader; reproducible (sorted, owner 0, mtime 0).
#
#   mkimage.sh --name REF --out FILE.tar [--entrypoint PATH] [--env K=V]... SRC[=DEST]...
#
# SRC is a file on this machine; DEST is its path inside the image (default: /usr/local/bin/<name>
# for executables, else SRC's own path). --entrypoint defaults to the first SRC's DEST.
# REF must be a full reference such as kmmr.local/replica:dev. The archive's index carries the
# name in io.containerd.image.name, so `ctr -n k8s.io images import FILE.tar` registers REF;
# load-image.sh does that for the test bed's node.
set -euo pipefail

name="" out="" entry="" envs=() files=()
while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2;;
    --out) out="$2"; shift 2;;
    --entrypoint) entry="$2"; shift 2;;
    --env) envs+=("$2"); shift 2;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0;;
    *) files+=("$1"); shift;;
  esac
done
[[ -n $name && -n $out && ${#files[@]} -gt 0 ]] || { sed -n '2,12p' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ $name == */*:* ]] || { echo "mkimage: --name must be a full reference like kmmr.local/app:tag" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs" layout="$work/layout"
mkdir -p "$root" "$layout/blobs/sha256" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"

add() { # src dest
  mkdir -p "$root$(dirname "$2")"
  cp -L --preserve=mode "$1" "$root$2"
}
add_libs() { # binary: copy what ldd says it loads, keeping paths (covers the loader too)
  local line lib
  while read -r line; do
    lib=""
    case "$line" in
      *"=> "/*) lib="${line#*=> }"; lib="${lib%% (*}";;
      /*) lib="${line%% (*}";;
    esac
    [[ -n $lib && -f $lib && ! -e "$root$lib" ]] && add "$lib" "$lib"
  done < <(ldd "$1" 2>/dev/null || true)
  # The loop's status is its last test's: a library already added by an earlier binary would
  # otherwise fail the call, and set -e would end the script with no image and no message.
  return 0
}

for spec in "${files[@]}"; do
  src="${spec%%=*}" dest=""
  [[ $spec == *=* ]] && dest="${spec#*=}"
  [[ -f $src ]] || { echo "mkimage: no such file $src" >&2; exit 1; }
  if [[ -z $dest ]]; then
    if [[ -x $src ]]; then dest="/usr/local/bin/$(basename "$src")"; else dest="$(readlink -f "$src")"; fi
  fi
  add "$src" "$dest"
  [[ -x $src ]] && add_libs "$src"
  [[ -n $entry ]] || entry="$dest"
done
# A passwd/group so that programs looking up uid 0 or 65534 find them.
printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

blob() { # file -> prints digest hex and moves file into blobs
  local hex
  hex="$(sha256sum "$1" | cut -d' ' -f1)"
  mv "$1" "$layout/blobs/sha256/$hex"
  printf '%s' "$hex"
}
size() { stat -c %s "$layout/blobs/sha256/$1"; }
jstr() { # JSON string
  local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"
}

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$root" -cf "$work/layer.tar" .
layer="$(blob "$work/layer.tar")"

env_json="$(jstr "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")"
for e in "${envs[@]}"; do env_json+=",$(jstr "$e")"; done
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":[%s],"Env":[%s],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"kmmr e2e/testbed/mkimage.sh"}]}' \
  "$(jstr "$entry")" "$env_json" "$layer" >"$work/config.json"
config="$(blob "$work/config.json")"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config" "$(size "$config")" "$layer" "$(size "$layer")" >"$work/manifest.json"
manifest="$(blob "$work/manifest.json")"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":%s,"org.opencontainers.image.ref.name":%s}}]}' \
  "$manifest" "$(size "$manifest")" "$(jstr "$name")" "$(jstr "${name##*:}")" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

mkdir -p "$(dirname "$out")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "mkimage: $name -> $out (layer sha256:${layer:0:12}, $(size "$layer") bytes)" >&2
