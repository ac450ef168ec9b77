//! Replies leave only from a state this replica cannot lose in a crash. A reply counts toward
//! a client's quorum; from a replica that then came back without the decisions behind it, that
//! quorum would not hold the write, and an unordered read could gather a quorum of answers from
//! before it (soak seed 800363 n=4: a write acknowledged by r0, r1 and a twin, then read as
//! absent from r0 restarted, a lagging r2 and the other twin).
//!
//! A state is kept once the log holds its decision durably (`log_durable`), or once a promise at
//! its instance or a later one is on disk: a restarted replica answers no unordered read before
//! it decides the instance of the promise it finds (`read_fence`), and the promise is written
//! before any output after it leaves. In the common case the replica promised its ACCEPT before
//! deciding, so the reply leaves at once and the log's fsync stays off the request's path.

use super::*;

impl Replica {
    /// The driver's log (or checkpoint store) holds every decision up to `cid` durably:
    /// replies computed from states up to it may leave.
    pub fn log_durable(&mut self, cid: Option<Cid>) {
        if cid <= self.durable {
            return;
        }
        self.durable = cid;
        self.release_replies(cid);
    }

    /// The oldest state this replica answers from now: its own, or after a restart the one
    /// its disk held or its last promise was about (`read_fence`), whichever is newer.
    pub fn answers_from(&self) -> Option<Cid> {
        self.last_decided.max(self.read_fence)
    }

    /// A promise at `cid` went into the outputs: replies queued after it leave after it is on
    /// disk, so those from states up to `cid` need no log.
    pub(super) fn promised_at(&mut self, cid: Cid) {
        self.release_replies(Some(cid));
    }

    /// The newest state whose replies may leave now.
    fn kept_up_to(&self) -> Option<Cid> {
        self.durable.max(self.promised.map(|k| k.cid))
    }

    fn release_replies(&mut self, upto: Option<Cid>) {
        if self.held_replies.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held_replies);
        let (ready, still): (Vec<_>, Vec<_>) = held.into_iter().partition(|(at, _)| *at <= upto);
        self.held_replies = still;
        self.outputs.extend(ready.into_iter().map(|(_, out)| out));
    }

    /// Sends a reply computed from the state after `at`, once that state is kept.
    pub(super) fn reply(&mut self, at: Option<Cid>, client: ClientId, reply: Reply) {
        let out = Output::Reply {
            client,
            reply,
            from: at,
        };
        if self.config.persist && at > self.kept_up_to() {
            self.held_replies.push((at, out));
        } else {
            self.outputs.push(out);
        }
    }
}
