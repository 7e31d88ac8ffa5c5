//! Accepting a message: the access decision and one durable commit, nothing more.
//!
//! This runs on a channel's receive path (Telegram's poll loop, a web request), so it must stay
//! cheap and must not depend on anything a user controls: it touches the database only. The
//! user's home is created by their worker, off the runtime, before their first turn.

use super::delivery::deliver;
use super::worker::wake_worker;
use super::{lock, Inner, Waiter};
use crate::access::{AccessDecision, ChannelAccess, DmPolicy, KnownSender};
use moltmate_core::channel::{AcceptError, Accepted, InboundMessage};
use moltmate_core::{ChannelKind, Identity, UserId};
use moltmate_store::{AuditEvent, PairingOutcome, StoreError, StrangerMessage};
use std::sync::Arc;

/// Longest message text handed to a model; longer texts are cut with a note. Protects the
/// context window and the provider bill from a pasted novel.
const MAX_MESSAGE_CHARS: usize = 16_000;

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

pub(super) async fn accept(
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
            groups: false,
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
            if message.text.chars().count() > MAX_MESSAGE_CHARS {
                let cut: String = message.text.chars().take(MAX_MESSAGE_CHARS).collect();
                message.text = format!("{cut}\n\n[message cut at {MAX_MESSAGE_CHARS} characters]");
            }
            // The waiter is registered inside the row's transaction, before any worker can
            // read the row: registered after the insert returned, a worker still busy with
            // this user's previous message could answer the row first and find nobody waiting
            // (the caller then waited for ever; seen under load in the benchmark).
            let registered = Arc::new(std::sync::Mutex::new(None::<i64>));
            let ours = waiter.as_ref().map(|w| Arc::clone(&w.deltas));
            let stored = {
                let (inner, user, registered) =
                    (Arc::clone(inner), user.clone(), Arc::clone(&registered));
                move |inbox_id: i64| {
                    if let Some(waiter) = waiter {
                        lock(&inner.waiters).insert(inbox_id, (user, waiter));
                        *lock(&registered) = Some(inbox_id);
                    }
                }
            };
            // The insert and the worker's wake-up run in a task of their own: a caller that
            // goes away meanwhile (a web client closing its connection) must not cancel the
            // wake-up of a row that commits anyway, or the row would wait for the user's next
            // message.
            let storing = {
                let (inner, user) = (Arc::clone(inner), user.clone());
                inner.tasks.clone().spawn(async move {
                    let result = inner
                        .store
                        .insert_inbound_then(&message, &user, stored)
                        .await;
                    if let Ok(Some(_)) = result {
                        wake_worker(&inner, &user);
                    }
                    result
                })
            };
            let stored = storing
                .await
                .map_err(|e| AcceptError::Storage(format!("storing the message: {e}")))?;
            match stored {
                Err(e) => {
                    // Not committed: the id may be given to another row, so this caller's
                    // waiter goes (only this caller's: the id may be someone's already).
                    if let Some(inbox_id) = lock(&registered).take() {
                        let mut waiters = lock(&inner.waiters);
                        let is_ours = waiters.get(&inbox_id).is_some_and(|(_, w)| {
                            ours.as_ref().is_some_and(|d| Arc::ptr_eq(&w.deltas, d))
                        });
                        if is_ours {
                            waiters.remove(&inbox_id);
                        }
                    }
                    Err(storage(e))
                }
                Ok(None) => Ok(Accepted::Duplicate),
                Ok(Some(_)) => Ok(Accepted::Queued),
            }
        }
        AccessDecision::NeedsPairing => {
            // One code and one reply per pending sender, a cap on pending codes, all in one
            // transaction with the cursor: see `strangers`.
            let language = message.language_code.clone();
            let default_language = inner.settings.default_language.clone();
            let channel = identity.channel;
            let stranger = StrangerMessage {
                identity: identity.clone(),
                chat_id: message.chat_id,
                sender_name: message.sender_name,
                cursor: message.cursor,
            };
            let outcome = inner
                .store
                .pairing_for_stranger(
                    stranger,
                    inner.settings.pairing_limits(identity.channel),
                    move |code| pairing_text(code, language.as_deref(), &default_language, channel),
                )
                .await
                .map_err(storage)?;
            match outcome {
                PairingOutcome::Created { request, reply } => {
                    tracing::info!(identity = %request.identity, code = %request.code, "pairing requested");
                    let inner = Arc::clone(inner);
                    inner
                        .tasks
                        .clone()
                        .spawn(async move { deliver(&inner, reply).await });
                }
                PairingOutcome::AlreadyPending(_) => {}
                PairingOutcome::AtCapacity { cap } => {
                    inner.strangers.pairing_cap_reached(identity.channel, cap);
                }
            }
            Ok(Accepted::Refused)
        }
        AccessDecision::Refused => {
            // The first message of each sender per window is audited and logged, the rest
            // only counted: see `strangers`.
            if inner.strangers.should_audit_refusal(&identity) {
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
            }
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
