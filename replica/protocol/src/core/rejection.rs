//! Why the core refused a message or a request, and whether that refusal proves its sender
//! faulty. The operator names a replica Byzantine by such proofs, so what counts as one is
//! decided here, by variant, and nowhere by matching text.

use std::fmt;

/// Declares `Rejection` from two lists, each variant with its label written once: what proves
/// the sender faulty and what does not. The enum, `ALL`, `label` and `proves_misbehaviour` are
/// generated from them, so a new variant cannot be left out of one of them.
macro_rules! rejections {
    (
        evidence { $($ev:ident => $evl:literal,)+ }
        not_evidence { $($ok:ident => $okl:literal,)+ }
    ) => {
        /// A refusal by the core. `label` is the stable metric label and log text.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Rejection {
            $($ev,)+
            $($ok,)+
        }

        impl Rejection {
            /// Every variant, evidence first.
            pub const ALL: [Rejection; [$(stringify!($ev),)+ $(stringify!($ok),)+].len()] =
                [$(Rejection::$ev,)+ $(Rejection::$ok,)+];

            /// Whether this refusal (of a message from a replica) proves that replica faulty: a
            /// correct replica never sends such a message, whatever the timing.
            pub fn proves_misbehaviour(self) -> bool {
                match self {
                    $(Rejection::$ev)|+ => true,
                    $(Rejection::$ok)|+ => false,
                }
            }

            /// The stable snake_case label: the `reason` of `kmmr_rejected_total`, of logs, and
            /// of the accusations in `/status`.
            pub fn label(self) -> &'static str {
                match self {
                    $(Rejection::$ev => $evl,)+
                    $(Rejection::$ok => $okl,)+
                }
            }
        }
    };
}

rejections! {
    // What a correct replica never sends, whatever the timing: evidence.
    evidence {
        ForgedAccept => "forged_accept",
        ForgedRelayedRequest => "forged_relayed_request",
        ForgedRequestInBatch => "forged_request_in_batch",
        EquivocatingPropose => "equivocating_propose",
        EquivocatingWrite => "equivocating_write",
        EquivocatingAccept => "equivocating_accept",
        ProposeFromNonLeader => "propose_from_non_leader",
        InvalidCollect => "invalid_collect",
        InvalidDecisionProof => "invalid_decision_proof",
        UnprovenLastDecision => "unproven_last_decision",
        BadCheckpointBytes => "bad_checkpoint_bytes",
        BatchTooLarge => "batch_too_large",
        UnorderedRequestInBatch => "unordered_request_in_batch",
        DuplicateRequestInBatch => "duplicate_request_in_batch",
        ReplayedRequest => "replayed_request",
        SyncUnprovenLast => "sync_unproven_last",
        SyncCollectWrongRegency => "sync_collect_wrong_regency",
        SyncDuplicateCollect => "sync_duplicate_collect",
        SyncForgedCollect => "sync_forged_collect",
        SyncCollectsNotSound => "sync_collects_not_sound",
        SyncDroppedBoundValue => "sync_dropped_bound_value",
    }
    // What a correct replica can cause (it is ahead, behind, its clock differs, it asked for a
    // checkpoint just trimmed), what a client or this replica's own disk caused, and proofs that
    // failed against a view this replica does not hold for them (`*InUnheldView`: made in an
    // older or newer view, they may be sound there).
    not_evidence {
        TooFarAhead => "too_far_ahead",
        FutureBufferFull => "future_buffer_full",
        FutureEpochBufferFull => "future_epoch_buffer_full",
        NotAMember => "not_a_member",
        MisdirectedStopdata => "misdirected_stopdata",
        StopdataWithoutLast => "stopdata_without_last",
        StopdataLastInUnheldView => "stopdata_last_in_unheld_view",
        DecisionInUnheldView => "decision_in_unheld_view",
        SyncInUnheldView => "sync_in_unheld_view",
        SyncCollectBeyondLast => "sync_collect_beyond_last",
        UnprovableDecision => "unprovable_decision",
        TimestampWentBackwards => "timestamp_went_backwards",
        TimestampInFuture => "timestamp_in_future",
        BadRequestSignature => "bad_request_signature",
        StaleRequest => "stale_request",
        SupersededSession => "superseded_session",
        ClientQueueFull => "client_queue_full",
        PoolFull => "pool_full",
        UnknownCheckpoint => "unknown_checkpoint",
        ChunkOutOfRange => "chunk_out_of_range",
        CheckpointUnreadable => "checkpoint_unreadable",
        CheckpointDigestMismatch => "checkpoint_digest_mismatch",
        UndecodableCheckpoint => "undecodable_checkpoint",
        DivergedCheckpoint => "diverged_checkpoint",
    }
}

impl Rejection {
    /// The variant with this label, for labels read back (from `/status` or metrics).
    pub fn from_label(label: &str) -> Option<Rejection> {
        Rejection::ALL.into_iter().find(|r| r.label() == label)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whether the rejection labelled `label` proves its sender faulty (an unknown label does not).
pub fn proves_misbehaviour(label: &str) -> bool {
    Rejection::from_label(label).is_some_and(Rejection::proves_misbehaviour)
}

#[cfg(test)]
mod tests {
    use super::{proves_misbehaviour, Rejection};

    #[test]
    fn only_what_a_correct_replica_never_sends_is_evidence() {
        assert!(proves_misbehaviour("forged_accept"));
        assert!(proves_misbehaviour("equivocating_propose"));
        // A correct replica ahead of this one, or asking for a checkpoint just trimmed.
        assert!(!proves_misbehaviour("too_far_ahead"));
        assert!(!proves_misbehaviour("unknown_checkpoint"));
        assert!(!proves_misbehaviour("future_buffer_full"));
        // Proofs judged against a view that may not be theirs: a joiner shown the SYNC of a
        // regency installed views ago, a laggard sent decisions of a view it has not reached.
        assert!(!proves_misbehaviour("sync_in_unheld_view"));
        assert!(!proves_misbehaviour("decision_in_unheld_view"));
        assert!(!proves_misbehaviour("stopdata_last_in_unheld_view"));
    }

    #[test]
    fn labels_are_distinct_snake_case_and_read_back_to_their_variant() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Rejection::ALL {
            let l = r.label();
            assert!(seen.insert(l), "{l} labels two variants");
            assert!(
                !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{l}"
            );
            assert_eq!(Rejection::from_label(l), Some(r));
            assert_eq!(r.to_string(), l);
        }
        assert_eq!(Rejection::from_label("no_such_reason"), None);
        assert!(!proves_misbehaviour("no_such_reason"));
    }

    #[test]
    fn twenty_one_kinds_of_evidence() {
        let evidence = Rejection::ALL
            .iter()
            .filter(|r| r.proves_misbehaviour())
            .count();
        assert_eq!(evidence, 21);
    }
}
