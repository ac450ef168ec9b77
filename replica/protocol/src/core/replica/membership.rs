//! Reconfiguration as the ordered service sees it: an admin-signed view change executed in a
//! batch, and the new view installed after that batch.

use super::*;

impl Replica {
    /// Executes a view change. It takes effect after the batch, so every request of the batch
    /// runs in the view that ordered it.
    pub(super) fn execute_reconfig(
        &mut self,
        client: &ClientId,
        payload: &[u8],
    ) -> ReconfigOutcome {
        let current = self.pending_view.as_ref().unwrap_or(&self.view);
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
                self.pending_view = Some(v.clone());
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
        self.previous_view = Some(std::mem::replace(&mut self.view, view.clone()));
        self.view_since = cid.next();
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
        self.catchup.helped.retain(|id, _| v.contains(*id));
        self.transfer.retain_members(v);
    }

    // ----- checkpoints and state transfer ----------------------------------------------------
}
