//! The hand-built TCP SYN (IPv4 header + TCP header with an MSS option) and the Internet
//! checksums over it.
//!
//! Built by hand because a SYN flood must not complete handshakes: the kernel's own TCP would
//! keep state and retransmit, which neither bounds the rate nor looks like the attack.

use std::net::Ipv4Addr;

pub const IPV4_HEADER_LEN: usize = 20;
/// 20 bytes of TCP header plus a 4-byte MSS option, as a real SYN carries one; a SYN without
/// options is legal but rarer and some stacks treat it differently.
pub const TCP_HEADER_LEN: usize = 24;
pub const SYN_LEN: usize = IPV4_HEADER_LEN + TCP_HEADER_LEN;

const PROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;

/// The fields that vary from one SYN to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynSpec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ip_id: u16,
}

/// Adds `data` as big-endian 16-bit words to a running one's-complement sum (RFC 1071); an odd
/// last byte is padded with zero. The sum is kept in a u64 and folded at the end, which cannot
/// overflow for any packet that fits in memory.
fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Truncation is exact: the loop leaves at most 16 bits.
    acc as u16
}

/// The Internet checksum of `data`: the one's complement of the one's-complement sum.
/// Over a header that already holds its correct checksum it yields 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum_words(0, data))
}

/// The TCP checksum of `segment` (header + payload) including the IPv4 pseudo-header
/// (RFC 793 §3.1): source, destination, zero, protocol, TCP length.
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut acc = sum_words(0, &src.octets());
    acc = sum_words(acc, &dst.octets());
    acc += u64::from(PROTO_TCP);
    acc += segment.len() as u64;
    !fold(sum_words(acc, segment))
}

/// Builds one SYN with correct IPv4 and TCP checksums.
///
/// The IPv4 checksum is filled in even though Linux recomputes it for IP_HDRINCL sockets, so
/// that the packet is right on its own (and testable without a kernel).
pub fn build_syn(spec: &SynSpec) -> [u8; SYN_LEN] {
    let mut p = [0u8; SYN_LEN];
    // IPv4 header.
    p[0] = 0x45; // version 4, IHL 5 words
    p[1] = 0; // DSCP/ECN
    p[2..4].copy_from_slice(&(SYN_LEN as u16).to_be_bytes());
    p[4..6].copy_from_slice(&spec.ip_id.to_be_bytes());
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF, as Linux sets on TCP
    p[8] = 64; // TTL
    p[9] = PROTO_TCP;
    // p[10..12] checksum, below
    p[12..16].copy_from_slice(&spec.src.octets());
    p[16..20].copy_from_slice(&spec.dst.octets());
    let ip_sum = internet_checksum(&p[..IPV4_HEADER_LEN]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    // TCP header.
    let t = IPV4_HEADER_LEN;
    p[t..t + 2].copy_from_slice(&spec.src_port.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&spec.dst_port.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&spec.seq.to_be_bytes());
    // ack number 0
    p[t + 12] = ((TCP_HEADER_LEN / 4) as u8) << 4; // data offset in 32-bit words
    p[t + 13] = TCP_FLAG_SYN;
    // Window: Linux's usual value in a SYN.
    p[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
    // Checksum at t+16..t+18 (below); urgent pointer 0.
    p[t + 20] = 2; // option kind: MSS
    p[t + 21] = 4; // option length
    p[t + 22..t + 24].copy_from_slice(&1460u16.to_be_bytes());
    let tcp_sum = tcp_checksum(spec.src, spec.dst, &p[t..]);
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// An independent checksum, written the obvious way (sum of 16-bit words, carries folded
    /// at the end, as in RFC 1071's reference code), to check the optimised one against.
    fn reference_sum(bytes: &[u8]) -> u32 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i + 1 < bytes.len() {
            sum += (u32::from(bytes[i]) << 8) | u32::from(bytes[i + 1]);
            i += 2;
        }
        if i < bytes.len() {
            sum += u32::from(bytes[i]) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    fn spec() -> SynSpec {
        SynSpec {
            src: Ipv4Addr::new(10, 77, 1, 1),
            dst: Ipv4Addr::new(10, 77, 1, 2),
            src_port: 40000,
            dst_port: 2379,
            seq: 0xdead_beef,
            ip_id: 0x1234,
        }
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // The worked example from the IPv4 header checksum literature (Wikipedia, "Internet
        // checksum"): 192.168.0.1 -> 192.168.0.199, checksum 0xb861.
        let mut h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(internet_checksum(&h), 0);
    }

    #[test]
    fn built_syn_checksums_verify() {
        let p = build_syn(&spec());
        // IPv4: summing the header including its checksum gives 0xffff.
        assert_eq!(reference_sum(&p[..IPV4_HEADER_LEN]), 0xffff);
        // TCP: pseudo-header + segment including its checksum gives 0xffff.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]); // src, dst
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(TCP_HEADER_LEN as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[IPV4_HEADER_LEN..]);
        assert_eq!(reference_sum(&pseudo), 0xffff);
    }

    #[test]
    fn built_syn_checksums_verify_for_many_random_syns() {
        let mut rng = Rng::from_seed(7);
        for _ in 0..10_000 {
            let s = SynSpec {
                src: Ipv4Addr::from(rng.next_u32()),
                dst: Ipv4Addr::from(rng.next_u32()),
                src_port: rng.next_u32() as u16,
                dst_port: rng.next_u32() as u16,
                seq: rng.next_u32(),
                ip_id: rng.next_u32() as u16,
            };
            let p = build_syn(&s);
            assert_eq!(reference_sum(&p[..IPV4_HEADER_LEN]), 0xffff, "{s:?}");
            let mut pseudo = p[12..20].to_vec();
            pseudo.extend_from_slice(&[0, PROTO_TCP, 0, TCP_HEADER_LEN as u8]);
            pseudo.extend_from_slice(&p[IPV4_HEADER_LEN..]);
            assert_eq!(reference_sum(&pseudo), 0xffff, "{s:?}");
        }
    }

    #[test]
    fn odd_length_checksum_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
        assert_eq!(
            internet_checksum(&[0xab, 0xcd, 0xef]),
            !(reference_sum(&[0xab, 0xcd, 0xef]) as u16)
        );
    }

    #[test]
    fn syn_fields_are_where_they_belong() {
        let s = spec();
        let p = build_syn(&s);
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, SYN_LEN);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 0x1234);
        assert_eq!(p[9], 6);
        assert_eq!(&p[12..16], &[10, 77, 1, 1]);
        assert_eq!(&p[16..20], &[10, 77, 1, 2]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 40000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 2379);
        assert_eq!(
            u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
            0xdead_beef
        );
        assert_eq!(&p[28..32], &[0, 0, 0, 0], "ack number");
        assert_eq!(p[32] >> 4, 6, "data offset");
        assert_eq!(p[33], 0x02, "SYN only");
        assert_eq!(&p[40..44], &[2, 4, 0x05, 0xb4], "MSS 1460");
    }
}
