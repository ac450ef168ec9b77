#!/usr/bin/env bash
# Runs k8s.io/apiserver's own storage tests (the etcd3 store and the cacher, whose Run* tests
# live in pkg/storage/testing) against the etcd gateway, the way kine validates itself: the
# apiserver module of the test bed's Kubernetes version comes from the Go module proxy (pinned by
# go.sum here), is copied into a temporary directory, and only its etcd3 test server
# (pkg/storage/etcd3/testserver) is replaced by testserver/test_server.go, which starts a fresh
# KmMR cluster (4 replicas, one Byzantine) and a fresh gateway for every test. The tests' own
# files run unchanged. Tests listed in known-gaps.txt are skipped, with their reason printed.
#
#   etcd-gateway/storage-suite/run.sh                      both packages
#   etcd-gateway/storage-suite/run.sh -run 'TestGet$'      extra `go test` flags
#   KMMR_SUITE_PACKAGES=etcd3 run.sh                       one package (etcd3, cacher)
#   KMMR_SUITE_BYZANTINE=0 run.sh                          no Byzantine replica
#   KMMR_SUITE_KEEP=1 run.sh                               keep the work directory (logs)
#   KMMR_SUITE_TIMEOUT=40m run.sh                          bound of the whole run (default 40m)
#   KMMR_SUITE_PROFILE=release run.sh                      which cargo profile to build (dev)
#
# Exit status: 0 when every test not listed as a known gap passed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../../e2e/testbed/versions.sh
source "$repo/e2e/testbed/versions.sh"

t0=$SECONDS
log() { printf '[storage-suite +%ss] %s\n' "$((SECONDS - t0))" "$*" >&2; }

apiserver_version="v0.${K8S_VERSION#v1.}"
grep -q "k8s.io/apiserver $apiserver_version\$" "$here/go.mod" \
  || { log "go.mod does not pin k8s.io/apiserver $apiserver_version: run etcd-gateway/storage-suite/gen-mod.sh"; exit 1; }

export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
NICE=(nice -n "${KMMR_SUITE_NICE:-10}")
packages=(${KMMR_SUITE_PACKAGES:-etcd3 cacher})
timeout_total="${KMMR_SUITE_TIMEOUT:-40m}"

# The binaries under test. The dev profile optimises dependencies (the crypto) fully, and after
# `cargo test --workspace` it is already built; release costs a second full build in CI.
profile="${KMMR_SUITE_PROFILE:-dev}"
log "building kmmr-replica and kmmr-etcd-gateway (profile $profile)"
(cd "$repo" && CARGO_INCREMENTAL=0 "${NICE[@]}" cargo build --profile "$profile" -p kmmr-replica -p kmmr-etcd-gateway)
target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin_dir="$target_dir/$([[ $profile == dev ]] && echo debug || echo "$profile")"
export KMMR_SUITE_REPLICA="$bin_dir/kmmr-replica" KMMR_SUITE_GATEWAY="$bin_dir/kmmr-etcd-gateway"

work="$(mktemp -d "${TMPDIR:-/tmp}/kmmr-storage-suite.XXXXXX")"
export KMMR_SUITE_PGIDS="$work/pgids" KMMR_SUITE_LOGS="$work/failed-logs"
mkdir -p "$KMMR_SUITE_LOGS"
cleanup() {
  # A test binary killed by its timeout runs no cleanups: end every cluster it started (each
  # a process group of `local`, its replicas and the gateway), so none outlives the run.
  if [[ -f $KMMR_SUITE_PGIDS ]]; then
    while read -r pgid; do
      [[ $pgid =~ ^[0-9]+$ ]] && kill -KILL -- "-$pgid" 2>/dev/null || true
    done <"$KMMR_SUITE_PGIDS"
  fi
  if [[ ${KMMR_SUITE_KEEP:-} == 1 ]]; then
    log "kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

log "fetching k8s.io/apiserver $apiserver_version (Go module proxy, checked against go.sum)"
src="$(cd "$here" && go mod download -json "k8s.io/apiserver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d $src ]] || { log "cannot download k8s.io/apiserver $apiserver_version"; exit 1; }
cp -R "$src" "$work/apiserver"
chmod -R u+w "$work/apiserver"
shim_dest="$work/apiserver/pkg/storage/etcd3/testserver"
# Upstream's test server is one file; it is replaced whole, so that nothing of embedded etcd
# starts by mistake.
rm -f "$shim_dest"/*.go
cp "$here/testserver/test_server.go" "$shim_dest/test_server.go"

# known-gaps.txt: `<package> <test>  <reason>`, test being a top-level test name or a
# subtest path (Top/sub). Exactly those are skipped; the reasons are printed.
declare -A skip_top
declare -A skip_sub
gap_lines=()
while IFS= read -r line; do
  [[ -z ${line// /} || $line == \#* ]] && continue
  read -r pkg name reason <<<"$line"
  gap_lines+=("$pkg $name: $reason")
  if [[ $name == */* ]]; then
    skip_sub[$pkg]+="${skip_sub[$pkg]:+|}$name"
  else
    skip_top[$pkg]+="${skip_top[$pkg]:+|}$name"
  fi
