//! End-to-end tests against a real Kubernetes named by `KUBECONFIG`, and the test bed that
//! provides one on machines without a container registry (see `testbed/`).
