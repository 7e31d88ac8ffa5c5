//! Per-user workers: one task per active user answers that user's inbox rows strictly in
//! order; different users run concurrently (bounded by the turn semaphore).
//!
//! A turn's filesystem steps go through [`super::files`] (off the runtime, with a deadline).
//! When one fails or overruns, the user is answered with a clear message and the row is
//! finished — not retried, since the same files would fail the same way on every retry and
//! after every restart. Only storage errors leave a row pending for a retry.

use super::delivery::{discard, finish, pushed_reply, start_typing};
use super::files::{self, PersonaFiles};
use super::{lock, Inner, WorkerSlot};
use crate::agent::{run_turn, Turn};
use crate::onboarding::{self, Answer};
use crate::prompt::Skipped;
use crate::session::{compact, estimate_rows, estimate_tokens, Compaction};
use moltmate_core::model::{ConversationItem, DeltaSink, IgnoreDeltas, TokenUsage};
use moltmate_core::sandbox::{SandboxIds, WorkspaceAccess};
use moltmate_core::tool::ToolContext;
use moltmate_core::{ChannelKind, UserId};
use moltmate_store::{Completion, InboxItem, InboxState, StoreError, TurnRecord};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

/// Inbox rows a worker reads at once.
const BATCH: usize = 16;

/// How often a worker looks again when another process (`moltmate chat`) holds the user.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// Why a turn did not complete.
#[derive(Debug, thiserror::Error)]
pub(super) enum TurnError {
    /// The database failed; the row stays pending and is retried with backoff.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file step failed or overran its deadline. The user is answered with `user_message`
    /// and the row is finished.
    #[error("{detail}")]
    Files {
        user_message: String,
        detail: String,
    },
}

impl TurnError {
    /// Whether the row should stay pending and be tried again.
    pub(super) fn is_retryable(&self) -> bool {
        match self {
            TurnError::Store(_) => true,
            TurnError::Files { .. } => false,
        }
    }
}

/// How often a message whose turn fails with a database error that waiting cannot fix
/// (anything but busy/locked: a corrupt or unreadable row, an integer overflow) is tried before
/// it is answered with [`internal_failure`] and finished, so no row is retried forever.
const MAX_ATTEMPTS_ON_PERSISTENT_ERROR: u32 = 3;

/// What a worker remembers while it lives.
#[derive(Default)]
struct WorkerState {
    /// Skipped files already in the operator's log (each is logged at `warn` once).
    reported: HashSet<String>,
    /// Sandbox prewarms started by this worker's turns: aborted with the worker (an ended
    /// user's prewarm must not create a container after their sandboxes were removed).
    prewarms: Vec<AbortOnDropHandle<()>>,
    /// The current session's rows, so a turn reads only what was added since the last one.
    history: Option<moltmate_store::HistoryCache>,
    /// The inbox row whose turn failed last and how often in a row.
    failing: Option<(i64, u32)>,
}

impl WorkerState {
    /// Counts a failed attempt at `row`; true when it should not be tried again.
    fn give_up(&mut self, row: i64, error: &TurnError) -> bool {
        let attempts = match self.failing {
            Some((id, n)) if id == row => n.saturating_add(1),
            _ => 1,
        };
        self.failing = Some((row, attempts));
        let transient = match error {
            TurnError::Store(e) => e.is_retryable(),
            TurnError::Files { .. } => false,
        };
        !transient && attempts >= MAX_ATTEMPTS_ON_PERSISTENT_ERROR
    }
}

/// The answer to a message that could not be handled because of a persistent internal error.
fn internal_failure(language: Option<&str>) -> String {
    if language.is_some_and(|l| l.starts_with("de")) {
        "Entschuldigung, bei dieser Nachricht ist ein interner Fehler aufgetreten. Bitte versuche es später noch einmal.".to_string()
    } else {
        "Sorry, an internal error stopped me from answering this message. Please try again later."
            .to_string()
    }
}

