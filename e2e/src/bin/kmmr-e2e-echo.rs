//! A tiny program of the project's own, packed into an OCI image by the test bed
//! (`e2e/testbed/mkimage.sh`) to show that locally built binaries run as pods without a registry.
//! It prints its arguments on one line and exits 0.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("{}", args.join(" "));
}
