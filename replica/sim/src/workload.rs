//! Simulated clients: closed-loop sessions, with one operation or a window of them in flight,
//! issuing key-value operations over a few keys, whose observed histories are checked for
//! linearizability (the checker orders operations by their times alone, so overlapping ones of
//! one client are fine).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ServiceKind;
use kmmr_client::session::{ClientSession, Completion};
use kmmr_linearizability::Operation;
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::{KvRequest, KvResponse, RangeResponse, ResponseOp};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::messages::RequestKind;

pub struct SimClient {
    pub index: usize,
    pub session: ClientSession,
    /// Operations issued so far, and the bounds: at least `min_ops`, and more while the
    /// network is still unstable (before GST), up to `max_ops`.
    issued: usize,
    min_ops: usize,
    max_ops: usize,
    /// The sequence numbers in flight, each with its entry in `history`.
    current: BTreeMap<u64, usize>,
    /// How many operations may be in flight at once.
    window: usize,
    rng: ChaCha8Rng,
    keys: usize,
    payload_bytes: usize,
    service: ServiceKind,
    /// Values this client last saw per key, for compare-and-swap expectations.
    seen: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    counter: u64,
    pub history: Vec<Operation>,
    pub completed: usize,
    unordered_reads: bool,
}

impl SimClient {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        seed: u64,
        view: View,
        ops: usize,
        keys: usize,
        payload_bytes: usize,
        service: ServiceKind,
        retransmit_us: u64,
        unordered_reads: bool,
        window: usize,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0xC11E_u64 << 32) ^ index as u64);
        let key = KeyPair::from_seed(rng.gen());
        let mut session = ClientSession::new(key, 1, view, retransmit_us);
        session.set_quorum_writes(unordered_reads);
        SimClient {
            index,
            unordered_reads,
            session,
            issued: 0,
            min_ops: ops,
            max_ops: ops * 6,
            current: BTreeMap::new(),
            window: window.max(1),
            rng,
            keys: keys.max(1),
            payload_bytes,
            service,
            seen: BTreeMap::new(),
            counter: 0,
            history: Vec::new(),
            completed: 0,
        }
    }

    fn wants_more(&self, now: u64, gst_us: u64) -> bool {
        self.issued < self.min_ops || (now < gst_us && self.issued < self.max_ops)
    }

    /// Finished: nothing in flight and nothing more to issue.
    pub fn done(&self, now: u64, gst_us: u64) -> bool {
        self.current.is_empty() && !self.wants_more(now, gst_us)
    }

    pub fn issued(&self) -> usize {
        self.issued
    }

    /// Issues operations while the client wants more and its window has room.
    pub fn start_next(&mut self, now: u64, gst_us: u64) {
        while self.current.len() < self.window && self.wants_more(now, gst_us) {
            self.issue_one(now);
        }
    }

    fn issue_one(&mut self, now: u64) {
        self.issued += 1;
        let (payload, request) = match self.service {
            ServiceKind::Noop => (vec![0u8; self.payload_bytes], None),
            ServiceKind::Kv => {
                let req = self.next_kv_request();
                (req.to_bytes(), Some(req))
            }
        };
        let read = matches!(request, Some(KvRequest::Range(_)));
        let kind = if read && self.unordered_reads {
            RequestKind::Unordered
        } else {
            RequestKind::Ordered
        };
        let seq = self.session.invoke(now, kind, payload);
        let idx = self.history.len();
        if let Some(request) = request {
            self.history.push(Operation {
                client: self.index as u64,
                invoke: now,
                complete: None,
                request,
                response: None,
            });
        }
        self.current.insert(seq, idx);
    }

    fn next_kv_request(&mut self) -> KvRequest {
        let key = format!("k{}", self.rng.gen_range(0..self.keys)).into_bytes();
        self.counter += 1;
        let value = format!("c{}-{}", self.index, self.counter).into_bytes();
        match self.rng.gen_range(0..100) {
            0..=39 => KvRequest::put(key, value),
            40..=69 => KvRequest::get(key),
            70..=84 => KvRequest::delete(key),
            _ => {
                let expected = self.seen.get(&key).cloned().flatten();
                KvRequest::cas(key, expected.as_deref(), value)
            }
        }
    }

    /// Records a completion; returns an error if the client accepted something impossible.
    pub fn complete(&mut self, now: u64, c: Completion) -> Result<(), String> {
        let Some(idx) = self.current.remove(&c.sequence) else {
            return Ok(());
        };
        self.completed += 1;
        let bytes = c
            .result
            .map_err(|e| format!("client {} got an error it cannot retry: {e:?}", self.index))?;
        if self.service == ServiceKind::Noop {
            return Ok(());
        }
        let resp = KvResponse::from_bytes(&bytes).map_err(|e| {
            format!(
                "client {} accepted an undecodable result from f+1 replicas: {e}",
                self.index
            )
        })?;
        let request = self.history.get(idx).map(|op| op.request.clone());
        if let Some(request) = request {
            self.learn(&request, &resp);
        }
        if let Some(op) = self.history.get_mut(idx) {
            op.complete = Some(now);
            op.response = Some(resp);
        }
        Ok(())
    }

    fn learn(&mut self, req: &KvRequest, resp: &KvResponse) {
        let key = match req {
            KvRequest::Range(r) => r.key.clone(),
            KvRequest::Put(p) => p.key.clone(),
            KvRequest::DeleteRange(d) => d.key.clone(),
            KvRequest::Txn(_) => return self.learn_txn(resp),
            _ => return,
        };
        match (req, resp) {
            (KvRequest::Range(_), KvResponse::Range(r)) => self.learn_range(key, r),
            (KvRequest::Put(p), KvResponse::Put(_)) => {
                self.seen.insert(key, Some(p.value.clone()));
            }
            (KvRequest::DeleteRange(_), KvResponse::DeleteRange(_)) => {
                self.seen.insert(key, None);
            }
            _ => {}
        }
    }

    fn learn_range(&mut self, key: Vec<u8>, r: &RangeResponse) {
        let v = r.kvs.first().map(|kv| kv.value.clone());
        self.seen.insert(key, v);
    }

    fn learn_txn(&mut self, resp: &KvResponse) {
        if let KvResponse::Txn(t) = resp {
            for op in &t.responses {
                if let ResponseOp::Range(r) = op {
                    if let Some(kv) = r.kvs.first() {
                        self.seen.insert(kv.key.clone(), Some(kv.value.clone()));
                    }
                }
            }
        }
    }
}