/// Starts the user's worker, or wakes it. A user being removed or reset gets none: their
/// messages wait in the inbox until the ending settles (see `user_events`).
pub(super) fn wake_worker(inner: &Arc<Inner>, user: &UserId) {
    let mut workers = lock(&inner.workers);
    if let Some(slot) = workers.get(user) {
        slot.dirty.store(true, Ordering::SeqCst);
        slot.notify.notify_one();
        return;
    }
    if inner.endings.is_held(user) {
        return;
    }
    let slot = Arc::new(WorkerSlot {
        notify: Notify::new(),
        dirty: AtomicBool::new(true),
        task: std::sync::Mutex::new(None),
    });
    let inner_for_task = Arc::clone(inner);
    let for_task = (user.clone(), Arc::clone(&slot));
    // Spawned under the `workers` lock, so the task cannot leave the map before it is in it.
    let task = inner
        .tasks
        .spawn(async move { worker(inner_for_task, for_task.0, for_task.1).await });
    *lock(&slot.task) = Some(task);
    workers.insert(user.clone(), slot);
    inner.metrics.active_users.set(workers.len() as i64);
}

/// Takes the worker's slot out of the map, if it is still this worker's.
fn leave(inner: &Inner, user: &UserId, slot: &Arc<WorkerSlot>) {
    let mut workers = lock(&inner.workers);
    if workers.get(user).is_some_and(|s| Arc::ptr_eq(s, slot)) {
        workers.remove(user);
    }
    inner.metrics.active_users.set(workers.len() as i64);
}

/// Takes the user's lock without holding a thread while another process has it: a
/// non-blocking `flock`, polled. `None` on shutdown.
///
/// It runs on the runtime: the lock file is in the gateway's own `locks/` directory (no user
/// or sandbox reaches it), opened non-blocking and not through a link, and `LOCK_NB` never
/// waits. On the blocking pool it cost two thread hand-overs per message.
async fn take_user_lock(
    inner: &Arc<Inner>,
    user: &UserId,
) -> Result<Option<moltmate_store::homes::UserLock>, String> {
    loop {
        let taken = inner.homes.try_lock_user(user).map_err(|e| e.to_string())?;
        if let Some(lock) = taken {
            return Ok(Some(lock));
        }
        tokio::select! {
            _ = tokio::time::sleep(LOCK_POLL) => {}
            _ = inner.shutdown.cancelled() => return Ok(None),
        }
    }
}

async fn worker(inner: Arc<Inner>, user: UserId, slot: Arc<WorkerSlot>) {
    let mut backoff = Duration::from_millis(250);
    let mut state = WorkerState::default();
    loop {
        loop {
            if inner.shutdown.is_cancelled() {
                leave(&inner, &user, &slot);
                return;
            }
            // Cleared before the read: a message stored after the read sets it again (its
            // accept calls `wake_worker` after the commit), one stored before is in the batch.
            slot.dirty.store(false, Ordering::SeqCst);
            let batch = match inner.store.pending_inbox(&user, BATCH).await {
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
            // A short batch was everything pending; unless a message came since, reading the
            // inbox again would only find it empty.
            let complete = batch.len() < BATCH;
            // False when the batch was left early (shutdown, an error): read the inbox again.
            let finished = 'batch: {
                for item in batch {
                    if inner.shutdown.is_cancelled() {
                        break 'batch false;
                    }
                    let _lock = match take_user_lock(&inner, &user).await {
                        Ok(Some(lock)) => lock,
                        Ok(None) => break 'batch false,
                        Err(e) => {
                            tracing::error!(user = %user, error = %e, "could not lock the user; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            break 'batch false;
                        }
                    };
                    match inner
                        .store
                        .inbox_state(item.id, inner.endings.handled())
                        .await
                    {
                        Ok(InboxState::Pending) => {}
                        Ok(InboxState::Done) => continue,
                        Ok(InboxState::UserEnding) => {
                            // Removed or reset a moment ago: nothing more runs for this user here;
                            // the watcher holds them until the ending settles, then starts afresh.
                            leave(&inner, &user, &slot);
                            return;
                        }
                        Err(e) => {
                            tracing::error!(user = %user, error = %e, "could not read the inbox; retrying");
                            break 'batch false;
                        }
                    }
                    let error = match handle_item(&inner, &item, &mut state).await {
                        Ok(()) => None,
                        Err(TurnError::Files {
                            user_message,
                            detail,
                        }) => {
                            tracing::warn!(user = %user, error = %detail, "a turn failed on the user's files; they were told");
                            answer_failure(&inner, &item, user_message).await.err()
                        }
                        Err(e) => Some(e),
                    };
                    if let Some(e) = error {
                        debug_assert!(e.is_retryable());
                        if state.give_up(item.id, &e) {
                            // A persistent error: the user is told and the row finished, so one
                            // broken row cannot hold the user's queue (and a core) for good.
                            tracing::error!(user = %user, error = %e, "could not finish a turn after {MAX_ATTEMPTS_ON_PERSISTENT_ERROR} attempts; answered with an error");
                            let text = internal_failure(item.language_code.as_deref());
                            if answer_failure(&inner, &item, text).await.is_ok() {
                                state.failing = None;
                                backoff = Duration::from_millis(250);
                                continue;
                            }
                        }
                        // The row stays pending and is retried: nothing accepted is dropped.
                        tracing::error!(user = %user, error = %e, "could not finish a turn; will retry");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        break 'batch false;
                    }
                    backoff = Duration::from_millis(250);
                }
                true
            };
            if complete && finished && !slot.dirty.load(Ordering::SeqCst) {
                break;
            }
        }
        tokio::select! {
            _ = slot.notify.notified() => {}
            _ = tokio::time::sleep(inner.settings.worker_idle) => {
                let mut workers = lock(&inner.workers);
                if !slot.dirty.load(Ordering::SeqCst) {
                    if workers.get(&user).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                        workers.remove(&user);
                    }
                    inner.metrics.active_users.set(workers.len() as i64);
                    return;
                }
            }
            _ = inner.shutdown.cancelled() => {
                leave(&inner, &user, &slot);
                return;
            }
        }
    }
}

