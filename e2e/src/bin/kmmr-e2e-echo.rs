//! A tiny program of the project's own, packed into an OCI image by the test bed
//! (`e2e/testbed/mkimage.sh`) to show that locally built binaries run as pods without a registry.
//!
//! `kmmr-e2e-echo WORDS...` prints its arguments on one line and exits 0.
//! `kmmr-e2e-echo --connect HOST:PORT...` resolves each target (cluster DNS inside a pod), opens
//! a TCP connection to it with a 5 s timeout, prints the outcome, and exits 1 if any failed.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

fn connect(target: &str) -> Result<String, String> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| format!("resolve: {e}"))?
        .collect();
    let mut last = String::from("no addresses");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(_) => return Ok(addr.to_string()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("--connect") {
        println!("{}", args.join(" "));
        return;
    }
    let mut ok = true;
    for target in &args[1..] {
        match connect(target) {
            Ok(addr) => println!("connected {target} via {addr}"),
            Err(e) => {
                println!("failed {target}: {e}");
                ok = false;
            }
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}
