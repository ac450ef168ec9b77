//! Reconfiguration: view changes signed by the admin key and ordered like any request.
//!
//! A request names the view it applies to. It is executed only while that view is current, so
//! once a change is installed every other request signed for the old view (a replay, or a second
//! change prepared concurrently) is refused: one change at a time, and the view id is the nonce.
//! Every correct replica executes the same requests in the same order, so they all install the
//! same view at the same CID.

use crate::view::{default_f, Member, View};
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::{ReplicaId, ViewId};
use crate::wire::limits;

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// Add a replica. `f` is the fault threshold of the new view; `None` keeps the current f
    /// (the largest the new n tolerates, if the current one no longer fits).
    Add { member: Member, f: Option<u32> },
    /// Remove a replica; `f` as for `Add`.
    Remove { id: ReplicaId, f: Option<u32> },
    /// Keep the members, change f.
    SetF { f: u32 },
}

/// The payload of a `RequestKind::Reconfig` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconfigRequest {
    /// The view this change applies to.
    pub view: ViewId,
    pub change: ViewChange,
}

/// What every replica answers to a reconfiguration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconfigOutcome {
    /// The change is installed: this is the new view.
    Installed(View),
    /// The change was refused; the view is unchanged.
    Refused(String),
}

impl Encode for ViewChange {
    fn encode(&self, w: &mut Writer) {
        match self {
            ViewChange::Add { member, f } => {
                w.u8(1);
                member.encode(w);
                w.option(f.as_ref(), |w, f| {
                    w.u32(*f);
                });
            }
            ViewChange::Remove { id, f } => {
                w.u8(2);
                id.encode(w);
                w.option(f.as_ref(), |w, f| {
                    w.u32(*f);
                });
            }
            ViewChange::SetF { f } => {
                w.u8(3);
                w.u32(*f);
            }
        }
    }
}

impl Decode for ViewChange {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => ViewChange::Add {
                member: Member::decode(r)?,
                f: r.option(|r| r.u32())?,
            },
            2 => ViewChange::Remove {
                id: ReplicaId::decode(r)?,
                f: r.option(|r| r.u32())?,
            },
            3 => ViewChange::SetF { f: r.u32()? },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "view change",
                    tag,
                })
            }
        })
    }
}

impl Encode for ReconfigRequest {
    fn encode(&self, w: &mut Writer) {
        self.view.encode(w);
        self.change.encode(w);
    }
}

impl Decode for ReconfigRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ReconfigRequest {
            view: ViewId::decode(r)?,
            change: ViewChange::decode(r)?,
        })
    }
}

impl Encode for ReconfigOutcome {
    fn encode(&self, w: &mut Writer) {
        match self {
            ReconfigOutcome::Installed(v) => {
                w.u8(1);
                v.encode(w);
            }
            ReconfigOutcome::Refused(why) => {
                w.u8(2);
                w.bytes(why.as_bytes());
            }
        }
    }
}

impl Decode for ReconfigOutcome {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => ReconfigOutcome::Installed(View::decode(r)?),
            2 => ReconfigOutcome::Refused(
                std::str::from_utf8(r.bytes("refusal", 1024)?)
                    .map_err(|_| DecodeError::Invalid("refusal is not UTF-8"))?
                    .to_owned(),
            ),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "reconfiguration outcome",
                    tag,
                })
            }
        })
    }
}

