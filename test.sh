#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, unit and property tests, the
# deterministic simulator (4,000 seeds with Byzantine replicas), the scripted protocol
# scenarios, k8s.io/apiserver's storage tests against the etcd gateway, and the end-to-end tests
# against a real Kubernetes test bed built from source.
#
#   ./test.sh              everything
#   KMMR_SKIP_TESTBED=1 ./test.sh   everything but the Kubernetes test bed
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
t0=$SECONDS
stamp() { printf '[test.sh +%ss] %s\n' "$((SECONDS - t0))" "$*" >&2; }

stamp "formatting"
cargo fmt --all -- --check
stamp "lints"
cargo clippy --workspace --all-targets -- -D warnings
if [[ "${KMMR_SKIP_TESTBED:-}" != 1 ]]; then
  # The chart tests in the workspace run helm; the etcd gateway's tests run etcdctl against the
  # gateway and against a real etcd, and a kube-apiserver on the gateway. On a fresh machine
  # they are built first (cached by version outside the repository, so a warm run skips this;
  # the test bed uses the same binaries later).
  stamp "building helm and the control plane (etcd, etcdctl, kube-apiserver, ...) for the workspace tests (cached by version)"
  e2e/testbed/install-deps.sh   # openssl for the certificates the kube-apiserver test makes
  e2e/testbed/build.sh helm control-plane
fi
stamp "unit, property, simulator and scenario tests"
cargo test --workspace
# k8s.io/apiserver's own storage tests (etcd3 store, cacher) against fresh gateways over fresh
# clusters with a Byzantine replica: about 6 minutes warm, more on a cold Go module and build
# cache; bounded so that a hang cannot eat CI's time.
stamp "k8s.io/apiserver storage tests against the etcd gateway (etcd-gateway/storage-suite)"
KMMR_SUITE_TIMEOUT=25m etcd-gateway/storage-suite/run.sh
if [[ "${KMMR_SKIP_TESTBED:-}" == 1 ]]; then
  stamp "skipping the Kubernetes test bed (KMMR_SKIP_TESTBED=1)"
else
  stamp "end-to-end tests on the Kubernetes test bed"
  .ci/testbed-test
fi
stamp "all tests passed"
