//! The committed CRD (crds/bftcluster.yaml, copied into the chart) must be exactly what the Rust
//! types generate: Helm never updates CRDs on upgrade, so a stale file silently prunes new fields.

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = kmmr_crds::crd_yaml().expect("the CRD serializes to YAML");
    let committed = include_str!("../bftcluster.yaml");
    assert!(
        generated == committed,
        "crds/bftcluster.yaml is stale: regenerate it with \
         `cargo run -p kmmr-crds --bin crdgen > crds/bftcluster.yaml` and commit it"
    );
}
