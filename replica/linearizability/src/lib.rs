//! Linearizability checking of client histories against the KV store's single-key semantics.
//!
//! This module owns the checker the simulator runs over the operations its clients issued: each
//! with an invocation time, a completion time if the client saw one, the [`KvRequest`] and its
//! [`KvResponse`]. It supports single-key gets, puts, deletes and single-key transactions (for
//! example [`KvRequest::cas`]); histories are split by key (linearizability is compositional, so
//! each key is checked on its own) and each key is searched with the Wing & Gong algorithm as
//! improved by Lowe: linearize some operation whose invocation precedes every pending return,
//! backtrack on a dead end, and never revisit a (set of linearized operations, model state) pair.
//!
//! What is compared: values, found/not-found, per-key versions, deleted counts and transaction
//! outcomes. Revisions are not: they are global across keys, and per-key checking cannot predict
//! them. An operation without a completion (or without a response) may or may not have taken
//! effect, at any point after its invocation. A reply that is a [`KvResponse::Error`] is taken to
//! mean the request had no effect (that is the store's contract), so it is left out.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use kmmr_protocol::service::kv::{
    CompareResult, CompareTarget, KvRequest, KvResponse, PutResponse, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, NO_LEASE,
};

/// One client operation as the simulator observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub client: u64,
    pub invoke: u64,
    /// When the client received the reply; `None` if it never did (outcome unknown).
    pub complete: Option<u64>,
    pub request: KvRequest,
    pub response: Option<KvResponse>,
}

/// A history no order of the operations explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: Vec<u8>,
    /// Indices into the checked history of the operations the explanation names.
    pub operations: Vec<usize>,
    pub explanation: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    NotLinearizable(Violation),
    /// The search hit its step budget on `key` before reaching a verdict.
    Unknown {
        key: Vec<u8>,
        steps: u64,
    },
    /// The history holds an operation the checker does not model (multi-key ranges, leases,
    /// revision comparisons against nonzero revisions, ...) or is malformed.
    Unsupported {
        operation: usize,
        reason: String,
    },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable)
    }
}

/// Search steps allowed per key by [`check`].
pub const DEFAULT_MAX_STEPS: u64 = 1_000_000;

/// Checks a history with [`DEFAULT_MAX_STEPS`] per key.
pub fn check(history: &[Operation]) -> CheckResult {
    check_with_budget(history, DEFAULT_MAX_STEPS)
}

/// Checks a history, spending at most `max_steps` search steps on each key. Keys are checked in
/// key order; the first violation found is reported.
pub fn check_with_budget(history: &[Operation], max_steps: u64) -> CheckResult {
    let mut by_key: BTreeMap<Vec<u8>, Vec<Entry>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        let (key, spec) = match classify(&op.request) {
            Ok(x) => x,
            Err(reason) => {
                return CheckResult::Unsupported {
                    operation: index,
                    reason,
                }
            }
        };
        let outcome = match (op.complete, &op.response) {
            (Some(done), Some(resp)) => {
                if done < op.invoke {
                    return CheckResult::Unsupported {
                        operation: index,
                        reason: "completed before it was invoked".into(),
                    };
                }
                if resp.error().is_some() {
                    continue;
                }
                match normalize(resp) {
                    Some(out) => Some((done, out)),
                    None => {
                        return CheckResult::Unsupported {
                            operation: index,
                            reason: format!("reply {resp:?} does not answer the request"),
                        }
                    }
                }
            }
            _ => None,
        };
        // A read that may or may not have happened constrains nothing.
        if outcome.is_none() && !spec.may_write() {
            continue;
        }
        by_key.entry(key).or_default().push(Entry {
            index,
            op: op.clone(),
            spec,
            outcome,
        });
    }
    for (key, entries) in by_key {
        match search(&key, &entries, max_steps) {
            CheckResult::Linearizable => {}
            other => return other,
        }
    }
    CheckResult::Linearizable
}

/// Per-key model state: the value and version of the key, if it exists.
type State = Option<(Vec<u8>, u64)>;

#[derive(Debug, Clone)]
enum Single {
    Put { value: Vec<u8>, prev_kv: bool },
    Get { keys_only: bool, count_only: bool },
    Delete { prev_kv: bool },
}

