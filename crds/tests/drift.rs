//! The committed CRD (crds/bftcluster.yaml, copied into the chart) must be exactly what the Rust
//! types generate: Helm never updates CRDs on upgrade, so a stale file silently prunes new fields.

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = kmmr_crds::crd_yaml().expect("the CRD serializes to YAML");
    let committed = include_str!("../bftcluster.yaml");
    assert!(
        generated == committed,
        "crds/bftcluster.yaml is stale: regenerate it with \
         `cargo run -p kmmr-crds --bin crdgen > crds/bftcluster.yaml`, copy it to charts/kmmr/files/ and commit both"
    );
}

/// The chart ships the same file (Helm templates can only read files inside the chart).
#[test]
fn the_charts_copy_of_the_crd_is_the_committed_one() {
    let committed = include_str!("../bftcluster.yaml");
    let chart = include_str!("../../charts/kmmr/files/bftcluster.yaml");
    assert!(
        committed == chart,
        "charts/kmmr/files/bftcluster.yaml differs from crds/bftcluster.yaml: \
         cp crds/bftcluster.yaml charts/kmmr/files/bftcluster.yaml"
    );
}
