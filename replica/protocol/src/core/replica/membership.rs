//! Reconfiguration as the ordered service sees it: an admin-signed view change executed in a
//! batch, and the new view installed after that batch.

use super::*;

/// The views around the current one: the view a batch being executed installed (it takes effect
/// after the batch), where the current view began, and the view before it, which proved the
/// decisions before that point.
#[derive(Default)]
pub(super) struct ViewHistory {
    /// A view installed by the batch being executed, taking effect after it.
    pub(super) pending_view: Option<View>,
    /// The first CID ordered in `view`, and the view before (which proved earlier decisions).
    pub(super) view_since: Cid,
    pub(super) previous_view: Option<View>,
}

impl ViewHistory {
    /// The view whose members proved the decision of `cid`, `current` being this replica's
    /// view now.
    pub(super) fn view_for<'a>(&'a self, current: &'a View, cid: Cid) -> &'a View {
        match &self.previous_view {
            Some(p) if cid < self.view_since => p,
            _ => current,
        }
    }
}

impl Replica {
    /// Executes a view change. It takes effect after the batch, so every request of the batch
    /// runs in the view that ordered it.
    pub(super) fn execute_reconfig(
        &mut self,
        client: &ClientId,
        payload: &[u8],
    ) -> ReconfigOutcome {
        let current = self.views.pending_view.as_ref().unwrap_or(&self.view);
        if current.admin.as_ref() != Some(client) {
            return ReconfigOutcome::Refused(
                "reconfiguration must be signed by the view's admin key".into(),
            );
        }
        let req = match ReconfigRequest::from_bytes(payload) {
            Ok(r) => r,
            Err(e) => return ReconfigOutcome::Refused(format!("malformed request: {e}")),
        };
        match reconfig::apply(current, &req) {
            Ok(v) => {
                self.views.pending_view = Some(v.clone());
                ReconfigOutcome::Installed(v)
            }
            Err(why) => ReconfigOutcome::Refused(why),
        }
    }

    pub(super) fn install_view(&mut self, cid: Cid, view: View) {
        let member = view.contains(self.me);
        self.events.push(Event::ViewInstalled {
            cid,
            view: view.id,
            n: view.n(),
            f: view.f,
            member,
        });
        self.stats.views_installed += 1;
        self.views.previous_view = Some(std::mem::replace(&mut self.view, view.clone()));
        self.views.view_since = cid.next();
        self.outputs.push(Output::ViewChanged(view));
        // Votes, buffered messages and proofs count only from members of the new view.
        let v = &self.view;
        for q in self.catchup.future.values_mut() {
            q.retain(|(from, _)| v.contains(*from));
        }
        self.catchup
            .future_epoch
            .retain(|(from, _)| v.contains(*from));
        self.catchup.decided_ahead.retain(|_, d| d.verify(v));
        self.lc
            .stop_votes
            .retain(|id, _| v.contains(*id) || *id == self.me);
        self.lc.stopdata.retain(|id, _| v.contains(*id));
        self.catchup.peer_progress.retain(|id, _| v.contains(*id));
        self.catchup.lost.retain(|id, _| v.contains(*id));
        self.catchup.helped.retain(|id, _| v.contains(*id));
        self.transfer.retain_members(v);
    }

    // ----- checkpoints and state transfer ----------------------------------------------------
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyPair;
    use crate::view::Member;

    fn view(id: u32) -> View {
        let members = (0..4)
            .map(|i| Member {
                id: ReplicaId(i),
                address: format!("r{i}:1"),
                key: KeyPair::from_seed([i as u8 + 1; 32]).public(),
            })
            .collect();
        View::new(ViewId(id), 1, members).expect("a valid view")
    }

    #[test]
    fn decisions_before_the_current_view_began_are_proved_in_the_one_before() {
        let (old, new) = (view(0), view(1));
        let h = ViewHistory {
            view_since: Cid(10),
            previous_view: Some(old.clone()),
            ..ViewHistory::default()
        };
        assert_eq!(h.view_for(&new, Cid(9)).id, old.id);
        assert_eq!(h.view_for(&new, Cid(10)).id, new.id);
        assert_eq!(h.view_for(&new, Cid(11)).id, new.id);
    }

    #[test]
    fn without_a_previous_view_every_decision_is_proved_in_the_current_one() {
        let new = view(3);
        let h = ViewHistory::default();
        assert_eq!(h.view_for(&new, Cid(0)).id, new.id);
    }
}
