//! Container creations under way, so that ending a user or a session accounts for them.
//!
//! Creating a container is two Engine API calls (create, then start). Once the create request
//! is sent, the engine finishes it whether or not anybody is still waiting for the answer, and
//! a container nobody starts stays `Created` for good. If the creation were part of the
//! caller's future (a turn or a prewarm aborted by `users remove`, a session ending), dropping
//! it between the two calls, or while the create request is in flight, would leave exactly
//! that — and a removal sweeping the user's containers right then could list them before the
//! engine had made the new one. So each creation runs in a task of its own (which a dropped
//! caller cannot cut short) and is registered here for its whole life; an ending marks the
//! matching creations as *doomed* and waits for them: a doomed creation removes what it made
//! instead of handing it out, and one that finished before the mark made a container the
//! ending's sweep then finds. A prune waits for the creations under way when it starts (it
//! could not list their containers yet; at shutdown, nobody would later).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One creation under way.
#[derive(Debug)]
struct Creation {
    user: String,
    /// The session label of the container ([`super::LABEL_SESSION`]; empty unless the scope
    /// is `session`).
    session: String,
    /// An ending of its user (or session) came while it was under way: what it makes must go.
    doomed: bool,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    under_way: HashMap<u64, Creation>,
}

/// The creations of one [`super::DockerSandbox`].
#[derive(Debug, Default)]
pub(super) struct Creations {
    state: Mutex<State>,
    /// Woken whenever a creation leaves the map.
    left: tokio::sync::Notify,
}

impl Creations {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert, remove or flag: a panic elsewhere cannot leave the
        // map half-changed, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a creation of a container of `user` (session label `session`) until the
    /// returned ticket is finished or dropped. Call it before the create request is sent.
    pub(super) fn begin(self: &Arc<Self>, user: &str, session: &str) -> Ticket {
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        state.under_way.insert(
            id,
            Creation {
                user: user.to_string(),
                session: session.to_string(),
                doomed: false,
            },
        );
        Ticket {
            creations: Arc::clone(self),
            id,
            open: true,
        }
    }

    /// Marks the creations of `user` under way now (only those of session label `session`,
    /// when given) as doomed; returns how many there are.
    pub(super) fn doom(&self, user: &str, session: Option<&str>) -> usize {
        let mut state = self.lock();
        let mut doomed = 0;
        for creation in state.under_way.values_mut() {
            if creation.user == user && session.is_none_or(|s| creation.session == s) {
                creation.doomed = true;
                doomed += 1;
            }
        }
        doomed
    }

    /// Waits, at most `timeout`, until no creation of `user` (of session label `session`,
    /// when given) is under way. Returns whether none is.
    pub(super) async fn wait(&self, user: &str, session: Option<&str>, timeout: Duration) -> bool {
        self.wait_for(
            |_, c| c.user == user && session.is_none_or(|s| c.session == s),
            timeout,
        )
        .await
    }

    /// Waits, at most `timeout`, until every creation under way now is done (those begun
    /// later are not waited for). Returns whether they are.
    pub(super) async fn wait_for_current(&self, timeout: Duration) -> bool {
        let upto = self.lock().next;
        self.wait_for(|id, _| id < upto, timeout).await
    }

    async fn wait_for(&self, matches: impl Fn(u64, &Creation) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a creation leaving in between still wakes us.
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let pending = self.lock().under_way.iter().any(|(id, c)| matches(*id, c));
            if !pending {
                return true;
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return false;
            }
        }
    }

    fn leave(&self, id: u64) {
        self.lock().under_way.remove(&id);
        self.left.notify_waiters();
    }
}

/// A creation's registration in [`Creations`]: leaves the map when finished or dropped (also
/// when its task panics or is cancelled at shutdown).
#[derive(Debug)]
pub(super) struct Ticket {
    creations: Arc<Creations>,
    id: u64,
    open: bool,
}

impl Ticket {
    /// Whether an ending came for this creation's user (or session) meanwhile.
    pub(super) fn doomed(&self) -> bool {
        self.creations
            .lock()
            .under_way
            .get(&self.id)
            .is_some_and(|c| c.doomed)
    }

    /// The container is made and started: leaves the map unless doomed, in one step under the
    /// lock. So an ending either doomed this creation first (false: the caller removes the
    /// container, and only then drops the ticket, so the ending waits for that too), or comes
    /// after and finds the container with its own sweep.
    pub(super) fn finish(&mut self) -> bool {
        let mut state = self.creations.lock();
        if state.under_way.get(&self.id).is_some_and(|c| c.doomed) {
            return false;
        }
        state.under_way.remove(&self.id);
        drop(state);
        self.open = false;
        self.creations.left.notify_waiters();
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open {
            self.creations.leave(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ending_dooms_and_waits_for_the_creations_of_its_user_only() {
        let creations = Arc::new(Creations::default());
        let mut anna = creations.begin("anna", "s1");
        let mut anna_s2 = creations.begin("anna", "s2");
        let mut bob = creations.begin("bob", "s1");

        assert_eq!(creations.doom("anna", Some("s1")), 1);
        assert!(anna.doomed() && !anna_s2.doomed() && !bob.doomed());
        assert!(
            !creations
                .wait("anna", Some("s1"), Duration::from_millis(20))
                .await
        );
        // Doomed: stays registered until its container is gone (the ticket is dropped).
        assert!(!anna.finish());
        let waiting = {
            let creations = Arc::clone(&creations);
            tokio::spawn(async move {
                creations
                    .wait("anna", Some("s1"), Duration::from_secs(10))
                    .await
            })
        };
        tokio::task::yield_now().await;
        drop(anna);
        assert!(waiting.await.unwrap());

        // Finished before an ending: not doomed afterwards, the ending's sweep finds it.
        assert!(anna_s2.finish());
        assert_eq!(creations.doom("anna", None), 0);
        assert!(creations.wait("anna", None, Duration::ZERO).await);
        assert!(!creations.wait("bob", None, Duration::ZERO).await);
        assert!(bob.finish());
        assert!(creations.wait("bob", None, Duration::ZERO).await);
    }

    #[tokio::test]
    async fn waiting_for_the_current_creations_ignores_later_ones() {
        let creations = Arc::new(Creations::default());
        let earlier = creations.begin("anna", "");
        let waiting = {
            let creations = Arc::clone(&creations);
            tokio::spawn(async move { creations.wait_for_current(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        let _later = creations.begin("bob", "");
        drop(earlier);
        assert!(waiting.await.unwrap());
    }
}