#[derive(Debug, Clone)]
enum Cond {
    Value(CompareResult, Vec<u8>),
    Version(CompareResult, u64),
    /// A create/mod revision or lease compared against a constant the model can evaluate
    /// without knowing revisions: the field reads 0 when the key is missing and a positive
    /// revision otherwise (or, for leases, always 0, since leased puts are unsupported).
    Exists {
        result: CompareResult,
        operand: i128,
        lease: bool,
    },
}

/// Every supported request as a transaction: plain requests have no conditions and one op.
#[derive(Debug, Clone)]
struct Spec {
    plain: bool,
    conds: Vec<Cond>,
    success: Vec<Single>,
    failure: Vec<Single>,
}

impl Spec {
    fn may_write(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .any(|s| !matches!(s, Single::Get { .. }))
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    succeeded: bool,
    results: Vec<ResponseOp>,
}

struct Entry {
    index: usize,
    op: Operation,
    spec: Spec,
    outcome: Option<(u64, Outcome)>,
}

fn classify(req: &KvRequest) -> Result<(Vec<u8>, Spec), String> {
    let plain = |key: &[u8], single| {
        Ok((
            key.to_vec(),
            Spec {
                plain: true,
                conds: vec![],
                success: vec![single],
                failure: vec![],
            },
        ))
    };
    match req {
        KvRequest::Put(_) | KvRequest::Range(_) | KvRequest::DeleteRange(_) => {
            let op = match req {
                KvRequest::Put(p) => RequestOp::Put(p.clone()),
                KvRequest::Range(r) => RequestOp::Range(r.clone()),
                KvRequest::DeleteRange(d) => RequestOp::DeleteRange(d.clone()),
                _ => return Err("unreachable".into()),
            };
            let (key, single) = classify_op(&op)?;
            plain(&key, single)
        }
        KvRequest::Txn(t) => classify_txn(t),
        other => Err(format!("{other:?} is not a single-key KV operation")),
    }
}

fn classify_op(op: &RequestOp) -> Result<(Vec<u8>, Single), String> {
    match op {
        RequestOp::Put(p) if p.lease == NO_LEASE => Ok((
            p.key.clone(),
            Single::Put {
                value: p.value.clone(),
                prev_kv: p.prev_kv,
            },
        )),
        RequestOp::Put(_) => Err("puts with a lease are not modelled".into()),
        RequestOp::Range(r) if r.range_end.is_empty() && r.revision == 0 => Ok((
            r.key.clone(),
            Single::Get {
                keys_only: r.keys_only,
                count_only: r.count_only,
            },
        )),
        RequestOp::Range(_) => Err("only single-key reads at the latest revision".into()),
        RequestOp::DeleteRange(d) if d.range_end.is_empty() => {
            Ok((d.key.clone(), Single::Delete { prev_kv: d.prev_kv }))
        }
        RequestOp::DeleteRange(_) => Err("only single-key deletes".into()),
    }
}

fn classify_txn(t: &TxnRequest) -> Result<(Vec<u8>, Spec), String> {
    let mut key: Option<Vec<u8>> = None;
    let mut same_key = |k: &[u8]| match &key {
        None => {
            key = Some(k.to_vec());
            Ok(())
        }
        Some(existing) if existing == k => Ok(()),
        Some(_) => Err("transaction touches several keys".to_string()),
    };
    let mut conds = Vec::new();
    for c in &t.compare {
        if !c.range_end.is_empty() {
            return Err("range comparisons are not modelled".into());
        }
        same_key(&c.key)?;
        conds.push(match &c.target {
            CompareTarget::Value(v) => Cond::Value(c.result, v.clone()),
            CompareTarget::Version(v) => Cond::Version(c.result, *v),
            CompareTarget::CreateRevision(0) | CompareTarget::ModRevision(0) => Cond::Exists {
                result: c.result,
                operand: 0,
                lease: false,
            },
            CompareTarget::Lease(l) => Cond::Exists {
                result: c.result,
                operand: i128::from(*l),
                lease: true,
            },
            _ => return Err("revision comparisons against nonzero revisions".into()),
        });
    }
    let mut branch = |ops: &[RequestOp]| -> Result<Vec<Single>, String> {
        ops.iter()
            .map(|op| {
                let (k, s) = classify_op(op)?;
                same_key(&k)?;
                Ok(s)
            })
            .collect()
    };
    let success = branch(&t.success)?;
    let failure = branch(&t.failure)?;
    let key = key.ok_or("transaction names no key")?;
    Ok((
        key,
        Spec {
            plain: false,
            conds,
            success,
            failure,
        },
    ))
}

fn normalize(resp: &KvResponse) -> Option<Outcome> {
    let one = |r| {
        Some(Outcome {
            succeeded: true,
            results: vec![r],
        })
    };
    match resp {
        KvResponse::Put(p) => one(ResponseOp::Put(p.clone())),
        KvResponse::Range(r) => one(ResponseOp::Range(r.clone())),
        KvResponse::DeleteRange(d) => one(ResponseOp::DeleteRange(d.clone())),
        KvResponse::Txn(t) => Some(Outcome {
            succeeded: t.succeeded,
            results: t.responses.clone(),
        }),
        _ => None,
    }
}

fn holds(c: &Cond, s: &State) -> bool {
    use std::cmp::Ordering;
    let test = |ord: Ordering, r: CompareResult| match r {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::Greater => ord == Ordering::Greater,
    };
    match c {
        // etcd: a value comparison on a missing key is false whatever the operator.
        Cond::Value(r, v) => s.as_ref().is_some_and(|(cur, _)| test(cur.cmp(v), *r)),
        Cond::Version(r, v) => test(s.as_ref().map_or(0, |(_, ver)| *ver).cmp(v), *r),
        Cond::Exists {
            result,
            operand,
            lease,
        } => {
            // A present key's revision is some positive number: only comparisons against 0
            // (or a negative number) are decided by presence alone, which classify ensures for
            // revisions. Leases are always 0 here.
            let field: i128 = if *lease || s.is_none() { 0 } else { 1 };
            if !*lease && s.is_some() && *operand != 0 {
                return false;
            }
            test(field.cmp(operand), *result)
        }
    }
}

fn show(s: &State) -> String {
    match s {
        None => "absent".into(),
        Some((v, ver)) => format!("\"{}\" (version {ver})", v.escape_ascii()),
    }
}

fn check_prev(
    prev: Option<&kmmr_protocol::service::kv::KeyValue>,
    s: &State,
) -> Result<(), String> {
    let got: State = prev.map(|kv| (kv.value.clone(), kv.version));
    if &got == s {
        Ok(())
    } else {
        Err(format!(
            "returned previous record {} but the key was {}",
            show(&got),
            show(s)
        ))
    }
}

/// Applies an operation to the model; with an outcome, also checks the outcome is what the model
/// would have replied, explaining the mismatch if not.
fn step(state: &State, spec: &Spec, out: Option<&Outcome>) -> Result<State, String> {
    let succeeded = spec.conds.iter().all(|c| holds(c, state));
    let branch = if succeeded {
        &spec.success
    } else {
        &spec.failure
    };
    if let Some(o) = out {
        if o.succeeded != succeeded {
            return Err(format!(
                "replied that its comparisons {} but on {} they {}",
                if o.succeeded { "held" } else { "failed" },
                show(state),
                if succeeded { "hold" } else { "fail" }
            ));
        }
        if o.results.len() != branch.len() {
            return Err("replied with the wrong number of results".into());
        }
    }
    let mut s = state.clone();
    for (i, single) in branch.iter().enumerate() {
        let r = out.and_then(|o| o.results.get(i));
        match single {
            Single::Put { value, prev_kv } => {
                if let Some(r) = r {
                    let ResponseOp::Put(PutResponse { prev_kv: prev, .. }) = r else {
                        return Err("a put got a reply that is not a put reply".into());
                    };
                    if *prev_kv {
                        check_prev(prev.as_ref(), &s)?;
                    }
                }
                let version = s.as_ref().map_or(0, |(_, v)| *v) + 1;
                s = Some((value.clone(), version));
            }
            Single::Get {
                keys_only,
                count_only,
            } => {
                let Some(r) = r else { continue };
                let ResponseOp::Range(RangeResponse { kvs, count, .. }) = r else {
                    return Err("a get got a reply that is not a range reply".into());
                };
                let expected_count = u64::from(s.is_some());
                if *count != expected_count {
                    return Err(format!("counted {count} keys but the key was {}", show(&s)));
                }
                let got: Option<State> = match kvs.as_slice() {
                    [] => Some(None),
                    [kv] => Some(Some((kv.value.clone(), kv.version))),
                    _ => None,
                };
                let expected = if *count_only {
                    None
                } else if *keys_only {
                    s.as_ref().map(|(_, ver)| (Vec::new(), *ver))
                } else {
                    s.clone()
                };
                if got.as_ref() != Some(&expected) {
                    return Err(format!(
                        "read {} but the key was {}",
                        got.map_or_else(|| "several records".into(), |g| show(&g)),
                        show(&s)
                    ));
                }
            }
            Single::Delete { prev_kv } => {
                if let Some(r) = r {
                    let ResponseOp::DeleteRange(d) = r else {
                        return Err("a delete got a reply that is not a delete reply".into());
                    };
                    if d.deleted != u64::from(s.is_some()) {
                        return Err(format!(
                            "deleted {} keys but the key was {}",
                            d.deleted,
                            show(&s)
                        ));
                    }
                    if *prev_kv {
                        check_prev(d.prev_kvs.first(), &s)?;
                    }
                }
                s = None;
            }
        }
    }
    Ok(s)
}

fn show_request_op(op: &RequestOp) -> String {
    match op {
        RequestOp::Put(p) => format!(
            "put(\"{}\", \"{}\")",
            p.key.escape_ascii(),
            p.value.escape_ascii()
        ),
        RequestOp::Range(r) => format!("get(\"{}\")", r.key.escape_ascii()),
        RequestOp::DeleteRange(d) => format!("delete(\"{}\")", d.key.escape_ascii()),
    }
}

fn show_compare(c: &kmmr_protocol::service::kv::Compare) -> String {
    let (field, operand) = match &c.target {
        CompareTarget::Value(v) => ("value", format!("\"{}\"", v.escape_ascii())),
        CompareTarget::Version(v) => ("version", v.to_string()),
        CompareTarget::CreateRevision(v) => ("create_revision", v.to_string()),
        CompareTarget::ModRevision(v) => ("mod_revision", v.to_string()),
        CompareTarget::Lease(v) => ("lease", v.to_string()),
    };
    let rel = match c.result {
        CompareResult::Equal => "==",
        CompareResult::NotEqual => "!=",
        CompareResult::Less => "<",
        CompareResult::Greater => ">",
    };
    format!("{field}(\"{}\") {rel} {operand}", c.key.escape_ascii())
}

fn show_result(r: &ResponseOp) -> String {
    match r {
        ResponseOp::Range(r) => match r.kvs.first() {
            Some(kv) => format!(
                "found \"{}\" (version {})",
                kv.value.escape_ascii(),
                kv.version
            ),
            None => format!("not found (count {})", r.count),
        },
        ResponseOp::DeleteRange(d) => format!("deleted {}", d.deleted),
        ResponseOp::Put(_) => "ok".into(),
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn describe(e: &Entry) -> String {
    let op = &e.op;
    let req = match &op.request {
        KvRequest::Put(p) => show_request_op(&RequestOp::Put(p.clone())),
        KvRequest::Range(r) => show_request_op(&RequestOp::Range(r.clone())),
        KvRequest::DeleteRange(d) => show_request_op(&RequestOp::DeleteRange(d.clone())),
        KvRequest::Txn(t) => format!(
            "txn(if [{}] then [{}] else [{}])",
            join(t.compare.iter().map(show_compare)),
            join(t.success.iter().map(show_request_op)),
            join(t.failure.iter().map(show_request_op)),
        ),
        other => format!("{other:?}"),
    };
    let out = match &e.outcome {
        None => "no reply (outcome unknown)".to_string(),
        Some((_, o)) if e.spec.plain => join(o.results.iter().map(show_result)),
        Some((_, o)) => format!(
            "{} [{}]",
            if o.succeeded { "succeeded" } else { "failed" },
            join(o.results.iter().map(show_result))
        ),
    };
    let done = op
        .complete
        .filter(|_| e.outcome.is_some())
        .map_or("never".to_string(), |t| t.to_string());
    format!(
        "#{} client {} [invoked {}, completed {}] {} -> {}",
        e.index, op.client, op.invoke, done, req, out
    )
}

/// Nodes of the event list: calls and returns in time order, unlinked as operations are
/// linearized (dancing links, so backtracking restores them in O(1)).
struct Events {
    /// For node `i`: the operation (index into the entries) and whether it is the call.
    op: Vec<usize>,
    is_call: Vec<bool>,
    partner: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
    tail: usize,
}

impl Events {
    fn new(entries: &[Entry]) -> Self {
        // (time, returns after calls at equal times so touching operations count as
        // concurrent, entry index).
        let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(entries.len() * 2);
        for (i, e) in entries.iter().enumerate() {
            order.push((e.op.invoke, 0, i));
            order.push((e.outcome.as_ref().map_or(u64::MAX, |(t, _)| *t), 1, i));
        }
        order.sort_unstable();
        let n = order.len();
        let (head, tail) = (n, n + 1);
        let mut ev = Events {
            op: vec![0; n],
            is_call: vec![false; n],
            partner: vec![0; n],
            next: vec![0; n + 2],
            prev: vec![0; n + 2],
            head,
            tail,
        };
        let mut call_node = vec![0; entries.len()];
        for (node, &(_, kind, i)) in order.iter().enumerate() {
            ev.op[node] = i;
            ev.is_call[node] = kind == 0;
            if kind == 0 {
                call_node[i] = node;
            } else {
                ev.partner[call_node[i]] = node;
                ev.partner[node] = call_node[i];
            }
        }
        let mut last = head;
        for node in 0..n {
            ev.next[last] = node;
            ev.prev[node] = last;
            last = node;
        }
        ev.next[last] = tail;
        ev.prev[tail] = last;
        ev
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        self.prev[n] = node;
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.partner[call]);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(self.partner[call]);
        self.relink(call);
    }
}

struct Deepest {
    depth: usize,
    linearized: Vec<usize>,
    state: State,
    blocked: usize,
    reason: String,
}

fn search(key: &[u8], entries: &[Entry], max_steps: u64) -> CheckResult {
    let mut ev = Events::new(entries);
    let words = entries.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: State = None;
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut deepest: Option<Deepest> = None;
    let mut node = ev.next[ev.head];
    let mut steps = 0u64;
    while ev.next[ev.head] != ev.tail {
        steps += 1;
        if steps > max_steps {
            return CheckResult::Unknown {
                key: key.to_vec(),
                steps: max_steps,
            };
        }
        // The list always ends in a return, so the walk meets a dead end before the tail; the
        // tail check only keeps indexing total.
        let op = if node < ev.op.len() { ev.op[node] } else { 0 };
        if node < ev.op.len() && ev.is_call[node] {
            let e = &entries[op];
            if let Ok(next_state) = step(&state, &e.spec, e.outcome.as_ref().map(|(_, o)| o)) {
                let mut with = linearized.clone();
                with[op / 64] |= 1 << (op % 64);
                if seen.insert((with.clone(), next_state.clone())) {
                    stack.push((node, std::mem::replace(&mut state, next_state)));
                    linearized = with;
                    ev.lift(node);
                    node = ev.next[ev.head];
                    continue;
                }
            }
            node = ev.next[node];
            continue;
        }
        // A return whose operation is not linearized yet (or the end): dead end.
        if deepest.as_ref().is_none_or(|d| stack.len() > d.depth) {
            let blocked = op;
            let e = &entries[blocked];
            let reason = match step(&state, &e.spec, e.outcome.as_ref().map(|(_, o)| o)) {
                Err(r) => r,
                Ok(_) => "it fits here, but every continuation after it fails".into(),
            };
            deepest = Some(Deepest {
                depth: stack.len(),
                linearized: stack.iter().map(|(n, _)| ev.op[*n]).collect(),
                state: state.clone(),
                blocked,
                reason,
            });
        }
        let Some((call, prev_state)) = stack.pop() else {
            return CheckResult::NotLinearizable(explain(key, entries, deepest));
        };
        state = prev_state;
        let undone = ev.op[call];
        linearized[undone / 64] &= !(1 << (undone % 64));
        ev.unlift(call);
        node = ev.next[call];
    }
    CheckResult::Linearizable
}

fn explain(key: &[u8], entries: &[Entry], deepest: Option<Deepest>) -> Violation {
    let mut text = format!(
        "key \"{}\": no order of its {} operations is consistent with their real-time order and replies.\n",
        key.escape_ascii(),
        entries.len()
    );
    let mut operations = Vec::new();
    if let Some(d) = deepest {
        let _ = writeln!(
            text,
            "Longest consistent prefix ({} operations), leaving the key {}:",
            d.linearized.len(),
            show(&d.state)
        );
        for &i in &d.linearized {
            let _ = writeln!(text, "  {}", describe(&entries[i]));
            operations.push(entries[i].index);
        }
        let b = &entries[d.blocked];
        let _ = write!(
            text,
            "then {} must take effect before it completes, but {}",
            describe(b),
            d.reason
        );
        operations.push(b.index);
    }
    Violation {
        key: key.to_vec(),
        operations,
        explanation: text,
    }
}

#[cfg(test)]
mod tests;
