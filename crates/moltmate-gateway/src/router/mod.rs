//! The gateway: durable acceptance, per-user ordered workers, reply delivery, crash recovery.
//!
//! Ordering and isolation come from one rule: each user has at most one worker task, and that
//! task handles the user's inbox rows one at a time in id order. Different users have different
//! tasks, so a slow model or a long tool call for one user never delays another; a global
//! semaphore bounds how many turns run at once.
//!
//! The module is split along the life of a message:
//!
//! * [`accept`] — a channel hands a message over: access decision, then one database commit
//!   (inbox row + channel cursor), then the user's worker is woken. Nothing else: no file of
//!   any home is touched here, so nothing a user controls can slow down accepting.
//! * [`worker`] — one task per active user answers that user's inbox rows in order: commands,
//!   onboarding, and turns (prompt, model ⇄ tools, commit).
//! * [`files`] — every filesystem step a turn needs (home, family folder, prompt files,
//!   personas), each on the blocking pool with a deadline
//!   ([`moltmate_core::blocking::run`]); a step that overruns fails that user's turn with a
//!   clear message, never the runtime.
//! * [`delivery`] — committed replies to the waiting caller and the channel (at most once).
//! * [`user_events`] — users removed or reset by the CLI (another process): their worker,
//!   running turn, waiters, notices and sandboxes are stopped, and they are held back until the
//!   CLI has wiped their files.
//! * [`scheduler`] — the reminder task: due reminders become inbox rows (one durable commit
//!   per occurrence), answered by the user's worker like any accepted message.

mod accept;
mod attachments;
mod delivery;
mod files;
mod scheduler;
mod user_events;
mod worker;

pub use user_events::{HOLD_MAX as USER_HOLD_MAX, POLL as USER_EVENTS_POLL};

use crate::agent::{ModelCaller, ToolBox};
use crate::settings::{GatewaySettings, SandboxIdPolicy};
use accept::accept;
use async_trait::async_trait;
use delivery::deliver;
use moltmate_core::channel::{
    AcceptError, Accepted, Channel, DownloadArea, InboundMessage, InboundSink,
};
use moltmate_core::model::{DeltaSink, TokenUsage};
use moltmate_core::sandbox::{DiskCaps, Sandbox, SandboxIds};
use moltmate_core::tool::UserHome;
use moltmate_core::{ChannelKind, Shutdown, UserId};
use moltmate_store::{Homes, Store, StoreError};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::task::TaskTracker;
use worker::wake_worker;

/// What the gateway is built from.
pub struct GatewayParts {
    pub store: Store,
    pub homes: Homes,
    pub settings: GatewaySettings,
    pub model: Arc<dyn ModelCaller>,
    pub tools: ToolBox,
    pub channels: Vec<Arc<dyn Channel>>,
    /// Where `send_file` keeps files for web and API users (served by the web layer at
    /// `/files/<id>`); `None`: the tool tells those users it cannot send files.
    pub downloads: Option<Arc<dyn DownloadArea>>,
    /// The sandbox backend, if any (sessions are ended in it on `/reset`).
    pub sandbox: Option<Arc<dyn Sandbox>>,
    /// Puts a user's home on its disk-capped volume before their first turn writes there
    /// (a root gateway with a sandbox backend); `None`: homes are used as they are.
    pub disk_caps: Option<Arc<dyn DiskCaps>>,
    pub shutdown: Shutdown,
}

/// A caller waiting for the answer to one message (local chat, web).
struct Waiter {
    deltas: Arc<dyn DeltaSink>,
    reply: oneshot::Sender<Reply>,
}

