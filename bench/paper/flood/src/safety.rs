//! What the flooder refuses to do: aim outside the allowed range, aim at loopback, multicast
//! or broadcast addresses, or run in the machine's initial network namespace.
//!
//! These checks are the whole reason the tool is safe to keep in the repository: traffic may
//! only go between namespaces that the experiment harness created, never to the host's real
//! network. Every check runs before any socket is opened.

use std::net::Ipv4Addr;
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("--allow {0:?} is not an IPv4 CIDR like 10.77.0.0/16")]
    BadCidr(String),
    #[error(
        "--allow {0} has host bits set; write the network address ({1}/{2}) so the range is unambiguous"
    )]
    HostBitsSet(String, Ipv4Addr, u8),
    #[error(
        "--allow {0} is not inside private address space (10.0.0.0/8, 172.16.0.0/12, \
         192.168.0.0/16); namespace experiments use private addresses only"
    )]
    AllowNotPrivate(String),
    #[error("--allow {0} is a loopback range; that needs --allow-loopback-for-tests (tests only)")]
    AllowLoopbackWithoutFlag(String),
    #[error("--target {0:?} is not IPV4:PORT (host names and IPv6 are not accepted)")]
    BadTarget(String),
    #[error("--target port must not be 0")]
    ZeroPort,
    #[error("{0} is the unspecified address 0.0.0.0")]
    Unspecified(Ipv4Addr),
    #[error("{0} is a broadcast address")]
    Broadcast(Ipv4Addr),
    #[error("{0} is a multicast address")]
    Multicast(Ipv4Addr),
    #[error("{0} is a loopback address; floods go between namespaces, not to loopback")]
    Loopback(Ipv4Addr),
    #[error(
        "--allow-loopback-for-tests is only for 127.0.0.0/8 destinations in unit tests, not {0}"
    )]
    LoopbackFlagMisused(Ipv4Addr),
    #[error("{0} is outside the allowed range {1}")]
    OutsideAllowed(Ipv4Addr, String),
    #[error("{0} is the network or broadcast address of the allowed range {1}")]
    RangeEdge(Ipv4Addr, String),
    #[error(
        "this is the initial network namespace: run me inside the experiment's \
         namespace, e.g. `ip netns exec NS kmmr-flood ...`"
    )]
    InitialNamespace,
    #[error(
        "cannot tell whether this is the initial network namespace ({0}). Run me \
         inside a namespace made with `ip netns add`, via `ip netns exec NS kmmr-flood ...`"
    )]
    NamespaceUnknown(String),
}

