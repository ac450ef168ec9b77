#!/usr/bin/env bash
# Runs k8s.io/apiserver's own storage tests (the etcd3 store and the cacher, whose Run* tests
# live in pkg/storage/testing) against the etcd gateway, the way kine validates itself: the
# apiserver module of the test bed's Kubernetes version comes from the Go module proxy (pinned by
# go.sum here), is copied into a temporary directory, and only its etcd3 test server
# (pkg/storage/etcd3/testserver) is replaced by testserver/test_server.go, which starts a fresh
# KmMR cluster (4 replicas, one Byzantine) and a fresh gateway for every test. The tests' own
# files run unchanged. Tests listed in known-gaps.txt are skipped, or run on a cluster without
# the Byzantine replica, as the file says, with their reason printed.
#
#   etcd-gateway/storage-suite/run.sh                      both packages
#   etcd-gateway/storage-suite/run.sh -run 'TestGet$'      extra `go test` flags
#   KMMR_SUITE_PACKAGES=storage/etcd3 run.sh               packages under the module's pkg/
#   KMMR_SUITE_BYZANTINE=0 run.sh                          no Byzantine replica
#   KMMR_SUITE_KEEP=1 run.sh                               keep the work directory (logs)
#   KMMR_SUITE_TIMEOUT=25m run.sh                          bound of the test runs (default 25m)
#   KMMR_SUITE_PROFILE=release run.sh                      which cargo profile to build (dev)
#   KMMR_SUITE_GOCACHE=keep run.sh                         use Go's own build cache (faster reruns)
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
# Every package whose tests start the etcd3 test server and need nothing else of etcd: the
# store and the cacher, then the generic registry store, the peer endpoint leases and the peer
# proxy on top of them (the storagebackend/factory tests start TLS servers, which the shim
# refuses: the gateway's TLS has tests of its own).
default_packages="storage/etcd3 storage/cacher registry/generic/registry reconcilers util/peerproxy"
read -r -a packages <<<"${KMMR_SUITE_PACKAGES:-$default_packages}"
timeout_total="${KMMR_SUITE_TIMEOUT:-25m}"

# The binaries under test. The dev profile optimises dependencies (the crypto) fully, and after
# `cargo test --workspace` it is already built; release costs a second full build in CI.
profile="${KMMR_SUITE_PROFILE:-dev}"
log "building kmmr-replica and kmmr-etcd-gateway (profile $profile)"
(cd "$repo" && CARGO_INCREMENTAL=0 "${NICE[@]}" cargo build --profile "$profile" -p kmmr-replica -p kmmr-etcd-gateway)
target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin_dir="$target_dir/$([[ $profile == dev ]] && echo debug || echo "$profile")"
export KMMR_SUITE_REPLICA="$bin_dir/kmmr-replica" KMMR_SUITE_GATEWAY="$bin_dir/kmmr-etcd-gateway"

status=0
work="$(mktemp -d "${TMPDIR:-/tmp}/kmmr-storage-suite.XXXXXX")"
export KMMR_SUITE_PGIDS="$work/pgids" KMMR_SUITE_LOGS="$work/failed-logs"
# The apiserver's test binaries add gigabytes to Go's build cache: a private one, removed with the
# work directory, keeps CI's disk free (KMMR_SUITE_GOCACHE=keep uses the user's, for reruns).
[[ ${KMMR_SUITE_GOCACHE:-} == keep ]] || export GOCACHE="$work/gocache"
mkdir -p "$KMMR_SUITE_LOGS"
cleanup() {
  # A test binary killed by its timeout runs no cleanups: end every cluster it started (each
  # a process group of `local`, its replicas and the gateway), so none outlives the run.
  # Groups the shim reaped itself are marked done: their ids may belong to others by now.
  if [[ -f $KMMR_SUITE_PGIDS ]]; then
    local pgid
    for pgid in $(grep -E '^[0-9]+$' "$KMMR_SUITE_PGIDS" | sort -u); do
      grep -qx "done $pgid" "$KMMR_SUITE_PGIDS" || kill -KILL -- "-$pgid" 2>/dev/null || true
    done
  fi
  if [[ ${KMMR_SUITE_KEEP:-} == 1 ]]; then
    log "kept $work"
  elif ((status != 0)); then
    # The logs of a failed run stay for whoever looks into it; the module's copy goes.
    rm -rf "$work/apiserver" "$work/gocache"
    log "kept the logs of the failed run in $work"
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

# known-gaps.txt: `<package> <test> <mode> <reason>`, test being a top-level test name; mode
# `skip` (not run) or `no-byzantine` (run on clusters without the Byzantine replica). Exactly
# those tests are affected; the reasons are printed in the summary.
declare -A skip honest
gap_lines=()
while IFS= read -r line; do
  [[ -z ${line// /} || $line == \#* ]] && continue
  read -r pkg name mode reason <<<"$line"
  [[ $name =~ ^Test[A-Za-z0-9_]+$ ]] || { log "known-gaps.txt: '$name' is not a top-level test name"; exit 2; }
  case $mode in
    skip) skip[$pkg]+="${skip[$pkg]:+|}$name";;
    no-byzantine) honest[$pkg]+="${honest[$pkg]:+|}$name";;
    *) log "known-gaps.txt: unknown mode '$mode' for $pkg $name"; exit 2;;
  esac
  gap_lines+=("$pkg $name ($mode): $reason")
done <"$here/known-gaps.txt"

# One bound for all test runs, each given what is left of it.
case $timeout_total in
  *m) deadline=$((SECONDS + ${timeout_total%m} * 60));;
  *s) deadline=$((SECONDS + ${timeout_total%s}));;
  *) log "KMMR_SUITE_TIMEOUT: give minutes or seconds (25m, 900s)"; exit 2;;