/// A user's worker: woken by `notify`; `dirty` closes the race between a message arriving and
/// the idle worker deciding to exit (both happen under the `workers` lock). `task` is how an
/// ended user's worker is aborted.
struct WorkerSlot {
    notify: Notify,
    dirty: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Inner {
    store: Store,
    homes: Homes,
    settings: GatewaySettings,
    model: Arc<dyn ModelCaller>,
    tools: ToolBox,
    channels: HashMap<ChannelKind, Arc<dyn Channel>>,
    downloads: Option<Arc<dyn DownloadArea>>,
    sandbox: Option<Arc<dyn Sandbox>>,
    disk_caps: Option<Arc<dyn DiskCaps>>,
    workers: Mutex<HashMap<UserId, Arc<WorkerSlot>>>,
    /// Callers waiting for the answer to an inbox row, with the row's user.
    waiters: Mutex<HashMap<i64, (UserId, Waiter)>>,
    turn_permits: Semaphore,
    shutdown: Shutdown,
    tasks: TaskTracker,
    metrics: Arc<crate::metrics::Metrics>,
    strangers: crate::strangers::Strangers,
    /// Queue-full and budget notices already given.
    notices: crate::limits::Notices,
    /// Users being removed or reset (see [`user_events`]).
    endings: user_events::Endings,
    /// Wakes the reminder scheduler (a reminder was created).
    schedule_wake: Arc<Notify>,
}

/// The running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// The answer to a submitted message, and its live text stream.
pub struct Submitted {
    pub accepted: Accepted,
    /// Resolves with the reply once the turn is committed (dropped if refused).
    pub reply: oneshot::Receiver<Reply>,
}

/// A committed reply, as handed to an in-band caller (terminal, web, API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    /// Tokens every model call of this turn used, summed over providers and models
    /// (including a compaction and memory flush before it). Zero for command replies.
    pub usage: TokenUsage,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only means another thread panicked while holding the lock; the maps guarded
    // here stay structurally valid, so keep serving rather than take every user down.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gateway {
    pub fn new(parts: GatewayParts) -> Self {
        let channels = parts.channels.into_iter().map(|c| (c.kind(), c)).collect();
        Gateway {
            inner: Arc::new(Inner {
                turn_permits: Semaphore::new(parts.settings.max_concurrent_turns.max(1)),
                store: parts.store,
                homes: parts.homes,
                settings: parts.settings,
                model: parts.model,
                tools: parts.tools,
                channels,
                downloads: parts.downloads,
                sandbox: parts.sandbox,
                disk_caps: parts.disk_caps,
                workers: Mutex::new(HashMap::new()),
                waiters: Mutex::new(HashMap::new()),
                shutdown: parts.shutdown,
                tasks: TaskTracker::new(),
                metrics: Arc::new(crate::metrics::Metrics::new()),
                strangers: crate::strangers::Strangers::new(),
                notices: crate::limits::Notices::default(),
                endings: user_events::Endings::new(),
                schedule_wake: Arc::new(Notify::new()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn homes(&self) -> &Homes {
        &self.inner.homes
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.inner.settings
    }

    /// The gateway's metrics (served by the web layer at `/metrics`).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// The sandbox backend, if one is configured.
    pub fn sandbox(&self) -> Option<&Arc<dyn Sandbox>> {
        self.inner.sandbox.as_ref()
    }

    /// The health of every configured channel (those that push replies: Telegram, Signal,
    /// WhatsApp, ...), in a stable order.
    pub fn channel_statuses(&self) -> Vec<moltmate_core::channel_status::ChannelStatus> {
        let mut statuses: Vec<_> = self
            .inner
            .channels
            .values()
            .map(|c| c.health().snapshot())
            .collect();
        statuses.sort_by_key(|s| s.channel);
        statuses
    }

    /// Number of users with a live worker task.
    pub fn active_workers(&self) -> usize {
        lock(&self.inner.workers).len()
    }

    /// Whether `user` has a live worker task.
    pub fn has_worker(&self, user: &UserId) -> bool {
        lock(&self.inner.workers).contains_key(user)
    }

    /// Number of users held back while their removal or reset is under way.
    pub fn held_users(&self) -> usize {
        self.inner.endings.held_count()
    }

    /// Starts acting on users removed or reset by another process (`moltmate users
    /// remove/reset`): reads where to start, holds back users whose ending is still under way,
    /// and spawns the watcher (one indexed read every [`USER_EVENTS_POLL`]). Call once, after
    /// building and before [`Gateway::recover`].
    pub async fn watch_user_events(&self) -> Result<(), StoreError> {
        user_events::start(&self.inner).await
    }

    /// Stops everything of `user` in this gateway right away (worker, running turn, waiters,
    /// notices, sandboxes) and holds them back until a `settled` user event: what the watcher
    /// does for an ending another process committed. For an in-process caller that ended the
    /// user in the store itself.
    pub async fn end_user(&self, user: &UserId) {
        user_events::end_user(&self.inner, user).await
    }

    /// Crash recovery: sends replies that were committed but not handed to their channel, and
    /// restarts workers for users with unanswered messages. Call once before channels run.
    pub async fn recover(&self) -> Result<(), StoreError> {
        let pending = self.inner.store.pending_outbox(10_000).await?;
        if !pending.is_empty() {
            tracing::info!(
                count = pending.len(),
                "delivering replies left from the last run"
            );
        }
        for item in pending {
            deliver(&self.inner, item).await;
        }
        let users = self.inner.store.users_with_pending_inbox().await?;
        if !users.is_empty() {
            tracing::info!(
                count = users.len(),
                "resuming users with unanswered messages"
            );
        }
        for user in users {
            wake_worker(&self.inner, &user);
        }
        Ok(())
    }

    /// Runs every channel and the reminder scheduler until shutdown. Returns when all have
    /// stopped.
    pub async fn run_channels(&self) {
        let sink: Arc<dyn InboundSink> = Arc::new(self.clone());
        let mut handles = Vec::new();
        handles.push(tokio::spawn(scheduler::run(Arc::clone(&self.inner))));
        for channel in self.inner.channels.values() {
            let channel = Arc::clone(channel);
            let sink = Arc::clone(&sink);
            let shutdown = self.inner.shutdown.clone();
            handles.push(tokio::spawn(async move {
                let kind = channel.kind();
                if let Err(e) = channel.run(sink, shutdown).await {
                    tracing::error!(channel = %kind, error = %e, "channel stopped");
                }
            }));
        }
        for handle in handles {
            let _ = handle.await;
        }
    }

    /// Makes the reminder scheduler look at the database now (after a test moved its clock;
    /// the `schedule` tool does this itself).
    pub fn wake_scheduler(&self) {
        self.inner.schedule_wake.notify_one();
    }

    /// Waits for running turns after shutdown was signalled, at most `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "turns still running at shutdown; their messages will be answered after restart"
            );
        }
    }

    /// Accepts a message and returns a receiver for its reply, streaming text to `deltas`.
    /// Used by channels that answer in-band (local chat, web).
    pub async fn submit(
        &self,
        message: InboundMessage,
        deltas: Arc<dyn DeltaSink>,
    ) -> Result<Submitted, AcceptError> {
        let (sender, receiver) = oneshot::channel();
        let accepted = accept(
            &self.inner,
            message,
            Some(Waiter {
                deltas,
                reply: sender,
            }),
        )
        .await?;
        Ok(Submitted {
            accepted,
            reply: receiver,
        })
    }

    /// Ensures the user's home exists (owned by their sandbox ids), with persona files when it
    /// is new. The file work runs on the blocking pool with a deadline.
    pub async fn ensure_home(&self, user: &UserId) -> Result<UserHome, String> {
        if self.inner.endings.is_held(user) {
            return Err(format!("{user} is being removed or reset"));
        }
        let ids = sandbox_ids(&self.inner, user)
            .await
            .map_err(|e| e.to_string())?;
        let inner = Arc::clone(&self.inner);
        let user = user.clone();
        moltmate_core::blocking::run(
            "creating a home",
            moltmate_core::blocking::FILE_DEADLINE,
            move || files::ensure_home(&inner.homes, &inner.settings, &user, ids),
        )
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// The host ids `user`'s sandbox runs as (allocated on first need; see
    /// [`SandboxIdPolicy`]).
    pub async fn sandbox_ids(&self, user: &UserId) -> Result<SandboxIds, StoreError> {
        sandbox_ids(&self.inner, user).await
    }
}

#[async_trait]
impl InboundSink for Gateway {
    async fn accept(&self, message: InboundMessage) -> Result<Accepted, AcceptError> {
        accept(&self.inner, message, None).await
    }

    async fn cursor(&self, channel: ChannelKind) -> Result<Option<i64>, AcceptError> {
        self.inner
            .store
            .cursor(channel)
            .await
            .map_err(|e| AcceptError::Storage(e.to_string()))
    }

    async fn advance_cursor(&self, channel: ChannelKind, cursor: i64) -> Result<(), AcceptError> {
        self.inner
            .store
            .advance_cursor(channel, cursor)
            .await
            .map_err(|e| AcceptError::Storage(e.to_string()))
    }
}

/// The host ids `user`'s sandbox runs as and their home belongs to: their own, from the
/// database (allocated on first need), or the gateway's when it cannot switch uids.
async fn sandbox_ids(inner: &Inner, user: &UserId) -> Result<SandboxIds, StoreError> {
    match inner.settings.sandbox_ids {
        SandboxIdPolicy::PerUser(range) => inner.store.user_sandbox_ids(user, range).await,
        SandboxIdPolicy::Shared(ids) => Ok(ids),
    }
}
