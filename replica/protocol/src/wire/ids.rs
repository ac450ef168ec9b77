//! Newtypes for the protocol's identifiers and counters.

use std::fmt;

use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};

macro_rules! counter {
    ($(#[$m:meta])* $name:ident, $t:ty, $put:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $t);

        impl $name {
            pub fn next(self) -> Self {
                $name(self.0.saturating_add(1))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl Encode for $name {
            fn encode(&self, w: &mut Writer) {
                w.$put(self.0);
            }
        }

        impl Decode for $name {
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok($name(r.$put()?))
            }
        }
    };
}

counter!(
    /// A replica's identity within the view.
    ReplicaId, u32, u32, "r"
);
counter!(
    /// Consensus instance id: the position of a batch in the total order. CID 0 is the first.
    Cid, u64, u64, "cid"
);
counter!(
    /// The leader-change counter: regency r is led by the view member at position r mod n. The
    /// epoch of a consensus instance is the regency of the leader that proposed in it.
    Regency, u32, u32, "reg"
);
counter!(
    /// The view (membership) number; increments on every reconfiguration.
    ViewId, u32, u32, "view"
);

/// The epoch of a consensus instance. Epochs are the regencies of their proposers, so each
/// epoch has exactly one legitimate proposer.
pub type Epoch = Regency;