/// An IPv4 prefix, e.g. 10.77.0.0/16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, Refusal> {
        let bad = || Refusal::BadCidr(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        // u8 parse alone would accept "+16"; digits only keeps the syntax strict.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(Refusal::HostBitsSet(s.to_string(), network, prefix));
        }
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether all of `self` lies inside `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.network)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

const PRIVATE: [Cidr; 3] = [
    Cidr {
        network: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 8,
    },
    Cidr {
        network: Ipv4Addr::new(172, 16, 0, 0),
        prefix: 12,
    },
    Cidr {
        network: Ipv4Addr::new(192, 168, 0, 0),
        prefix: 16,
    },
];
const LOOPBACK: Cidr = Cidr {
    network: Ipv4Addr::new(127, 0, 0, 0),
    prefix: 8,
};

/// Parses `--allow` and checks that the range itself is acceptable: inside private space, or
/// inside 127.0.0.0/8 when the tests' loopback flag is given. A range like 0.0.0.0/0 would
/// make the destination check meaningless, so it is refused here.
pub fn parse_allow(s: &str, loopback_for_tests: bool) -> Result<Cidr, Refusal> {
    let cidr = Cidr::parse(s)?;
    if cidr.within(&LOOPBACK) {
        return if loopback_for_tests {
            Ok(cidr)
        } else {
            Err(Refusal::AllowLoopbackWithoutFlag(cidr.to_string()))
        };
    }
    if PRIVATE.iter().any(|p| cidr.within(p)) {
        Ok(cidr)
    } else {
        Err(Refusal::AllowNotPrivate(cidr.to_string()))
    }
}

/// Parses `--target IPV4:PORT`. Only literal IPv4 addresses: resolving a name could send the
/// flood somewhere the operator did not write down.
pub fn parse_target(s: &str) -> Result<(Ipv4Addr, u16), Refusal> {
    let bad = || Refusal::BadTarget(s.to_string());
    let (ip, port) = s.trim().rsplit_once(':').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(Refusal::ZeroPort);
    }
    Ok((ip, port))
}

/// Checks one address the flood will put on the wire as a destination (or, for a spoofed
/// SYN source, as the address the victim will answer).
///
/// Directed broadcasts of a link narrower than `allow` (say 10.77.1.255 inside 10.77.0.0/16)
/// are not knowable here; the kernel refuses them anyway because the flooder never sets
/// SO_BROADCAST (sendto fails with EACCES, connect with ENETUNREACH).
pub fn check_address(ip: Ipv4Addr, allow: &Cidr, loopback_for_tests: bool) -> Result<(), Refusal> {
    if ip.is_unspecified() {
        return Err(Refusal::Unspecified(ip));
    }
    if ip.is_broadcast() {
        return Err(Refusal::Broadcast(ip));
    }
    if ip.is_multicast() {
        return Err(Refusal::Multicast(ip));
    }
    if ip.is_loopback() && !loopback_for_tests {
        return Err(Refusal::Loopback(ip));
    }
    if !ip.is_loopback() && loopback_for_tests {
        return Err(Refusal::LoopbackFlagMisused(ip));
    }
    if !allow.contains(ip) {
        return Err(Refusal::OutsideAllowed(ip, allow.to_string()));
    }
    if allow.prefix <= 30 && (ip == allow.network || ip == allow.broadcast()) {
        return Err(Refusal::RangeEdge(ip, allow.to_string()));
    }
    Ok(())
}

/// A namespace's identity: the (device, inode) of its nsfs file.
pub type NsId = (u64, u64);

/// What is known about network namespaces, gathered by [`observe_namespaces`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsFacts {
    /// This process's network namespace, or why it could not be read.
    pub own: Result<NsId, String>,
    /// Namespaces known to be the initial one that could be read: PID 1's, and kthreadd's
    /// (PID 2) when PID 2 is kthreadd.
    pub initial: Vec<NsId>,
    /// Namespaces created with `ip netns add` (bind mounts under /run/netns).
    pub named: Vec<NsId>,
    /// Why each initial-namespace reference could not be read.
    pub unreadable: Vec<String>,
}

fn ns_id(path: &Path) -> Result<NsId, String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the namespace identities the decision needs.
///
/// PID 1's namespace is the textbook reference, but hardened sandboxes deny reading
/// /proc/1/ns/net even to root; kthreadd (PID 2 in the initial PID namespace) is a kernel
/// thread and so always in the initial network namespace, which gives a second reference.
pub fn observe_namespaces() -> NsFacts {
    let own = ns_id(Path::new("/proc/self/ns/net"));
    let mut initial = Vec::new();
    let mut unreadable = Vec::new();
    match ns_id(Path::new("/proc/1/ns/net")) {
        Ok(id) => initial.push(id),
        Err(e) => unreadable.push(e),
    }
    let pid2_is_kthreadd = std::fs::read_to_string("/proc/2/comm")
        .map(|c| c.trim() == "kthreadd")
        .unwrap_or(false);
    if pid2_is_kthreadd {
        match ns_id(Path::new("/proc/2/ns/net")) {
            Ok(id) => initial.push(id),
            Err(e) => unreadable.push(e),
        }
    }
    let mut named = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            if let Ok(id) = ns_id(&entry.path()) {
                named.push(id);
            }
        }
    }
    NsFacts {
        own,
        initial,
        named,
        unreadable,
    }
}

/// Decides from the facts: refuse in the initial namespace, and refuse when that cannot be
/// told, unless this namespace is one that `ip netns add` made (then it is not the initial
/// one, short of someone deliberately naming the initial namespace).
pub fn judge_namespace(facts: &NsFacts) -> Result<(), Refusal> {
    let own = match &facts.own {
        Ok(id) => *id,
        Err(e) => return Err(Refusal::NamespaceUnknown(e.clone())),
    };
    if facts.initial.contains(&own) {
        return Err(Refusal::InitialNamespace);
    }
    if !facts.initial.is_empty() || facts.named.contains(&own) {
        return Ok(());
    }
    Err(Refusal::NamespaceUnknown(facts.unreadable.join("; ")))
}

/// All destination-side checks for one flood, in the order a reader would expect.
///
/// The namespace is not checked for a loopback destination under the tests' flag: loopback
/// traffic cannot leave the namespace it is sent in, whichever that is.
pub fn check_all(
    dst: Ipv4Addr,
    allow: &Cidr,
    loopback_for_tests: bool,
    facts: impl FnOnce() -> NsFacts,
) -> Result<(), Refusal> {
    check_address(dst, allow, loopback_for_tests)?;
    if loopback_for_tests && dst.is_loopback() {
        return Ok(());
    }
    judge_namespace(&facts())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> Cidr {
        Cidr::parse("10.77.0.0/16").expect("valid")
    }

    #[test]
    fn cidr_parsing() {
        let c = Cidr::parse("10.77.0.0/16").expect("valid");
        assert_eq!(c.network, Ipv4Addr::new(10, 77, 0, 0));
        assert_eq!(c.prefix, 16);
        assert!(c.contains(Ipv4Addr::new(10, 77, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 78, 0, 1)));
        assert_eq!(
            Cidr::parse("10.77.1.2/32").expect("valid").to_string(),
            "10.77.1.2/32"
        );
        for bad in [
            "",
            "10.77.0.0",
            "10.77.0.0/",
            "10.77.0.0/33",
            "10.77.0.0/+16",
            "10.77.0.0/-1",
            "10.77.0/16",
            "host/16",
            "::1/128",
            "10.77.0.0/16/1",
            "10.77.0.0/ 16",
            "10.77.0.0/99999999999999999999",
        ] {
            assert_eq!(
                Cidr::parse(bad),
                Err(Refusal::BadCidr(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Cidr::parse("10.77.1.0/16"),
            Err(Refusal::HostBitsSet(_, n, 16)) if n == Ipv4Addr::new(10, 77, 0, 0)
        ));
    }

    #[test]
    fn allow_range_must_be_private_or_test_loopback() {
        assert!(parse_allow("10.77.0.0/16", false).is_ok());
        assert!(parse_allow("172.16.0.0/12", false).is_ok());
        assert!(parse_allow("192.168.7.0/24", false).is_ok());
        for wide in [
            "0.0.0.0/0",
            "8.0.0.0/8",
            "10.0.0.0/7",
            "172.0.0.0/8",
            "1.2.3.4/32",
        ] {
            assert!(
                matches!(parse_allow(wide, false), Err(Refusal::AllowNotPrivate(_))),
                "{wide}"
            );
        }
        assert!(matches!(
            parse_allow("127.0.0.0/8", false),
            Err(Refusal::AllowLoopbackWithoutFlag(_))
        ));
        assert!(parse_allow("127.0.0.0/8", true).is_ok());
        // The loopback flag does not widen anything else.
        assert!(matches!(
            parse_allow("0.0.0.0/0", true),
            Err(Refusal::AllowNotPrivate(_))
        ));
    }

    #[test]
    fn target_parsing() {
        assert_eq!(
            parse_target("10.77.1.2:2379"),
            Ok((Ipv4Addr::new(10, 77, 1, 2), 2379))
        );
        for bad in [
            "",
            "10.77.1.2",
            "10.77.1.2:",
            "10.77.1.2:65536",
            "10.77.1.2:-1",
            "10.77.1.2:+5",
            "localhost:80",
            "[::1]:80",
            "::1:80",
            "10.77.1:80",
            "10.77.1.2:80:1",
        ] {
            assert_eq!(
                parse_target(bad),
                Err(Refusal::BadTarget(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(parse_target("10.77.1.2:0"), Err(Refusal::ZeroPort));
    }

    #[test]
    fn every_refused_destination() {
        let a = allow();
        let cases = [
            (
                Ipv4Addr::new(0, 0, 0, 0),
                Refusal::Unspecified(Ipv4Addr::new(0, 0, 0, 0)),
            ),
            (Ipv4Addr::BROADCAST, Refusal::Broadcast(Ipv4Addr::BROADCAST)),
            (
                Ipv4Addr::new(224, 0, 0, 1),
                Refusal::Multicast(Ipv4Addr::new(224, 0, 0, 1)),
            ),
            (
                Ipv4Addr::new(239, 255, 255, 250),
                Refusal::Multicast(Ipv4Addr::new(239, 255, 255, 250)),
            ),
            (Ipv4Addr::LOCALHOST, Refusal::Loopback(Ipv4Addr::LOCALHOST)),
            (
                Ipv4Addr::new(127, 1, 2, 3),
                Refusal::Loopback(Ipv4Addr::new(127, 1, 2, 3)),
            ),
            (
                Ipv4Addr::new(10, 78, 0, 1),
                Refusal::OutsideAllowed(Ipv4Addr::new(10, 78, 0, 1), a.to_string()),
            ),
            (
                Ipv4Addr::new(8, 8, 8, 8),
                Refusal::OutsideAllowed(Ipv4Addr::new(8, 8, 8, 8), a.to_string()),
            ),
            (
                Ipv4Addr::new(192, 168, 1, 1),
                Refusal::OutsideAllowed(Ipv4Addr::new(192, 168, 1, 1), a.to_string()),
            ),
            (
                Ipv4Addr::new(10, 77, 0, 0),
                Refusal::RangeEdge(Ipv4Addr::new(10, 77, 0, 0), a.to_string()),
            ),
            (
                Ipv4Addr::new(10, 77, 255, 255),
                Refusal::RangeEdge(Ipv4Addr::new(10, 77, 255, 255), a.to_string()),
            ),
        ];
        for (ip, want) in cases {
            assert_eq!(check_address(ip, &a, false), Err(want), "{ip}");
        }
        assert_eq!(
            check_address(Ipv4Addr::new(10, 77, 1, 2), &a, false),
            Ok(())
        );
        // A /31 or /32 has no network/broadcast addresses to avoid.
        let host = Cidr::parse("10.77.1.2/32").expect("valid");
        assert_eq!(
            check_address(Ipv4Addr::new(10, 77, 1, 2), &host, false),
            Ok(())
        );
    }

    #[test]
    fn loopback_flag_only_with_loopback_destinations() {
        let lo = parse_allow("127.0.0.0/8", true).expect("valid");
        assert_eq!(check_address(Ipv4Addr::LOCALHOST, &lo, true), Ok(()));
        assert_eq!(
            check_address(Ipv4Addr::new(10, 77, 1, 2), &allow(), true),
            Err(Refusal::LoopbackFlagMisused(Ipv4Addr::new(10, 77, 1, 2)))
        );
        // Even with the flag, loopback must be inside the allowed range.
        assert!(matches!(
            check_address(Ipv4Addr::LOCALHOST, &allow(), true),
            Err(Refusal::OutsideAllowed(..))
        ));
    }

    fn facts(own: NsId, initial: &[NsId], named: &[NsId]) -> NsFacts {
        NsFacts {
            own: Ok(own),
            initial: initial.to_vec(),
            named: named.to_vec(),
            unreadable: Vec::new(),
        }
    }

    #[test]
    fn namespace_judgement() {
        let init = (4, 4026531833);
        let other = (4, 4026532500);
        assert_eq!(
            judge_namespace(&facts(init, &[init], &[])),
            Err(Refusal::InitialNamespace)
        );
        // Even if someone named the initial namespace, a readable reference wins.
        assert_eq!(
            judge_namespace(&facts(init, &[init], &[init])),
            Err(Refusal::InitialNamespace)
        );
        assert_eq!(judge_namespace(&facts(other, &[init], &[])), Ok(()));
        // No readable reference: only a namespace made by `ip netns add` is accepted.
        assert_eq!(judge_namespace(&facts(other, &[], &[other])), Ok(()));
        assert!(matches!(
            judge_namespace(&facts(other, &[], &[])),
            Err(Refusal::NamespaceUnknown(_))
        ));
        let unknown_self = NsFacts {
            own: Err("denied".into()),
            initial: vec![init],
            named: vec![],
            unreadable: vec![],
        };
        assert_eq!(
            judge_namespace(&unknown_self),
            Err(Refusal::NamespaceUnknown("denied".into()))
        );
    }

    #[test]
    fn check_all_skips_the_namespace_only_for_test_loopback() {
        let init = (4, 1);
        let lo = parse_allow("127.0.0.0/8", true).expect("valid");
        let in_initial = || facts(init, &[init], &[]);
        assert_eq!(
            check_all(Ipv4Addr::LOCALHOST, &lo, true, in_initial),
            Ok(())
        );
        assert_eq!(
            check_all(Ipv4Addr::new(10, 77, 1, 2), &allow(), false, in_initial),
            Err(Refusal::InitialNamespace)
        );
        assert_eq!(
            check_all(Ipv4Addr::new(10, 77, 1, 2), &allow(), false, || facts(
                (4, 2),
                &[init],
                &[]
            )),
            Ok(())
        );
    }

    #[test]
    fn this_test_process_namespace_can_be_observed() {
        // Whatever the sandbox, our own namespace must be readable.
        assert!(observe_namespaces().own.is_ok());
    }
}
