//! Users removed or reset by another process (`moltmate users remove/reset` next to a running
//! gateway): stop everything the gateway runs or keeps for them.
//!
//! The CLI ends a user in one database transaction that also appends a `user_events` row
//! (see `moltmate_store::ending`). This module polls that table — one primary-key range read
//! every [`POLL`], in its own task, never on a message's path — and for each ending:
//!
//! 1. holds the user back: no worker starts for them until the CLI says it is done with their
//!    files (a `settled` event), so nothing of the new life runs on the old home;
//! 2. aborts their worker task, and with it the running turn (model call, tool call, `exec`;
//!    its typing indicator and sandbox prewarm go with it) — the turn commits nothing, since
//!    its inbox row is gone, and its user lock is released, which is what the CLI waits for
//!    before it wipes the home;
//! 3. drops callers waiting for their answers, their notice throttles, and their sandboxes
//!    ([`moltmate_core::sandbox::Sandbox::end_user`]: containers removed, running commands
//!    killed).
//!
//! A worker checks, before each message, whether an ending of its user was committed that the
//! watcher has not handled yet (folded into the read it makes anyway), and stops if so: the
//! window between the CLI's commit and the next poll runs nothing for that user.
//!
//! A hold lasts until the `settled` event or [`HOLD_MAX`], whichever comes first (a CLI that
//! died half-way must not lock a user out forever). A gateway starting up holds the users whose
//! ending is recent and not settled.

use super::worker::wake_worker;
use super::{lock, Inner};
use moltmate_core::UserId;
use moltmate_store::{StoreError, UserEvent, UserEventKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the gateway looks for users ended by another process.
pub const POLL: Duration = Duration::from_millis(500);
/// The longest a user is held back waiting for their ending to settle.
pub const HOLD_MAX: Duration = Duration::from_secs(10 * 60);
/// Events read per poll (a backlog is worked through over the next polls).
const BATCH: usize = 100;
/// Messages accepted for an ended user after the ending whose callers keep waiting (the
/// queue cap bounds them far below this).
const WAITERS_KEPT: usize = 10_000;
/// How long ending a user waits for their aborted worker task to be gone.
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// What the gateway knows about users being ended.
pub(super) struct Endings {
    /// Users held back, since when. Locked after `Inner::workers` where both are taken.
    held: Mutex<HashMap<UserId, Instant>>,
    /// The newest user event acted on; `i64::MAX` until the watcher has started (a gateway
    /// without one checks nothing).
    handled: AtomicI64,
}

impl Endings {
    pub(super) fn new() -> Self {
        Endings {
            held: Mutex::new(HashMap::new()),
            handled: AtomicI64::new(i64::MAX),
        }
    }

    /// The newest user event acted on (what a worker compares against before a message).
    pub(super) fn handled(&self) -> i64 {
        self.handled.load(Ordering::SeqCst)
    }

    /// Whether `user` is being ended (no worker may start for them).
    pub(super) fn is_held(&self, user: &UserId) -> bool {
        let held = lock(&self.held);
        !held.is_empty() && held.contains_key(user)
    }

    /// Users held back right now.
    pub(super) fn held_count(&self) -> usize {
        lock(&self.held).len()
    }
}

/// Reads where to start (the newest event; users whose ending is recent and unsettled are
/// held) and spawns the watcher. Call once, before workers are started by recovery.
pub(super) async fn start(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let last = inner.store.last_user_event_id().await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let hold_ms = i64::try_from(HOLD_MAX.as_millis()).unwrap_or(i64::MAX);
    let unsettled = inner
        .store
        .unsettled_user_events(now_ms.saturating_sub(hold_ms))
        .await?;
    {
        let mut held = lock(&inner.endings.held);
        for event in unsettled {
            let age = Duration::from_millis(u64::try_from(now_ms - event.at).unwrap_or(0));
            let since = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            tracing::info!(user = %event.user, "holding back a user whose removal or reset is still under way");
            held.insert(event.user, since);
        }
    }
    inner.endings.handled.store(last, Ordering::SeqCst);
    let for_task = Arc::clone(inner);
    inner.tasks.spawn(async move { watch(for_task).await });
    Ok(())
}

async fn watch(inner: Arc<Inner>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = inner.shutdown.cancelled() => return,
        }
        match inner
            .store
            .user_events_after(inner.endings.handled(), BATCH)
            .await
        {
            Ok(events) => {
                failing = false;
                for event in events {
                    act(&inner, &event).await;
                    inner.endings.handled.store(event.id, Ordering::SeqCst);
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not read user events; retrying");
            }
            Err(_) => {}
        }
        release_expired(&inner).await;
    }
}

