//! A bounded pool of slots (handshakes in progress, open HTTP connections) shared fairly between
//! source addresses, with a share reserved for trusted sources.
//!
//! A single global bound is what an attacker fills: holding every handshake slot of a listener
//! from one host starved new clients for as long as the attack lasted, and a restarted replica
//! could not rejoin. So no one source may hold more than `per_source` slots, and sources that are
//! view members draw first from `reserved` slots that strangers can never take. Sources are
//! grouped by IPv4 address and by IPv6 /64 (one host usually owns a whole /64).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The bounds of a [`Slots`] pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Slots in all, the reserved ones included.
    pub total: usize,
    /// Slots one untrusted source may hold at once.
    pub per_source: usize,
    /// Slots only trusted sources may take (trusted sources have no per-source bound: on one
    /// host, every replica of a test cluster shares an address).
    pub reserved: usize,
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// This source already holds its share.
    SourceFull,
    /// Every slot open to this source is taken.
    PoolFull,
}

/// The source key of an address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct State {
    /// Slots taken from the shared (unreserved) part, by anyone.
    shared: usize,
    /// Slots taken from the reserved part.
    reserved: usize,
    by_source: HashMap<IpAddr, usize>,
    trusted: HashSet<IpAddr>,
}

#[derive(Debug)]
struct Inner {
    limits: SlotLimits,
    state: Mutex<State>,
}

/// The pool. Cheap to clone; clones share the slots.
#[derive(Debug, Clone)]
pub struct Slots {
    inner: Arc<Inner>,
}

/// A held slot, released when dropped.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Inner>,
    source: IpAddr,
    reserved: bool,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Slots {
        let limits = SlotLimits {
            total: limits.total.max(1),
            per_source: limits.per_source.max(1),
            reserved: limits.reserved.min(limits.total),
        };
        Slots {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub fn limits(&self) -> SlotLimits {
        self.inner.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a handful of counters updated in one step; a panic elsewhere cannot
        // leave it half-updated, so a poisoned lock is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the set of trusted addresses (the view members' hosts).
    pub fn set_trusted(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.state().trusted = addrs.into_iter().map(source_of).collect();
    }

    /// Adds one trusted address (a host that just proved a member's key).
    pub fn trust(&self, addr: IpAddr) {
        self.state().trusted.insert(source_of(addr));
    }

    pub fn is_trusted(&self, addr: IpAddr) -> bool {
        self.state().trusted.contains(&source_of(addr))
    }

    /// Slots held now, in all.
    pub fn in_use(&self) -> usize {
        let s = self.state();
        s.shared + s.reserved
    }

    /// Takes a slot for a connection from `addr`, or says why not.
    pub fn try_acquire(&self, addr: IpAddr) -> Result<Slot, SlotRefusal> {
        let source = source_of(addr);
        let l = self.inner.limits;
        let mut s = self.state();
        let held = s.by_source.get(&source).copied().unwrap_or(0);
        let reserved = if s.trusted.contains(&source) {
            if s.reserved < l.reserved {
                true
            } else if s.shared < l.total - l.reserved {
                false
            } else {
                return Err(SlotRefusal::PoolFull);
            }
        } else if held >= l.per_source {
            return Err(SlotRefusal::SourceFull);
        } else if s.shared < l.total - l.reserved {
            false
        } else {
            return Err(SlotRefusal::PoolFull);
        };
        if reserved {
            s.reserved += 1;
        } else {
            s.shared += 1;
        }
        *s.by_source.entry(source).or_insert(0) += 1;
        drop(s);
        Ok(Slot {
            inner: self.inner.clone(),
            source,
            reserved,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.reserved {
            s.reserved = s.reserved.saturating_sub(1);
        } else {
            s.shared = s.shared.saturating_sub(1);
        }
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let slots = Slots::new(SlotLimits {
            total: 10,
            per_source: 3,
            reserved: 0,
        });
        let held: Vec<_> = (0..3)
            .map(|_| slots.try_acquire(ip("10.0.0.1")).expect("within share"))
            .collect();
        assert_eq!(
            slots.try_acquire(ip("10.0.0.1")).err(),
            Some(SlotRefusal::SourceFull)
        );
        assert!(slots.try_acquire(ip("10.0.0.2")).is_ok());
        drop(held);
        assert_eq!(slots.in_use(), 0);
        assert!(slots.try_acquire(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn strangers_never_take_the_reserved_slots() {
        let slots = Slots::new(SlotLimits {
            total: 4,
            per_source: 1,
            reserved: 2,
        });
        slots.set_trusted([ip("10.0.0.9")]);
        let _a = slots.try_acquire(ip("10.0.0.1")).expect("shared slot");
        let _b = slots.try_acquire(ip("10.0.0.2")).expect("shared slot");
        assert_eq!(
            slots.try_acquire(ip("10.0.0.3")).err(),
            Some(SlotRefusal::PoolFull)
        );
        let _m1 = slots.try_acquire(ip("10.0.0.9")).expect("reserved slot");
        let _m2 = slots.try_acquire(ip("10.0.0.9")).expect("reserved slot");
        assert_eq!(
            slots.try_acquire(ip("10.0.0.9")).err(),
            Some(SlotRefusal::PoolFull)
        );
    }

    #[test]
    fn ipv6_hosts_are_grouped_by_prefix() {
        let slots = Slots::new(SlotLimits {
            total: 10,
            per_source: 1,
            reserved: 0,
        });
        let _a = slots.try_acquire(ip("2001:db8::1")).expect("first");
        assert_eq!(
            slots.try_acquire(ip("2001:db8::2")).err(),
            Some(SlotRefusal::SourceFull)
        );
        assert!(slots.try_acquire(ip("2001:db8:0:1::1")).is_ok());
        let _v4 = slots.try_acquire(ip("::ffff:10.0.0.1")).expect("mapped");
        assert_eq!(
            slots.try_acquire(ip("10.0.0.1")).err(),
            Some(SlotRefusal::SourceFull)
        );
    }
}