esac
results="$work/results"
mkdir -p "$results"
run_go_test() { # name-of-run, then go test arguments
  local run="$1"; shift
  local left=$((deadline - SECONDS))
  if ((left < 60)); then
    log "$run: not run, the time bound ($timeout_total) is spent"
    printf '%s\t%s\t0\t0\t0\t0\t0\t0\n' "$run" timeout >>"$results/summary"
    status=1
    return
  fi
  log "$run: go test $*"
  local rc=0
  (cd "$work/apiserver" && timeout --kill-after=30s "${left}s" "${NICE[@]}" \
      go test -count=1 -v -timeout "${left}s" "$@") >"$results/$run.log" 2>&1 || rc=$?
  ((rc == 0)) || status=1
  local counts=() kind
  for kind in '^--- PASS' '^--- FAIL' '^--- SKIP' '^ +--- PASS' '^ +--- FAIL' '^ +--- SKIP'; do
    counts+=("$(grep -a -c -E "$kind" "$results/$run.log" || true)")
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$rc" "${counts[@]}" >>"$results/summary"
  if ((rc != 0)); then
    log "$run failed (exit $rc); failing tests and the end of the log:"
    grep -a -E '^ *--- FAIL' "$results/$run.log" >&2 || true
    tail -n 60 "$results/$run.log" >&2
  fi
}

for pkg in "${packages[@]}"; do
  name="${pkg//\//-}"
  skip_re="${skip[$pkg]:-}${skip[$pkg]:+${honest[$pkg]:+|}}${honest[$pkg]:-}"
  skip_args=()
  [[ -n $skip_re ]] && skip_args=(-skip "^($skip_re)\$")
  run_go_test "$name" "${skip_args[@]}" "$@" "./pkg/$pkg"
  if [[ -n ${honest[$pkg]:-} ]]; then
    KMMR_SUITE_BYZANTINE=0 run_go_test "$name-no-byzantine" -run "^(${honest[$pkg]})\$" "$@" "./pkg/$pkg"
  fi
done

{
  echo
  echo "k8s.io/apiserver $apiserver_version storage tests on the KmMR etcd gateway ($((SECONDS - t0))s)"
  printf '%-34s %-6s %26s %26s\n' run result "top-level pass/fail/skip" "subtests pass/fail/skip"
  while IFS=$'\t' read -r run rc tp tf ts sp sf ss; do
    printf '%-34s %-6s %26s %26s\n' "$run" "$([[ $rc == 0 ]] && echo ok || echo FAIL)" "$tp/$tf/$ts" "$sp/$sf/$ss"
  done <"$results/summary"
  if ((${#gap_lines[@]})); then
    echo "known gaps of the gateway (known-gaps.txt), not run as the other tests are:"
    printf '  %s\n' "${gap_lines[@]}"
  fi
  ((status == 0)) || echo "FAILED: the log of each run is in $results, failed tests' cluster and gateway logs in $KMMR_SUITE_LOGS"
} >&2
exit "$status"