async fn act(inner: &Arc<Inner>, event: &UserEvent) {
    match event.kind {
        UserEventKind::Removed | UserEventKind::Reset => end_user(inner, &event.user).await,
        UserEventKind::Settled => {
            let released = lock(&inner.endings.held).remove(&event.user).is_some();
            if released {
                resume(inner, &event.user).await;
            }
        }
    }
    tracing::info!(user = %event.user, event = event.kind.as_str(), "acted on a user event");
}

/// Stops everything of `user` in this gateway and holds them back.
pub(super) async fn end_user(inner: &Arc<Inner>, user: &UserId) {
    let slot = {
        let mut workers = lock(&inner.workers);
        lock(&inner.endings.held).insert(user.clone(), Instant::now());
        let slot = workers.remove(user);
        inner.metrics.active_users.set(workers.len() as i64);
        slot
    };
    if let Some(slot) = slot {
        let task = lock(&slot.task).take();
        if let Some(task) = task {
            task.abort();
            if tokio::time::timeout(ABORT_WAIT, task).await.is_err() {
                tracing::warn!(user = %user, "the worker of an ended user did not stop in time");
            }
        }
    }
    // Callers waiting for an answer of the old life (web, terminal) get none: the reply
    // channel closes, which they report as a lost answer. Their inbox rows went with the
    // ending; a row still pending was accepted after it and is answered once it settles.
    let pending: std::collections::HashSet<i64> = match inner
        .store
        .pending_inbox_ids(user, WAITERS_KEPT)
        .await
    {
        Ok(ids) => ids.into_iter().collect(),
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "could not read the inbox; dropping every waiter of an ended user");
            Default::default()
        }
    };
    lock(&inner.waiters).retain(|id, (owner, _)| owner != user || pending.contains(id));
    inner.notices.forget(user);
    if let Some(sandbox) = &inner.sandbox {
        if let Err(e) = sandbox.end_user(user).await {
            tracing::warn!(user = %user, error = %e, "could not end the sandboxes of an ended user");
        }
    }
}

/// Starts a worker for a user let go again, if they have messages waiting (accepted while
/// they were held).
async fn resume(inner: &Arc<Inner>, user: &UserId) {
    match inner.store.pending_inbox_count(user).await {
        Ok(0) => {}
        Ok(_) => wake_worker(inner, user),
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "could not read the inbox; waking the worker");
            wake_worker(inner, user);
        }
    }
}

/// Lets go of users whose ending never settled (the CLI died half-way).
async fn release_expired(inner: &Arc<Inner>) {
    let expired: Vec<UserId> = {
        let mut held = lock(&inner.endings.held);
        if held.is_empty() {
            return;
        }
        let expired: Vec<UserId> = held
            .iter()
            .filter(|(_, since)| since.elapsed() >= HOLD_MAX)
            .map(|(user, _)| user.clone())
            .collect();
        for user in &expired {
            held.remove(user);
        }
        expired
    };
    for user in expired {
        tracing::warn!(user = %user, "a removal or reset was not finished within 10 minutes; letting the user run again");
        resume(inner, &user).await;
    }
}