/// Finishes a row whose turn failed for a reason retrying cannot fix, answering `text`.
async fn answer_failure(
    inner: &Arc<Inner>,
    item: &InboxItem,
    text: String,
) -> Result<(), TurnError> {
    let completion = inner
        .store
        .finish_inbox_with_claimed_reply(item.id, &item.user, pushed_reply(inner, item, &text))
        .await?;
    finish_or_discard(inner, item, completion, text, TokenUsage::default()).await;
    Ok(())
}

/// Hands a committed reply on; one whose row was gone (its user was removed or reset while it
/// was answered) is dropped.
async fn finish_or_discard(
    inner: &Arc<Inner>,
    item: &InboxItem,
    completion: Completion,
    text: String,
    usage: TokenUsage,
) {
    match completion {
        Completion::Committed(outbox) => finish(inner, item, outbox, text, usage).await,
        Completion::Discarded => discard(inner, item),
    }
}

/// The note added to a reply when some of the user's files were left out.
fn skipped_note(language: &str, skipped: &[Skipped]) -> String {
    let list = skipped
        .iter()
        .map(|s| format!("{} ({})", s.file, s.reason))
        .collect::<Vec<_>>()
        .join("; ");
    if language.starts_with("de") {
        format!(
            "⚠️ Ich habe Dateien von dir ausgelassen, weil ich sie nicht lesen konnte: {list}. \
             Ersetze sie durch normale Dateien (oder lösche sie), dann lese ich sie wieder."
        )
    } else {
        format!(
            "⚠️ I left out some of your files because I could not read them: {list}. \
             Replace them with normal files (or delete them) and I will read them again."
        )
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

/// Runs the onboarding conversation; `Some(reply)` when the message was part of it.
async fn onboarding_step(
    inner: &Arc<Inner>,
    item: &InboxItem,
    language: &str,
    ids: SandboxIds,
) -> Result<Option<String>, TurnError> {
    let Some(record) = inner.store.user(&item.user).await? else {
        return Ok(None);
    };
    let step = inner.store.onboarding_step(&item.user).await?;
    if step.is_none() && record.onboarded {
        return Ok(None);
    }
    files::home(inner, &item.user, ids).await?;
    let choices = files::personas(inner).await?;
    let reply = match step.as_deref() {
        None => {
            inner
                .store
                .set_onboarding(&item.user, Some("choose"), false)
                .await?;
            onboarding::menu(language, &choices)
        }
        Some("describe") => {
            files::apply_persona(
                inner,
                &item.user,
                ids,
                PersonaFiles::Custom(item.text.clone()),
            )
            .await?;
            inner.store.set_onboarding(&item.user, None, true).await?;
            onboarding::confirmation(language, None)
        }
        Some(_) => match onboarding::interpret_choice(&item.text, &choices) {
            Answer::WantsCustom => {
                inner
                    .store
                    .set_onboarding(&item.user, Some("describe"), record.onboarded)
                    .await?;
                onboarding::ask_for_description(language)
            }
            Answer::Persona(choice) => {
                let label = choice.label.clone();
                files::apply_persona(
                    inner,
                    &item.user,
                    ids,
                    PersonaFiles::Chosen(Box::new(choice)),
                )
                .await?;
                inner.store.set_onboarding(&item.user, None, true).await?;
                onboarding::confirmation(language, Some(&label))
            }
            Answer::Description(description) => {
                files::apply_persona(inner, &item.user, ids, PersonaFiles::Custom(description))
                    .await?;
                inner.store.set_onboarding(&item.user, None, true).await?;
                onboarding::confirmation(language, None)
            }
        },
    };
    Ok(Some(reply))
}

async fn handle_item(
    inner: &Arc<Inner>,
    item: &InboxItem,
    state: &mut WorkerState,
) -> Result<(), TurnError> {
    let language = item
        .language_code
        .clone()
        .unwrap_or_else(|| inner.settings.default_language.clone());
    // Borrowed for the turn (settings do not change while the gateway runs): a copy per
    // message was a visible share of its allocations.
    let user_settings = inner.settings.user_settings(&item.user, item.channel);
    let ids = super::sandbox_ids(inner, &item.user).await?;
    // Before anything of this message writes to the user's files (onboarding, tools, memory).
    let capped = files::cap_user_dir(inner, &item.user, ids, user_settings).await;
    // Files sent with the message: downloaded, checked and saved now, in the user's own worker.
    let prepared;
    let mut images = Vec::new();
    let mut notes = Vec::new();
    let item = if item.attachments.is_empty() {
        item
    } else {
        let writable = capped && !user_settings.read_only;
        let done = super::attachments::prepare(inner, item, writable, &language).await;
        images = done.images;
        notes = done.notes;
        if !done.has_content {
            // Nothing for a model to answer (a refused file without a caption): the notes are
            // the answer.
            let text = notes.join("\n\n");
            match inner
                .store
                .finish_inbox_with_claimed_reply(
                    item.id,
                    &item.user,
                    pushed_reply(inner, item, &text),
                )
                .await?
            {
                Completion::Committed(outbox) => {
                    finish(inner, item, outbox, text, TokenUsage::default()).await
                }
                Completion::Discarded => discard(inner, item),
            }
            return Ok(());
        }
        prepared = InboxItem {
            text: done.text,
            ..item.clone()
        };
        &prepared
    };
    // A reminder is never a command or an onboarding answer, whatever its text says.
    let command = match &item.reminder {
        Some(_) => String::new(),
        None => item
            .text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase(),
    };
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
            let choices = files::personas(inner).await?;
            Some(onboarding::menu(&language, &choices))
        }
        _ if inner.settings.onboarding_enabled && item.reminder.is_none() => {
            onboarding_step(inner, item, &language, ids).await?
        }
        "/start" => Some(help_text(&language)),
        _ => None,
    };
    if let Some(text) = command_reply {
        let completion = inner
            .store
            .finish_inbox_with_claimed_reply(item.id, &item.user, pushed_reply(inner, item, &text))
            .await?;
        finish_or_discard(inner, item, completion, text, TokenUsage::default()).await;
        return Ok(());
    }

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
    let zone = inner.settings.timezone(&item.user);
    if let Some(notice) = guard
        .admit(&periods, user_settings.limits.transcript_bytes)
        .await?
    {
        // A reminder over budget still reaches its user, as a plain notice: it is theirs, and
        // bounded by their reminder caps, so it is not throttled like budget notices.
        let (text, throttled) = match &item.reminder {
            Some(fire) => (
                crate::schedule::texts::plain_notice(fire, &notice, &language, zone),
                false,
            ),
            None => (notice, true),
        };
        let pushed = pushed_reply(inner, item, &text).filter(|_| {
            !throttled
                || inner
                    .notices
                    .budget_notice_due(&item.user, std::time::Instant::now())
        });
        let completion = inner
            .store
            .finish_inbox_with_claimed_reply(item.id, &item.user, pushed)
            .await?;
        finish_or_discard(inner, item, completion, text, TokenUsage::default()).await;
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
    // In sandbox mode "all", file tools see the sandbox's view of /workspace: the home, or for
    // `workspaceAccess: none` the user's scratch directory.
    let scratch_root = match (
        &inner.settings.sandbox_scratch_dir,
        user_settings.sandbox.workspace_access,
    ) {
        (Some(scratch), WorkspaceAccess::None) => Some(scratch.clone()),
        _ => None,
    };
    let (
        files::TurnDirs {
            home,
            family,
            tool_home,
        },
        mut prompt,
    ) = files::turn_files(
        inner,
        &item.user,
        ids,
        scratch_root,
        session.summary.clone(),
    )
    .await?;
    let deltas: Arc<dyn DeltaSink> = lock(&inner.waiters)
        .get(&item.id)
        .filter(|(owner, _)| owner == &item.user)
        .map(|(_, w)| Arc::clone(&w.deltas))
        .unwrap_or_else(|| Arc::new(IgnoreDeltas));
    let context = ToolContext {
        user: item.user.clone(),
        home: tool_home,
        session_id: session.id.clone(),
        family: family.clone(),
        read_only: user_settings.read_only
            || user_settings.sandbox.workspace_access == WorkspaceAccess::Ro
            || !capped,
        sandbox: user_settings.sandbox.clone(),
        sandbox_ids: ids,
        exec: user_settings.exec.clone(),
        outlet: file_outlet(inner, item, &deltas),
    };
    if inner.settings.prewarm_sandboxes && user_settings.tools.iter().any(|t| t == "exec") {
        state.prewarms.retain(|p| !p.is_finished());
        state.prewarms.extend(prewarm_sandbox(inner, &context));
    }
    let tools = turn_tools(inner, &item.user, user_settings);
    // History in a bounded page: the newest rows the context window can hold.
    let window = inner.settings.context_window_tokens;
    let page_bytes = |prompt: &str| crate::limits::history_budget(window, prompt, &item.text);
    let mut page = inner
        .store
        .history_page_cached(&mut state.history, &session.id, page_bytes(&prompt.text))
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
                tools: &tools,
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
            // Its older rows left the session; the next turn reads it afresh.
            state.history = None;
            compaction_usage = usage;
            prompt = files::system_prompt(inner, &home, family.as_ref(), Some(summary)).await?;
            page = inner
                .store
                .history_page(&session.id, page_bytes(&prompt.text))
                .await?;
        }
        let still_over = over(&page, &prompt.text);
        crate::limits::compaction_done(&inner.store, &session.id, &item.user, still_over).await?;
    }
    // The page's row ids go with it when it was lent from the kept history, so the provider
    // reuses the wire forms of rows it sent before (a compaction above reads a page afresh
    // and drops the kept history: then there is nothing to reuse).
    let stored = state
        .history
        .as_ref()
        .and_then(|c| c.lent_wire())
        .map(|wire| (page.rows.iter().map(|(id, _)| *id).collect(), wire));
    let history: Vec<ConversationItem> = page.rows.into_iter().map(|(_, item)| item).collect();
    for problem in &prompt.problems {
        if state.reported.insert(problem.to_string()) {
            tracing::warn!(user = %item.user, file = %problem.file, reason = %problem.reason, "a context file was skipped");
        } else {
            tracing::debug!(user = %item.user, file = %problem.file, reason = %problem.reason, "a context file was skipped");
        }
    }
    let skipped = std::mem::take(&mut prompt.problems);

    let offers_schedule = user_settings.tools.iter().any(|t| t == "schedule");
    let system = if offers_schedule {
        let now = inner.settings.clock.now();
        format!(
            "{}{}",
            prompt.text,
            crate::schedule::texts::time_note(now, zone)
        )
    } else {
        prompt.text
    };
    let user_text = match &item.reminder {
        Some(fire) => crate::schedule::texts::reminder_prompt(fire, zone),
        None => item.text.clone(),
    };
    let typing = start_typing(inner, item.channel, &item.chat_id);
    let result = run_turn(Turn {
        model: inner.model.as_ref(),
        tools: &tools,
        store: &inner.store,
        context,
        allowed_tools: &user_settings.tools,
        system,
        history,
        stored,
        user_text,
        images,
        max_iterations: inner.settings.max_tool_iterations,
        deltas: deltas.as_ref(),
        log_tool_calls: inner.settings.log_tool_calls,
        metrics: &inner.metrics,
        limits: &user_settings.limits,
        budget: Some(&guard),
    })
    .await;
    drop(typing);
    // The history's items go back to the cache they were lent from (no copy per turn).
    if let Some(cache) = state.history.as_mut() {
        cache.give_back(result.history);
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
    let mut reply = result.reply;
    if let Some(late) = item
        .reminder
        .as_ref()
        .and_then(|fire| crate::schedule::texts::late_marker(fire, &language, zone))
    {
        reply = format!("{reply}\n\n{late}");
    }
    if !notes.is_empty() {
        reply = format!("{}\n\n{reply}", notes.join("\n\n"));
    }
    if !skipped.is_empty() {
        reply = format!("{reply}\n\n{}", skipped_note(&language, &skipped));
    }
    let charge = guard.take_deferred();
    let completion = match inner
        .store
        .complete_turn_claimed(TurnRecord {
            inbox_id: item.id,
            user: item.user.clone(),
            session_id: session.id,
            items: new_items,
            reply: pushed_reply(inner, item, &reply),
            usage,
            charge: charge.clone(),
        })
        .await
    {
        Ok(completion) => completion,
        Err(e) => {
            // Rolled back with the turn; the model was called all the same.
            guard.charge_held(charge).await;
            return Err(e.into());
        }
    };
    finish_or_discard(inner, item, completion, reply, total).await;
    Ok(())
}

