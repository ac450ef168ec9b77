//! Fault-tolerance arithmetic for n = 3f+1 BFT-SMaRt clusters, shared by the schema's CEL rules
//! (which encode the same checks for admission), the operator and the status.

/// Why a (replicas, f) pair cannot run a BFT cluster. Messages name the field and the fix, and
/// match the CEL messages in the CRD so users see the same words from `kubectl` and the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumError {
    /// n < 4.
    TooFewReplicas { replicas: i32 },
    /// n above the supported bound.
    TooManyReplicas { replicas: i32 },
    /// f < 1 or n < 3f+1.
    FaultToleranceTooHigh { replicas: i32, f: i32 },
    /// spec.etcdAPI.replicas outside 1..=9 (checked beside the replica counts because it is the
    /// spec's other count of pods).
    Gateways { replicas: i32 },
}

impl std::fmt::Display for QuorumError {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuorumError::TooFewReplicas { replicas } => write!(
                out,
                "spec.replicas = {replicas}: {}",
                crate::spec::MSG_REPLICAS_MIN
            ),
            QuorumError::TooManyReplicas { replicas } => write!(
                out,
                "spec.replicas = {replicas}: {}",
                crate::spec::MSG_REPLICAS_MAX
            ),
            QuorumError::FaultToleranceTooHigh { replicas, f } => write!(
                out,
                "spec.replicas = {replicas}, spec.f = {f}: {}",
                crate::spec::MSG_F
            ),
            QuorumError::Gateways { replicas } => write!(
                out,
                "spec.etcdAPI.replicas = {replicas}: {}",
                crate::spec::MSG_GATEWAYS
            ),
        }
    }
}

impl std::error::Error for QuorumError {}

/// The largest f that n replicas tolerate: floor((n-1)/3). This is also the default when
/// `spec.f` is unset. The protocol's own rule (`kmmr_protocol::view::default_f`), in the
/// schema's integer type.
pub fn max_f(n: i32) -> i32 {
    let n = usize::try_from(n).unwrap_or(0);
    i32::try_from(kmmr_protocol::view::default_f(n)).unwrap_or(i32::MAX)
}

/// The f used when `spec.f` is unset.
pub fn default_f(n: i32) -> i32 {
    max_f(n)
}

/// BFT-SMaRt's quorum for n replicas tolerating f faults: ceil((n+f+1)/2), which is 2f+1 when
/// n = 3f+1. Any two quorums then intersect in at least f+1 replicas, one of them correct. The
/// protocol's own rule (`kmmr_protocol::view::quorum`), in the schema's integer type.
pub fn quorum_size(n: i32, f: i32) -> i32 {
    let (n, f) = (
        usize::try_from(n).unwrap_or(0),
        usize::try_from(f).unwrap_or(0),
    );
    i32::try_from(kmmr_protocol::view::quorum(n, f)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_f_is_floor_of_n_minus_one_over_three() {
        for (n, f) in [
            (4, 1),
            (5, 1),
            (6, 1),
            (7, 2),
            (9, 2),
            (10, 3),
            (13, 4),
            (100, 33),
        ] {
            assert_eq!(default_f(n), f, "n = {n}");
        }
    }

    #[test]
    fn quorum_is_two_f_plus_one_when_n_is_three_f_plus_one() {
        for f in 1..=20 {
            assert_eq!(quorum_size(3 * f + 1, f), 2 * f + 1);
        }
    }

    #[test]
    fn any_two_quorums_share_a_correct_replica() {
        for n in 4..=64 {
            for f in 1..=max_f(n) {
                let q = quorum_size(n, f);
                assert!(
                    q <= n - f,
                    "n={n} f={f}: a quorum must be reachable with f down"
                );
                assert!(2 * q - n > f, "n={n} f={f}: quorums must intersect in f+1");
            }
        }
    }
}
