//! The gateway: durable acceptance, per-user ordered workers, reply delivery, crash recovery.
//!
//! Ordering and isolation come from one rule: each user has at most one worker task, and that
//! task handles the user's inbox rows one at a time in id order. Different users have different
//! tasks, so a slow model or a long tool call for one user never delays another; a global
//! semaphore bounds how many turns run at once.

use crate::access::{AccessDecision, ChannelAccess, DmPolicy, KnownSender};
use crate::agent::{run_turn, ModelCaller, ToolBox, Turn};
use crate::onboarding::{self, Answer};
use crate::persona;
use crate::prompt::build_system_prompt;
use crate::session::{compact, estimate_rows, estimate_tokens, Compaction};
use crate::settings::GatewaySettings;
use async_trait::async_trait;
use moltmate_core::channel::{AcceptError, Accepted, Channel, InboundMessage, InboundSink};
use moltmate_core::model::{ConversationItem, DeltaSink, IgnoreDeltas, TokenUsage};
use moltmate_core::sandbox::{Sandbox, WorkspaceAccess};
use moltmate_core::tool::{FamilyFolder, ToolContext, UserHome};
use moltmate_core::{ChannelKind, Identity, Shutdown, UserId};
use moltmate_store::homes::{read_beneath, write_beneath};
use moltmate_store::{AuditEvent, Homes, InboxItem, OutboxItem, Store, StoreError, TurnRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::task::TaskTracker;

/// Longest message text handed to a model; longer texts are cut with a note. Protects the
/// context window and the provider bill from a pasted novel.
const MAX_MESSAGE_CHARS: usize = 16_000;

/// How often "typing..." is renewed while a turn runs (Telegram shows it for ~5 s).
const TYPING_INTERVAL: Duration = Duration::from_secs(4);

/// What the gateway is built from.
pub struct GatewayParts {
    pub store: Store,
    pub homes: Homes,
    pub settings: GatewaySettings,
    pub model: Arc<dyn ModelCaller>,
    pub tools: ToolBox,
    pub channels: Vec<Arc<dyn Channel>>,
    /// The sandbox backend, if any (sessions are ended in it on `/reset`).
    pub sandbox: Option<Arc<dyn Sandbox>>,
    pub shutdown: Shutdown,
}

/// A caller waiting for the answer to one message (local chat, web).
struct Waiter {
    deltas: Arc<dyn DeltaSink>,
    reply: oneshot::Sender<Reply>,
}

/// A user's worker: woken by `notify`; `dirty` closes the race between a message arriving and
/// the idle worker deciding to exit (both happen under the `workers` lock).
struct WorkerSlot {
    notify: Notify,
    dirty: AtomicBool,
}

struct Inner {
    store: Store,
    homes: Homes,
    settings: GatewaySettings,
    model: Arc<dyn ModelCaller>,
    tools: ToolBox,
    channels: HashMap<ChannelKind, Arc<dyn Channel>>,
    sandbox: Option<Arc<dyn Sandbox>>,
    workers: Mutex<HashMap<UserId, Arc<WorkerSlot>>>,
    waiters: Mutex<HashMap<i64, Waiter>>,
    turn_permits: Semaphore,
    shutdown: Shutdown,
    tasks: TaskTracker,
    metrics: Arc<crate::metrics::Metrics>,
    /// Queue-full and budget notices already given.
    notices: crate::limits::Notices,
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
                sandbox: parts.sandbox,
                workers: Mutex::new(HashMap::new()),
                waiters: Mutex::new(HashMap::new()),
                shutdown: parts.shutdown,
                tasks: TaskTracker::new(),
                metrics: Arc::new(crate::metrics::Metrics::new()),
                notices: crate::limits::Notices::default(),
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

    /// Number of users with a live worker task.
    pub fn active_workers(&self) -> usize {
        lock(&self.inner.workers).len()
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

    /// Runs every channel until shutdown. Returns when all channels have stopped.
    pub async fn run_channels(&self) {
        let sink: Arc<dyn InboundSink> = Arc::new(self.clone());
        let mut handles = Vec::new();
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

    /// Ensures the user's home exists, with persona files when it is new.
    pub fn ensure_home(&self, user: &UserId) -> Result<UserHome, String> {
        ensure_home(&self.inner, user)
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

fn storage(e: StoreError) -> AcceptError {
    AcceptError::Storage(e.to_string())
}

async fn known_sender(inner: &Inner, identity: &Identity) -> Result<KnownSender, StoreError> {
    if let Some(user) = inner.settings.configured_identities.get(identity) {
        return Ok(KnownSender::Configured(user.clone()));
    }
    Ok(match inner.store.user_for_identity(identity).await? {
        Some((user, source)) if source == "pairing" => KnownSender::Paired(user),
        Some((user, _)) => KnownSender::Seen(user),
        None => KnownSender::Unknown,
    })
}

async fn accept(
    inner: &Arc<Inner>,
    message: InboundMessage,
    waiter: Option<Waiter>,
) -> Result<Accepted, AcceptError> {
    let channel = message.sender.channel;
    let result = accept_counted(inner, message, waiter).await;
    if let Ok(accepted) = &result {
        let outcome = match accepted {
            Accepted::Queued => "queued",
            Accepted::Duplicate => "duplicate",
            Accepted::Refused => "refused",
            Accepted::QueueFull => "queue_full",
        };
        inner.metrics.count_message(channel.as_str(), outcome);
    }
    result
}

async fn accept_counted(
    inner: &Arc<Inner>,
    mut message: InboundMessage,
    waiter: Option<Waiter>,
) -> Result<Accepted, AcceptError> {
    if inner.shutdown.is_cancelled() {
        return Err(AcceptError::ShuttingDown);
    }
    let identity = message.sender.clone();
    let known = known_sender(inner, &identity).await.map_err(storage)?;
    let decision = if matches!(identity.channel, ChannelKind::Local | ChannelKind::Web) {
        // Channels that authenticate their users themselves: the operator's own terminal
        // (`moltmate chat --user NAME` speaks as NAME) and the web layer (a user token or a
        // login-link session names the user). The peer id is the user id.
        match &known {
            KnownSender::Configured(u) | KnownSender::Paired(u) | KnownSender::Seen(u) => {
                AccessDecision::Allowed(u.clone())
            }
            KnownSender::Unknown => match UserId::new(identity.peer.as_str()) {
                Ok(user) => AccessDecision::Allowed(user),
                Err(_) => AccessDecision::Refused,
            },
        }
    } else {
        let fallback = ChannelAccess {
            policy: DmPolicy::Disabled,
            allow_from: Vec::new(),
        };
        inner
            .settings
            .access
            .get(&identity.channel)
            .unwrap_or(&fallback)
            .decide(&identity, &known)
    };

    match decision {
        AccessDecision::Allowed(user) => {
            // Per-user queue cap (limits.queuedMessages), before anything else is done for it.
            let cap = inner
                .settings
                .user_settings(&user, identity.channel)
                .limits
                .queued_messages;
            let notice = inner.channels.contains_key(&identity.channel).then(|| {
                crate::limits::queue_full_text(
                    cap,
                    message.language_code.as_deref(),
                    &inner.settings.default_language,
                )
            });
            if let crate::limits::QueueCheck::Full { notice } = crate::limits::check_queue(
                &inner.store,
                &inner.notices,
                &user,
                cap,
                &message,
                notice,
            )
            .await
            .map_err(storage)?
            {
                if let Some(item) = notice {
                    let inner = Arc::clone(inner);
                    inner
                        .tasks
                        .clone()
                        .spawn(async move { deliver(&inner, item).await });
                }
                return Ok(Accepted::QueueFull);
            }
            let created = inner
                .store
                .ensure_user(&user, message.sender_name.as_deref())
                .await
                .map_err(storage)?;
            let source = match known {
                KnownSender::Configured(_) => Some("config"),
                KnownSender::Unknown => Some("seen"),
                KnownSender::Paired(_) | KnownSender::Seen(_) => None,
            };
            if let Some(source) = source {
                inner
                    .store
                    .link_identity(&identity, &user, source)
                    .await
                    .map_err(storage)?;
            }
            if created {
                tracing::info!(user = %user, identity = %identity, "new user");
            }
            if let Err(e) = ensure_home(inner, &user) {
                return Err(AcceptError::Storage(e));
            }
            if message.text.chars().count() > MAX_MESSAGE_CHARS {
                let cut: String = message.text.chars().take(MAX_MESSAGE_CHARS).collect();
                message.text = format!("{cut}\n\n[message cut at {MAX_MESSAGE_CHARS} characters]");
            }
            match inner
                .store
                .insert_inbound(&message, &user)
                .await
                .map_err(storage)?
            {
                None => Ok(Accepted::Duplicate),
                Some(inbox_id) => {
                    if let Some(waiter) = waiter {
                        lock(&inner.waiters).insert(inbox_id, waiter);
                    }
                    wake_worker(inner, &user);
                    Ok(Accepted::Queued)
                }
            }
        }
        AccessDecision::NeedsPairing => {
            let (request, created) = inner
                .store
                .pairing_request_for(
                    &identity,
                    &message.chat_id,
                    message.sender_name.as_deref(),
                    inner.settings.pairing_ttl,
                )
                .await
                .map_err(storage)?;
            if created {
                tracing::info!(identity = %identity, code = %request.code, "pairing requested");
            }
            let text = pairing_text(
                &request.code,
                message.language_code.as_deref(),
                &inner.settings.default_language,
                identity.channel,
            );
            let outbox = inner
                .store
                .enqueue_outbound(None, identity.channel, &message.chat_id, &text)
                .await
                .map_err(storage)?;
            if let Some(cursor) = message.cursor {
                inner
                    .store
                    .advance_cursor(identity.channel, cursor)
                    .await
                    .map_err(storage)?;
            }
            let inner = Arc::clone(inner);
            let item = OutboxItem {
                id: outbox,
                inbox_id: None,
                user: None,
                channel: identity.channel,
                chat_id: message.chat_id,
                text,
            };
            inner
                .tasks
                .clone()
                .spawn(async move { deliver(&inner, item).await });
            Ok(Accepted::Refused)
        }
        AccessDecision::Refused => {
            tracing::info!(identity = %identity, "message from a sender who is not allowed was dropped");
            let audit = AuditEvent {
                user: UserId::for_identity(&identity),
                kind: "access_refused".to_string(),
                tool: None,
                args_digest: None,
                duration_ms: None,
                outcome: "refused".to_string(),
                detail: Some(identity.to_string()),
            };
            inner.store.record_audit(audit).await.map_err(storage)?;
            if let Some(cursor) = message.cursor {
                inner
                    .store
                    .advance_cursor(identity.channel, cursor)
                    .await
                    .map_err(storage)?;
            }
            Ok(Accepted::Refused)
        }
    }
}

fn pairing_text(
    code: &str,
    language: Option<&str>,
    default_language: &str,
    channel: ChannelKind,
) -> String {
    let language = language.unwrap_or(default_language);
    if language.starts_with("de") {
        format!(
            "Hallo! Dieser Assistent ist privat. Dein Kopplungscode lautet: {code}\n\
             Bitte den Betreiber, ihn mit `moltmate pairing approve {channel} {code}` freizugeben. \
             Der Code ist eine Stunde gültig."
        )
    } else {
        format!(
            "Hi! This assistant is private. Your pairing code is: {code}\n\
             Ask the operator to approve it with `moltmate pairing approve {channel} {code}`. \
             The code is valid for one hour."
        )
    }
}

/// Creates the user's home and, when it has no persona yet, writes the default persona.
fn ensure_home(inner: &Inner, user: &UserId) -> Result<UserHome, String> {
    let home = inner.homes.ensure(user).map_err(|e| e.to_string())?;
    let has_soul = read_beneath(home.root(), "SOUL.md", 1)
        .map(|f| f.is_some())
        .unwrap_or(true);
    if !has_soul {
        let persona = persona::built_in(&inner.settings.default_persona).unwrap_or(persona::CAMI);
        write_beneath(home.root(), "SOUL.md", persona.soul.as_bytes())
            .map_err(|e| e.to_string())?;
        write_beneath(home.root(), "IDENTITY.md", persona.identity.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    Ok(home)
}

fn wake_worker(inner: &Arc<Inner>, user: &UserId) {
    let mut workers = lock(&inner.workers);
    if let Some(slot) = workers.get(user) {
        slot.dirty.store(true, Ordering::SeqCst);
        slot.notify.notify_one();
        return;
    }
    let slot = Arc::new(WorkerSlot {
        notify: Notify::new(),
        dirty: AtomicBool::new(true),
    });
    workers.insert(user.clone(), Arc::clone(&slot));
    inner.metrics.active_users.set(workers.len() as i64);
    drop(workers);
    let inner_for_task = Arc::clone(inner);
    let user = user.clone();
    inner
        .tasks
        .spawn(async move { worker(inner_for_task, user, slot).await });
}

async fn worker(inner: Arc<Inner>, user: UserId, slot: Arc<WorkerSlot>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        slot.dirty.store(false, Ordering::SeqCst);
        loop {
            if inner.shutdown.is_cancelled() {
                lock(&inner.workers).remove(&user);
                return;
            }
            let batch = match inner.store.pending_inbox(&user, 16).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(user = %user, error = %e, "could not read the inbox; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if batch.is_empty() {
                break;
            }
            for item in batch {
                if inner.shutdown.is_cancelled() {
                    break;
                }
                let lock = {
                    let homes = inner.homes.clone();
                    let user = user.clone();
                    tokio::task::spawn_blocking(move || homes.lock_user(&user)).await
                };
                let _lock = match lock {
                    Ok(Ok(lock)) => lock,
                    Ok(Err(e)) => {
                        tracing::error!(user = %user, error = %e, "could not lock the user; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        break;
                    }
                    Err(e) => {
                        tracing::error!(user = %user, error = %e, "lock task failed");
                        break;
                    }
                };
                match inner.store.inbox_is_pending(item.id).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(user = %user, error = %e, "could not read the inbox; retrying");
                        break;
                    }
                }
                if let Err(e) = handle_item(&inner, item).await {
                    // The row stays pending and is retried: nothing accepted is dropped.
                    tracing::error!(user = %user, error = %e, "could not finish a turn; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    break;
                }
                backoff = Duration::from_millis(250);
            }
        }
        tokio::select! {
            _ = slot.notify.notified() => {}
            _ = tokio::time::sleep(inner.settings.worker_idle) => {
                let mut workers = lock(&inner.workers);
                if !slot.dirty.load(Ordering::SeqCst) {
                    workers.remove(&user);
                    inner.metrics.active_users.set(workers.len() as i64);
                    return;
                }
            }
            _ = inner.shutdown.cancelled() => {
                lock(&inner.workers).remove(&user);
                return;
            }
        }
    }
}

fn help_text(language: &str) -> String {
    if language.starts_with("de") {
        "Befehle:\n/reset – neues Gespräch beginnen (dein Gedächtnis bleibt)\n/persona – meine Persönlichkeit neu wählen\n/forget – unsere bisherigen Gespräche löschen (deine Notizen bleiben)\n/help – diese Hilfe".to_string()
    } else {
        "Commands:\n/reset – start a new conversation (your memory stays)\n/persona – choose my personality again\n/forget – delete our past conversations (your notes stay)\n/help – this help".to_string()
    }
}

/// Ends the user's session and the sandbox scoped to it.
async fn end_session(inner: &Inner, user: &UserId) -> Result<(), StoreError> {
    if let Some(session) = inner.store.end_session(user).await? {
        if let Some(sandbox) = &inner.sandbox {
            if let Err(e) = sandbox.end_session(user, &session).await {
                tracing::warn!(user = %user, error = %e, "could not end the session's sandbox");
            }
        }
    }
    Ok(())
}

/// Builds the system prompt off the async threads (it reads files).
async fn system_prompt(
    inner: &Inner,
    home: &UserHome,
    family: Option<&FamilyFolder>,
    summary: Option<String>,
) -> Result<crate::prompt::SystemPrompt, StoreError> {
    let home = home.clone();
    let family_root = family.map(|f| f.root.clone());
    let max = inner.settings.prompt_file_max_bytes;
    let today = chrono::Local::now().date_naive();
    let prompt = tokio::task::spawn_blocking(move || {
        let family_notes = family_root
            .and_then(|root| read_beneath(&root, "FAMILY.md", max).ok().flatten())
            .map(|(text, _)| text);
        build_system_prompt(
            &home,
            today,
            max,
            summary.as_deref(),
            family_notes.as_deref(),
        )
    })
    .await
    .map_err(|e| StoreError::Worker(e.to_string()))?;
    for problem in &prompt.problems {
        tracing::warn!(problem = %problem, "a context file was skipped");
    }
    Ok(prompt)
}

/// Runs the onboarding conversation; `Some(reply)` when the message was part of it.
async fn onboarding_step(
    inner: &Arc<Inner>,
    item: &InboxItem,
    language: &str,
) -> Result<Option<String>, StoreError> {
    let Some(record) = inner.store.user(&item.user).await? else {
        return Ok(None);
    };
    let step = inner.store.onboarding_step(&item.user).await?;
    let choices = || onboarding::available_personas(inner.settings.personas_dir.as_deref());
    let home =
        ensure_home(inner, &item.user).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    let applied =
        |result: Result<(), String>| result.map_err(|e| StoreError::Io(std::io::Error::other(e)));
    let reply = match step.as_deref() {
        None if record.onboarded => return Ok(None),
        None => {
            inner
                .store
                .set_onboarding(&item.user, Some("choose"), false)
                .await?;
            onboarding::menu(language, &choices())
        }
        Some("describe") => {
            applied(onboarding::apply_custom(&home, &item.text))?;
            inner.store.set_onboarding(&item.user, None, true).await?;
            onboarding::confirmation(language, None)
        }
        Some(_) => match onboarding::interpret_choice(&item.text, &choices()) {
            Answer::WantsCustom => {
                inner
                    .store
                    .set_onboarding(&item.user, Some("describe"), record.onboarded)
                    .await?;
                onboarding::ask_for_description(language)
            }
            Answer::Persona(choice) => {
                applied(onboarding::apply_persona(&home, &choice))?;
                inner.store.set_onboarding(&item.user, None, true).await?;
                onboarding::confirmation(language, Some(&choice.label))
            }
            Answer::Description(description) => {
                applied(onboarding::apply_custom(&home, &description))?;
                inner.store.set_onboarding(&item.user, None, true).await?;
                onboarding::confirmation(language, None)
            }
        },
    };
    Ok(Some(reply))
}

async fn handle_item(inner: &Arc<Inner>, item: InboxItem) -> Result<(), StoreError> {
    let language = item
        .language_code
        .clone()
        .unwrap_or_else(|| inner.settings.default_language.clone());
    let command = item
        .text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let command_reply = match command.as_str() {
        "/reset" | "/new" => {
            end_session(inner, &item.user).await?;
            Some(if language.starts_with("de") {
                "Neues Gespräch begonnen. Was in deinem Gedächtnis steht, bleibt erhalten."
                    .to_string()
            } else {
                "Started a new conversation. What is in your memory stays.".to_string()
            })
        }
        "/help" => Some(help_text(&language)),
        "/forget" => {
            if crate::limits::forget_confirmed(&item.text) {
                end_session(inner, &item.user).await?;
            }
            Some(
                crate::limits::forget(
                    &inner.store,
                    inner.settings.memory_index_dir.as_deref(),
                    &item.user,
                    &item.text,
                    &language,
                )
                .await?,
            )
        }
        "/persona" if inner.settings.onboarding_enabled => {
            let onboarded = inner
                .store
                .user(&item.user)
                .await?
                .is_some_and(|u| u.onboarded);
            inner
                .store
                .set_onboarding(&item.user, Some("choose"), onboarded)
                .await?;
            let choices = onboarding::available_personas(inner.settings.personas_dir.as_deref());
            Some(onboarding::menu(&language, &choices))
        }
        _ if inner.settings.onboarding_enabled => onboarding_step(inner, &item, &language).await?,
        "/start" => Some(help_text(&language)),
        _ => None,
    };
    if let Some(text) = command_reply {
        let outbox = inner
            .store
            .finish_inbox_with_reply(item.id, &item.user, pushed_reply(inner, &item, &text))
            .await?;
        finish(inner, &item, outbox, text, TokenUsage::default()).await;
        return Ok(());
    }

    let user_settings = inner
        .settings
        .user_settings(&item.user, item.channel)
        .clone();
    // Budgets and the stored-conversation cap, before any model call. Over them, the message
    // is answered with the notice (pushed at most once per interval) and no model is called.
    let guard = crate::budget::BudgetGuard::new(
        inner.store.clone(),
        item.user.clone(),
        user_settings.limits.budget,
        inner.settings.family_budget(&item.user),
        inner.settings.prices.clone(),
        &language,
    );
    let periods = crate::budget::Periods::now();
    if let Some(text) = guard
        .admit(&periods, user_settings.limits.transcript_bytes)
        .await?
    {
        let pushed = pushed_reply(inner, &item, &text).filter(|_| {
            inner
                .notices
                .budget_notice_due(&item.user, std::time::Instant::now())
        });
        let outbox = inner
            .store
            .finish_inbox_with_reply(item.id, &item.user, pushed)
            .await?;
        finish(inner, &item, outbox, text, TokenUsage::default()).await;
        return Ok(());
    }

    // Bounded concurrency across users. The permit is held for the whole turn.
    let Ok(_permit) = inner.turn_permits.acquire().await else {
        return Ok(());
    };
    let mut session = inner.store.current_session(&item.user).await?;
    if let Some(idle) = inner.settings.session_idle_reset {
        let idle_for = chrono::Utc::now().timestamp_millis() - session.last_active;
        if idle_for > idle.as_millis() as i64 {
            end_session(inner, &item.user).await?;
            session = inner.store.current_session(&item.user).await?;
        }
    }
    let home =
        ensure_home(inner, &item.user).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    let family = match inner.settings.families.get(&item.user) {
        Some(name) => Some(FamilyFolder {
            name: name.clone(),
            root: inner
                .homes
                .ensure_family(name)
                .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?,
        }),
        None => None,
    };
    // In sandbox mode "all", file tools see the sandbox's view of /workspace: the home, or for
    // `workspaceAccess: none` the user's scratch directory.
    let tool_home = match (
        &inner.settings.sandbox_scratch_dir,
        user_settings.sandbox.workspace_access,
    ) {
        (Some(scratch), WorkspaceAccess::None) => {
            let scratch_home = UserHome::new(scratch, &item.user);
            std::fs::create_dir_all(scratch_home.root()).map_err(StoreError::Io)?;
            scratch_home
        }
        _ => home.clone(),
    };
    let context = ToolContext {
        user: item.user.clone(),
        home: tool_home,
        session_id: session.id.clone(),
        family: family.clone(),
        read_only: user_settings.read_only
            || user_settings.sandbox.workspace_access == WorkspaceAccess::Ro,
        sandbox: user_settings.sandbox.clone(),
        exec: user_settings.exec.clone(),
    };
    if inner.settings.prewarm_sandboxes && user_settings.tools.iter().any(|t| t == "exec") {
        prewarm_sandbox(inner, &context);
    }
    // History in a bounded page: the newest rows the context window can hold.
    let mut prompt = system_prompt(inner, &home, family.as_ref(), session.summary.clone()).await?;
    let window = inner.settings.context_window_tokens;
    let page_bytes = |prompt: &str| crate::limits::history_budget(window, prompt, &item.text);
    let mut page = inner
        .store
        .history_page(&session.id, page_bytes(&prompt.text))
        .await?;
    let mut compaction_usage = Vec::new();
    let threshold = (window as f64 * inner.settings.compact_at_ratio) as usize;
    let over = |page: &moltmate_store::HistoryPage, prompt: &str| {
        page.truncated
            || estimate_rows(prompt, &page.rows) + estimate_tokens(&item.text) > threshold
    };
    if over(&page, &prompt.text)
        && crate::limits::compaction_due(&inner.store, &session.id, &item.user, window).await?
    {
        let compacted = compact(
            Compaction {
                model: inner.model.as_ref(),
                tools: &inner.tools,
                store: &inner.store,
                metrics: &inner.metrics,
                context: context.clone(),
                allowed_tools: &user_settings.tools,
                system: &prompt.text,
                session_id: &session.id,
                max_iterations: inner.settings.max_tool_iterations,
                limits: &user_settings.limits,
                budget: Some(&guard),
                summary: session.summary.as_deref(),
            },
            &page,
        )
        .await?;
        if let Some((summary, usage)) = compacted {
            tracing::info!(user = %item.user, "session compacted");
            compaction_usage = usage;
            prompt = system_prompt(inner, &home, family.as_ref(), Some(summary)).await?;
            page = inner
                .store
                .history_page(&session.id, page_bytes(&prompt.text))
                .await?;
        }
        let still_over = over(&page, &prompt.text);
        crate::limits::compaction_done(&inner.store, &session.id, &item.user, still_over).await?;
    }
    let history: Vec<ConversationItem> = page.rows.into_iter().map(|(_, item)| item).collect();
    let deltas: Arc<dyn DeltaSink> = lock(&inner.waiters)
        .get(&item.id)
        .map(|w| Arc::clone(&w.deltas))
        .unwrap_or_else(|| Arc::new(IgnoreDeltas));

    let typing = start_typing(inner, item.channel, &item.chat_id);
    let result = run_turn(Turn {
        model: inner.model.as_ref(),
        tools: &inner.tools,
        store: &inner.store,
        context,
        allowed_tools: &user_settings.tools,
        system: prompt.text,
        history,
        user_text: item.text.clone(),
        max_iterations: inner.settings.max_tool_iterations,
        deltas: deltas.as_ref(),
        log_tool_calls: inner.settings.log_tool_calls,
        metrics: &inner.metrics,
        limits: &user_settings.limits,
        budget: Some(&guard),
    })
    .await;
    if let Some(typing) = typing {
        typing.abort();
    }

    let mut usage = compaction_usage;
    usage.extend(result.usage);
    let mut new_items = result.new_items;
    let elided = crate::limits::shrink_for_storage(
        &mut new_items,
        user_settings.limits.stored_bytes_per_turn,
    );
    if elided > 0 {
        tracing::info!(user = %item.user, bytes = elided, "turn shortened for storage (limits.storedKbPerTurn)");
    }
    let total = usage
        .iter()
        .fold(TokenUsage::default(), |sum, (_, _, u)| sum.plus(*u));
    let outbox = inner
        .store
        .complete_turn(TurnRecord {
            inbox_id: item.id,
            user: item.user.clone(),
            session_id: session.id,
            items: new_items,
            reply: pushed_reply(inner, &item, &result.reply),
            usage,
        })
        .await?;
    finish(inner, &item, outbox, result.reply, total).await;
    Ok(())
}

/// Starts the user's sandbox in the background while the model thinks, so a first `exec` in
/// this turn does not wait for a container to start. Best effort: a failure here surfaces
/// (and is reported properly) when `exec` itself runs.
fn prewarm_sandbox(inner: &Arc<Inner>, context: &ToolContext) {
    let Some(sandbox) = inner.sandbox.clone() else {
        return;
    };
    let request = context.exec_request(
        moltmate_core::sandbox::ExecCommand::Argv(vec!["true".to_string()]),
        Duration::from_secs(1),
    );
    inner.tasks.spawn(async move {
        if let Err(e) = sandbox.prewarm(&request).await {
            tracing::debug!(user = %request.user, error = %e, "sandbox prewarm failed");
        }
    });
}

/// The outbox row for a reply, when its channel pushes replies (Telegram). In-band channels
/// (terminal, web) get the reply from the waiter and read history from the transcript, so
/// they need no outbox row.
fn pushed_reply(
    inner: &Inner,
    item: &InboxItem,
    text: &str,
) -> Option<(ChannelKind, String, String)> {
    inner
        .channels
        .contains_key(&item.channel)
        .then(|| (item.channel, item.chat_id.clone(), text.to_string()))
}

/// Hands the committed reply to whoever waits for it and to the channel.
async fn finish(
    inner: &Arc<Inner>,
    item: &InboxItem,
    outbox: Option<i64>,
    reply: String,
    usage: TokenUsage,
) {
    if let Some(waiter) = lock(&inner.waiters).remove(&item.id) {
        let _ = waiter.reply.send(Reply {
            text: reply.clone(),
            usage,
        });
    }
    if let Some(id) = outbox {
        let outbox_item = OutboxItem {
            id,
            inbox_id: Some(item.id),
            user: Some(item.user.clone()),
            channel: item.channel,
            chat_id: item.chat_id.clone(),
            text: reply,
        };
        deliver(inner, outbox_item).await;
    }
}

fn start_typing(
    inner: &Arc<Inner>,
    channel: ChannelKind,
    chat_id: &str,
) -> Option<tokio::task::JoinHandle<()>> {
    let channel = Arc::clone(inner.channels.get(&channel)?);
    let chat_id = chat_id.to_string();
    Some(tokio::spawn(async move {
        loop {
            if let Err(e) = channel.send_typing(&chat_id).await {
                tracing::debug!(error = %e, "typing indicator failed");
            }
            tokio::time::sleep(TYPING_INTERVAL).await;
        }
    }))
}

/// Sends one outbox row: `sending` is committed before the channel sees it, so a crash in
/// between never sends it twice (at-most-once; the reply stays in the transcript either way).
async fn deliver(inner: &Inner, item: OutboxItem) {
    let Some(channel) = inner.channels.get(&item.channel) else {
        // In-band channels (local chat, web) got the reply from the waiter or read it from the
        // transcript; there is nothing to push.
        if let Err(e) = inner.store.set_outbox_state(item.id, "stored", None).await {
            tracing::error!(error = %e, "could not update the outbox");
        }
        return;
    };
    match inner.store.claim_outbox(item.id).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, "could not claim a reply for sending; it will be sent after restart");
            return;
        }
    }
    let (state, detail) = match channel.send_text(&item.chat_id, &item.text).await {
        Ok(()) => {
            inner.metrics.replies_sent.inc();
            ("sent", None)
        }
        Err(e) => {
            inner.metrics.replies_failed.inc();
            tracing::warn!(channel = %item.channel, error = %e, "reply could not be delivered");
            ("failed", Some(e.to_string()))
        }
    };
    if let Err(e) = inner.store.set_outbox_state(item.id, state, detail).await {
        tracing::error!(error = %e, "could not update the outbox");
    }
}