done <"$here/known-gaps.txt"

results="$work/results"
mkdir -p "$results"
status=0
for pkg in "${packages[@]}"; do
  skip_args=()
  if [[ -n ${skip_sub[$pkg]:-} ]]; then
    log "known-gaps.txt names subtests ($pkg: ${skip_sub[$pkg]}), which -skip cannot select exactly: list their top-level test"
    exit 2
  fi
  [[ -n ${skip_top[$pkg]:-} ]] && skip_args=(-skip "^(${skip_top[$pkg]})\$")
  log "go test k8s.io/apiserver/pkg/storage/$pkg ${skip_args[*]} $*"
  set +e
  (cd "$work/apiserver" && timeout --kill-after=30s "$timeout_total" "${NICE[@]}" \
      go test -count=1 -v -timeout "$timeout_total" "${skip_args[@]}" "$@" "./pkg/storage/$pkg") \
    >"$results/$pkg.log" 2>&1
  rc=$?
  set -e
  ((rc == 0)) || status=1
  top_pass=$(grep -c '^--- PASS' "$results/$pkg.log" || true)
  top_fail=$(grep -c '^--- FAIL' "$results/$pkg.log" || true)
  top_skip=$(grep -c '^--- SKIP' "$results/$pkg.log" || true)
  sub_pass=$(grep -c '^ \+--- PASS' "$results/$pkg.log" || true)
  sub_fail=$(grep -c '^ \+--- FAIL' "$results/$pkg.log" || true)
  sub_skip=$(grep -c '^ \+--- SKIP' "$results/$pkg.log" || true)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pkg" "$rc" "$top_pass" "$top_fail" "$top_skip" \
    "$sub_pass" "$sub_fail" "$sub_skip" >>"$results/summary"
  if ((rc != 0)); then
    log "$pkg failed (exit $rc); failing tests and the end of the log:"
    grep -E '^ *--- FAIL' "$results/$pkg.log" >&2 || true
    tail -n 60 "$results/$pkg.log" >&2
    if [[ -n ${KMMR_SUITE_FAILED_LOG_DIR:-} ]]; then
      mkdir -p "$KMMR_SUITE_FAILED_LOG_DIR"
      cp -R "$results/$pkg.log" "$KMMR_SUITE_LOGS" "$KMMR_SUITE_FAILED_LOG_DIR/" 2>/dev/null || true
    fi
  fi
done

{
  echo
  echo "k8s.io/apiserver $apiserver_version storage tests on the KmMR etcd gateway ($((SECONDS - t0))s)"
  printf '%-8s %-6s %28s %28s\n' package result "top-level pass/fail/skip" "subtests pass/fail/skip"
  while IFS=$'\t' read -r pkg rc tp tf ts sp sf ss; do
    printf '%-8s %-6s %28s %28s\n' "$pkg" "$([[ $rc == 0 ]] && echo ok || echo FAIL)" "$tp/$tf/$ts" "$sp/$sf/$ss"
  done <"$results/summary"
  if ((${#gap_lines[@]})); then
    echo "skipped as known gaps of the gateway (known-gaps.txt):"
    printf '  %s\n' "${gap_lines[@]}"
  fi
} >&2
exit "$status"