/// The view that `req` turns `view` into, or why it cannot.
pub fn apply(view: &View, req: &ReconfigRequest) -> Result<View, String> {
    if req.view != view.id {
        return Err(format!(
            "the request was signed for view {} but the current view is {}: fetch the view and sign again",
            req.view.0, view.id.0
        ));
    }
    let next_id = ViewId(
        view.id
            .0
            .checked_add(1)
            .ok_or_else(|| "the view id is exhausted".to_string())?,
    );
    let (members, f) = match &req.change {
        ViewChange::Add { member, f } => {
            if view.contains(member.id) {
                return Err(format!("replica {} is already a member", member.id.0));
            }
            if view.members.iter().any(|m| m.key == member.key) {
                return Err(format!(
                    "the key of replica {} is already used by another member",
                    member.id.0
                ));
            }
            if member.address.is_empty() || member.address.len() > limits::MAX_ADDRESS {
                return Err("the new replica's address is empty or too long".into());
            }
            let mut m = view.members.clone();
            m.push(member.clone());
            let n = m.len();
            (
                m,
                f.map_or_else(|| view.f.min(default_f(n)), |f| f as usize),
            )
        }
        ViewChange::Remove { id, f } => {
            if !view.contains(*id) {
                return Err(format!("replica {} is not a member", id.0));
            }
            let m: Vec<Member> = view
                .members
                .iter()
                .filter(|m| m.id != *id)
                .cloned()
                .collect();
            let n = m.len();
            (
                m,
                f.map_or_else(|| view.f.min(default_f(n)), |f| f as usize),
            )
        }
        ViewChange::SetF { f } => (view.members.clone(), *f as usize),
    };
    let n = members.len();
    if n < 3 * f + 1 {
        return Err(format!(
            "the new view would have n={n} replicas for f={f}: BFT needs n >= 3f+1"
        ));
    }
    if f == 0 && view.f > 0 {
        return Err("the new view would tolerate no fault (f=0): refused".into());
    }
    View::new(next_id, f, members)
        .map(|v| v.with_admin(view.admin))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PublicKey;

    fn member(i: u32) -> Member {
        Member {
            id: ReplicaId(i),
            address: format!("127.0.0.1:{}", 7000 + i),
            key: PublicKey([i as u8 + 1; 32]),
        }
    }

    fn view(n: u32) -> View {
        View::new(
            ViewId(5),
            default_f(n as usize),
            (0..n).map(member).collect(),
        )
        .unwrap()
        .with_admin(Some(PublicKey([0xad; 32])))
    }

    #[test]
    fn add_keeps_f_and_increments_the_view() {
        let v = view(4);
        let req = ReconfigRequest {
            view: ViewId(5),
            change: ViewChange::Add {
                member: member(4),
                f: None,
            },
        };
        let next = apply(&v, &req).unwrap();
        assert_eq!(next.id, ViewId(6));
        assert_eq!(next.n(), 5);
        assert_eq!(next.f, 1);
        assert_eq!(next.admin, v.admin);
        // The same signed request cannot apply twice.
        assert!(apply(&next, &req)
            .unwrap_err()
            .contains("signed for view 5"));
    }

    #[test]
    fn remove_lowers_f_only_when_it_must() {
        let v = view(7);
        let next = apply(
            &v,
            &ReconfigRequest {
                view: ViewId(5),
                change: ViewChange::Remove {
                    id: ReplicaId(0),
                    f: None,
                },
            },
        )
        .unwrap();
        assert_eq!((next.n(), next.f), (6, 1));
        assert!(!next.contains(ReplicaId(0)));
    }

    #[test]
    fn refusals_say_why() {
        let v = view(4);
        let r = |change| {
            apply(
                &v,
                &ReconfigRequest {
                    view: ViewId(5),
                    change,
                },
            )
        };
        assert!(r(ViewChange::Add {
            member: member(1),
            f: None
        })
        .unwrap_err()
        .contains("already a member"));
        assert!(r(ViewChange::Remove {
            id: ReplicaId(9),
            f: None
        })
        .unwrap_err()
        .contains("not a member"));
        assert!(r(ViewChange::SetF { f: 2 })
            .unwrap_err()
            .contains("n >= 3f+1"));
        assert!(r(ViewChange::Remove {
            id: ReplicaId(0),
            f: None
        })
        .unwrap_err()
        .contains("f=0"));
    }

    #[test]
    fn codec_round_trips() {
        let req = ReconfigRequest {
            view: ViewId(3),
            change: ViewChange::Add {
                member: member(9),
                f: Some(2),
            },
        };
        assert_eq!(ReconfigRequest::from_bytes(&req.to_bytes()).unwrap(), req);
        let out = ReconfigOutcome::Installed(view(4));
        assert_eq!(ReconfigOutcome::from_bytes(&out.to_bytes()).unwrap(), out);
    }
}
