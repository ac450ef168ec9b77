//! A small non-cryptographic generator (SplitMix64) for source ports, sequence numbers, IP ids
//! and garbage payloads. Nothing here needs unpredictability against an adversary, only
//! variety, so a crate dependency would buy nothing.

use std::time::{SystemTime, UNIX_EPOCH};

pub struct Rng(u64);

impl Rng {
    #[cfg(test)]
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed)
    }

    /// Seeded from the clock and the process id, so two floods started together (one per
    /// attacker namespace) do not send identical port sequences.
    pub fn from_entropy(salt: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(nanos ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9e37_79b9))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A source port in the ephemeral range 1024..=65535, so that replies are not aimed at
    /// well-known services of the attacker's own namespace.
    pub fn port(&mut self) -> u16 {
        1024 + (self.next_u64() % (65536 - 1024)) as u16
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_ephemeral_and_varied() {
        let mut r = Rng::from_seed(1);
        let ports: Vec<u16> = (0..1000).map(|_| r.port()).collect();
        assert!(ports.iter().all(|&p| p >= 1024));
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert!(distinct.len() > 900);
    }

    #[test]
    fn fill_handles_lengths_not_multiple_of_8() {
        let mut r = Rng::from_seed(2);
        let mut b = [0u8; 13];
        r.fill(&mut b);
        assert!(b.iter().any(|&x| x != 0));
    }
}
