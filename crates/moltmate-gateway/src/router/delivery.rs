//! Handing committed replies to whoever waits for them and to their channel.

use super::{lock, Inner, Reply};
use moltmate_core::model::TokenUsage;
use moltmate_core::ChannelKind;
use moltmate_store::{InboxItem, OutboxItem};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

/// How often "typing..." is renewed while a turn runs (Telegram shows it for ~5 s).
const TYPING_INTERVAL: Duration = Duration::from_secs(4);

/// How long a turn runs before "typing..." is shown. A reply quicker than this needs no
/// indicator: it would arrive together with it, and the call would cost a channel API request
/// (counted by the messenger's rate limits) and gateway CPU on every message.
pub(super) const TYPING_DELAY: Duration = Duration::from_secs(1);

/// The outbox row for a reply, when its channel pushes replies (Telegram). In-band channels
/// (terminal, web) get the reply from the waiter and read history from the transcript, so
/// they need no outbox row.
pub(super) fn pushed_reply(
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
pub(super) async fn finish(
    inner: &Arc<Inner>,
    item: &InboxItem,
    outbox: Option<i64>,
    reply: String,
    usage: TokenUsage,
) {
    let waiter = {
        let mut waiters = lock(&inner.waiters);
        // Only the row's own user's caller: an entry of another user under this id (left by
        // a commit that failed) is not theirs to answer.
        match waiters.get(&item.id) {
            Some((owner, _)) if owner == &item.user => waiters.remove(&item.id),
            _ => None,
        }
    };
    if let Some((_, waiter)) = waiter {
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
        send_claimed(inner, outbox_item).await;
    }
}

/// Shows "typing..." once the turn has run for [`TYPING_DELAY`] and keeps it up until the
/// returned handle is dropped (also when the turn's task is aborted because its user was
/// removed).
pub(super) fn start_typing(
    inner: &Arc<Inner>,
    channel: ChannelKind,
    chat_id: &str,
) -> Option<AbortOnDropHandle<()>> {
    let channel = Arc::clone(inner.channels.get(&channel)?);
    let chat_id = chat_id.to_string();
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::time::sleep(TYPING_DELAY).await;
        loop {
            if let Err(e) = channel.send_typing(&chat_id).await {
                tracing::debug!(error = %e, "typing indicator failed");
            }
            tokio::time::sleep(TYPING_INTERVAL).await;
        }
    })))
}

/// A turn or command of a user who was removed or reset while it ran: nothing was committed,
/// nothing is delivered, and a caller still waiting gets no answer.
pub(super) fn discard(inner: &Inner, item: &InboxItem) {
    lock(&inner.waiters).remove(&item.id);
    tracing::info!(user = %item.user, "a message's user was removed or reset while it was answered; nothing of it was kept");
}

/// Sends one outbox row: `sending` is committed before the channel sees it, so a crash in
/// between never sends it twice (at-most-once; the reply stays in the transcript either way).
pub(super) async fn deliver(inner: &Inner, item: OutboxItem) {
    if !inner.channels.contains_key(&item.channel) {
        // In-band channels (local chat, web) got the reply from the waiter or read it from the
        // transcript; there is nothing to push.
        if let Err(e) = inner.store.set_outbox_state(item.id, "stored", None).await {
            tracing::error!(error = %e, "could not update the outbox");
        }
        return;
    }
    match inner.store.claim_outbox(item.id).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, "could not claim a reply for sending; it will be sent after restart");
            return;
        }
    }
    send_claimed(inner, item).await;
}

/// Sends an outbox row its caller has claimed (committed `sending`) and records the outcome.
async fn send_claimed(inner: &Inner, item: OutboxItem) {
    let Some(channel) = inner.channels.get(&item.channel) else {
        return;
    };
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
    // A user's reply: the outcome is a record for the operator, written with the next commit
    // (the row is `sending` already, so nothing can send it again). A stranger's (a pairing
    // reply) is deleted now: nothing of a stranger is kept past its delivery.
    let recorded = if item.user.is_some() {
        inner.store.set_outbox_state_later(item.id, state, detail)
    } else {
        inner.store.set_outbox_state(item.id, state, detail).await
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not update the outbox");
    }
}