/// The tools of one turn: the gateway's, plus the `schedule` tool bound to this user, their
/// zone and their reminder cap when they may use it.
fn turn_tools(
    inner: &Arc<Inner>,
    user: &UserId,
    settings: &crate::settings::UserSettings,
) -> crate::agent::ToolBox {
    let mut tools = inner.tools.clone();
    if settings.tools.iter().any(|t| t == "schedule") {
        tools.register(Arc::new(crate::schedule::ScheduleTool {
            store: inner.store.clone(),
            user: user.clone(),
            zone: inner.settings.timezone(user),
            max_reminders: settings.limits.reminders,
            min_interval_minutes: inner.settings.reminder_min_interval_minutes,
            clock: inner.settings.clock.clone(),
            wake: Arc::clone(&inner.schedule_wake),
        }));
    }
    tools
}

/// Starts the user's sandbox in the background while the model thinks, so a first `exec` in
/// this turn does not wait for a container to start. Best effort: a failure here surfaces
/// (and is reported properly) when `exec` itself runs. The prewarm is aborted when the
/// returned handle is dropped (with the worker, when the user is removed).
fn prewarm_sandbox(inner: &Arc<Inner>, context: &ToolContext) -> Option<AbortOnDropHandle<()>> {
    let sandbox = inner.sandbox.clone()?;
    let request = context.exec_request(
        moltmate_core::sandbox::ExecCommand::Argv(vec!["true".to_string()]),
        Duration::from_secs(1),
    );
    Some(AbortOnDropHandle::new(inner.tasks.spawn(async move {
        if let Err(e) = sandbox.prewarm(&request).await {
            tracing::debug!(user = %request.user, error = %e, "sandbox prewarm failed");
        }
    })))
}

/// Where `send_file` puts files in this turn: the channel the message came from when it pushes
/// messages, else (web chat, API) the download area, telling the waiting caller about each link.
fn file_outlet(
    inner: &Inner,
    item: &InboxItem,
    deltas: &Arc<dyn DeltaSink>,
) -> Option<moltmate_core::tool::FileOutlet> {
    if let Some(channel) = inner.channels.get(&item.channel) {
        return Some(moltmate_core::tool::FileOutlet::Channel {
            channel: Arc::clone(channel),
            chat_id: item.chat_id.clone(),
        });
    }
    match item.channel {
        ChannelKind::Web => {
            inner
                .downloads
                .as_ref()
                .map(|area| moltmate_core::tool::FileOutlet::Download {
                    area: Arc::clone(area),
                    notify: Arc::clone(deltas),
                })
        }
        _ => None,
    }
}
