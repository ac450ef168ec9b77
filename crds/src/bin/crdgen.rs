//! Prints the BftCluster CustomResourceDefinition as YAML: `cargo run -p kmmr-crds --bin crdgen
//! > crds/bftcluster.yaml`. The drift test fails when the committed file differs.

use std::io::Write;

fn main() -> std::process::ExitCode {
    match kmmr_crds::crd_yaml() {
        Ok(yaml) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(yaml.as_bytes()).and_then(|()| out.flush()) {
                eprintln!("crdgen: writing the CRD: {e}");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: serializing the CRD: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
