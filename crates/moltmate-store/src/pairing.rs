//! Pairing codes for unknown senders, with bounded work per stranger.
//!
//! A sender who is not let in costs at most one code (one row, one reply) per code lifetime:
//! while their code is pending they get nothing more. Pending codes are capped, overall and per
//! channel; past the cap a new sender gets no code and no reply, and nothing is stored for them.
//! Expired pending codes are deleted a day after they expire (until then `pairing approve` can
//! still say the code expired rather than that it never existed), so the table holds at most
//! about `cap × (1 + 24 h / ttl)` rows however many strangers write.

use crate::db::{
    insert_outbox, new_pairing_code, now_millis, upsert_cursor, OutboxItem, PairingRequest,
    PairingState, Store, StoreError,
};
use moltmate_core::{ChannelKind, Identity};
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use std::time::Duration;

/// How long an expired, undecided code is kept before it is deleted.
pub const EXPIRED_PAIRING_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Longest sender name stored with a pairing request (the name is the stranger's own text).
pub const MAX_SENDER_NAME_CHARS: usize = 128;

/// The bounds of [`Store::pairing_for_stranger`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairingLimits {
    /// How long a new code stays valid.
    pub ttl: Duration,
    /// Pending codes at most, over all channels.
    pub max_pending: usize,
    /// Pending codes at most on the sender's channel.
    pub max_pending_per_channel: usize,
}

/// A message from a sender who needs pairing, as [`Store::pairing_for_stranger`] takes it.
#[derive(Debug, Clone)]
pub struct StrangerMessage {
    pub identity: Identity,
    /// Where a reply goes.
    pub chat_id: String,
    pub sender_name: Option<String>,
    /// The channel cursor past this message, stored in the same transaction.
    pub cursor: Option<i64>,
}

/// What became of a message from a sender who needs pairing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingOutcome {
    /// A new code, and its reply queued in the outbox (send it): the only reply the code ever
    /// gets.
    Created {
        request: PairingRequest,
        reply: OutboxItem,
    },
    /// The sender already has a pending code and was sent it: nothing to send.
    AlreadyPending(PairingRequest),
    /// Too many codes are pending: the sender is dropped silently; nothing was stored for them.
    AtCapacity {
        /// Which cap was hit: `total` or `channel`.
        cap: &'static str,
    },
}

impl Store {
    /// Decides a message from a sender who needs pairing, in one transaction with the channel
    /// cursor (see [`PairingOutcome`]): their pending code (nothing to send), or, if the caps
    /// allow, a new code with the reply `reply_text(code)` queued in the outbox. Creating a code
    /// also deletes codes that expired more than [`EXPIRED_PAIRING_RETENTION`] ago.
    ///
    /// The common case under a flood (a stranger writing again, or one past the cap) reads and
    /// moves the cursor, nothing more.
    pub async fn pairing_for_stranger(
        &self,
        message: StrangerMessage,
        limits: PairingLimits,
        reply_text: impl FnOnce(&str) -> String + Send + 'static,
    ) -> Result<PairingOutcome, StoreError> {
        let StrangerMessage {
            identity,
            chat_id,
            sender_name,
            cursor,
        } = message;
        let sender_name = sender_name.as_deref().map(bounded_name);
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_millis();
            if let Some(cursor) = cursor {
                upsert_cursor(&tx, identity.channel, cursor)?;
            }
            if let Some(request) = pending_request(&tx, &identity, now)? {
                tx.commit()?;
                return Ok(PairingOutcome::AlreadyPending(request));
            }
            let (total, on_channel): (i64, i64) = tx
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(channel = ?2), 0) FROM pairing_requests
                 WHERE state = 'pending' AND expires_at > ?1",
                )?
                .query_row(params![now, identity.channel.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let at = |count: i64, cap: usize| usize::try_from(count).unwrap_or(usize::MAX) >= cap;
            let cap = if at(total, limits.max_pending) {
                Some("total")
            } else if at(on_channel, limits.max_pending_per_channel) {
                Some("channel")
            } else {
                None
            };
            if let Some(cap) = cap {
                tx.commit()?;
                return Ok(PairingOutcome::AtCapacity { cap });
            }
            let retention =
                i64::try_from(EXPIRED_PAIRING_RETENTION.as_millis()).unwrap_or(i64::MAX);
            tx.prepare_cached(
                "DELETE FROM pairing_requests WHERE state = 'pending' AND expires_at <= ?1",
            )?
            .execute(params![now.saturating_sub(retention)])?;
            // Replies to strangers belong to no user, so no user's answer prunes them: they go
            // here, with each new code, once sent and past the same retention as everyone's.
            let sent_before = now.saturating_sub(
                i64::try_from(crate::usage::ANSWERED_ROW_RETENTION.as_millis()).unwrap_or(i64::MAX),
            );
            tx.prepare_cached(
                "DELETE FROM outbox WHERE user_id IS NULL AND state <> 'pending' AND updated_at < ?1",
            )?
            .execute(params![sent_before])?;
            let request = insert_request(&tx, &identity, &chat_id, sender_name, now, limits.ttl)?;
            let text = reply_text(&request.code);
            let id = insert_outbox(&tx, None, None, identity.channel, &chat_id, &text)?;
            tx.commit()?;
            Ok(PairingOutcome::Created {
                request,
                reply: OutboxItem {
                    id,
                    inbox_id: None,
                    user: None,
                    channel: identity.channel,
                    chat_id,
                    text,
                },
            })
        })
        .await
    }

    /// Pending, unexpired codes on `channel` (all channels with `None`).
    pub async fn pending_pairing_count(
        &self,
        channel: Option<ChannelKind>,
    ) -> Result<usize, StoreError> {
        self.with(move |c| {
            let count: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM pairing_requests
                 WHERE state = 'pending' AND expires_at > ?1 AND (?2 IS NULL OR channel = ?2)",
                )?
                .query_row(
                    params![now_millis(), channel.map(ChannelKind::as_str)],
                    |r| r.get(0),
                )?;
            Ok(usize::try_from(count).unwrap_or(0))
        })
        .await
    }
}

fn bounded_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control())
        .take(MAX_SENDER_NAME_CHARS)
        .collect()
}

/// The sender's newest pending, unexpired request.
pub(crate) fn pending_request(
    tx: &Transaction<'_>,
    identity: &Identity,
    now: i64,
) -> Result<Option<PairingRequest>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT code, chat_id, sender_name, created_at, expires_at FROM pairing_requests
             WHERE channel = ?1 AND peer = ?2 AND state = 'pending' AND expires_at > ?3
             ORDER BY created_at DESC LIMIT 1",
        )?
        .query_row(
            params![identity.channel.as_str(), identity.peer.as_str(), now],
            |r| {
                Ok(PairingRequest {
                    code: r.get(0)?,
                    identity: identity.clone(),
                    chat_id: r.get(1)?,
                    sender_name: r.get(2)?,
                    created_at: r.get(3)?,
                    expires_at: r.get(4)?,
                    state: PairingState::Pending,
                })
            },
        )
        .optional()?)
}

/// Inserts a new pending request with a fresh code.
pub(crate) fn insert_request(
    tx: &Transaction<'_>,
    identity: &Identity,
    chat_id: &str,
    sender_name: Option<String>,
    now: i64,
    ttl: Duration,
) -> Result<PairingRequest, StoreError> {
    let expires_at = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    // Codes are random over 31^8 (~8.5e11); retry on the rare collision.
    let mut code = new_pairing_code();
    for _ in 0..8 {
        let taken = tx
            .prepare_cached("SELECT 1 FROM pairing_requests WHERE code = ?1")?
            .query_row(params![code], |_| Ok(()))
            .optional()?
            .is_some();
        if !taken {
            break;
        }
        code = new_pairing_code();
    }
    tx.prepare_cached("INSERT INTO pairing_requests (code, channel, peer, chat_id, sender_name, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?.execute(
        params![code, identity.channel.as_str(), identity.peer.as_str(), chat_id, sender_name, now, expires_at],
    )?;
    Ok(PairingRequest {
        code,
        identity: identity.clone(),
        chat_id: chat_id.to_string(),
        sender_name,
        created_at: now,
        expires_at,
        state: PairingState::Pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::PeerId;

    fn who(channel: ChannelKind, peer: &str) -> Identity {
        Identity::new(channel, PeerId::new(peer).unwrap())
    }

    fn limits(max_pending: usize, max_pending_per_channel: usize) -> PairingLimits {
        PairingLimits {
            ttl: Duration::from_secs(3600),
            max_pending,
            max_pending_per_channel,
        }
    }

    async fn ask(
        store: &Store,
        identity: Identity,
        name: Option<&str>,
        limits: PairingLimits,
    ) -> PairingOutcome {
        let message = StrangerMessage {
            chat_id: identity.peer.as_str().to_string(),
            identity,
            sender_name: name.map(str::to_string),
            cursor: Some(7),
        };
        store
            .pairing_for_stranger(message, limits, |code| format!("your code: {code}"))
            .await
            .unwrap()
    }

    async fn count(store: &Store, table: &'static str) -> i64 {
        store
            .with(move |c| {
                Ok(c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_stranger_gets_one_code_and_then_nothing_while_it_is_pending() {
        let store = Store::open_in_memory().unwrap();
        let eve = who(ChannelKind::Telegram, "42");
        let PairingOutcome::Created { request, reply } =
            ask(&store, eve.clone(), Some("Eve"), limits(10, 10)).await
        else {
            panic!("the first message creates a code");
        };
        assert_eq!(reply.text, format!("your code: {}", request.code));
        assert_eq!(reply.chat_id, "42");
        assert_eq!(store.pending_outbox(10).await.unwrap(), vec![reply]);
        for _ in 0..5 {
            assert_eq!(
                ask(&store, eve.clone(), Some("Eve"), limits(10, 10)).await,
                PairingOutcome::AlreadyPending(request.clone())
            );
        }
        assert_eq!(store.pending_pairing_count(None).await.unwrap(), 1);
        assert_eq!(count(&store, "outbox").await, 1, "one reply per code");
        assert_eq!(
            store.cursor(ChannelKind::Telegram).await.unwrap(),
            Some(7),
            "the cursor moves with every message"
        );
    }

    /// Regression: answered rows were pruned per user, and replies to strangers have no user,
    /// so every pairing reply's row (channel, chat id, times) stayed forever.
    #[tokio::test]
    async fn sent_replies_to_strangers_are_pruned_after_the_retention() {
        let store = Store::open_in_memory().unwrap();
        let PairingOutcome::Created { reply, .. } = ask(
            &store,
            who(ChannelKind::Telegram, "1"),
            None,
            limits(10, 10),
        )
        .await
        else {
            panic!("a code");
        };
        assert!(store.claim_outbox(reply.id).await.unwrap());
        let old = crate::db::now_millis()
            - i64::try_from(crate::usage::ANSWERED_ROW_RETENTION.as_millis()).unwrap()
            - 1_000;
        store
            .with(move |c| {
                c.execute("UPDATE outbox SET updated_at = ?1", [old])?;
                Ok(())
            })
            .await
            .unwrap();
        let _ = ask(
            &store,
            who(ChannelKind::Telegram, "2"),
            None,
            limits(10, 10),
        )
        .await;
        assert_eq!(
            count(&store, "outbox").await,
            1,
            "only the new code's reply is left"
        );
    }

    /// Regression: pairing-reply rows to strangers were pruned only with a later code, 30 days
    /// after they were sent; they are deleted once sent (or failed for good).
    #[tokio::test]
    async fn pairing_reply_rows_to_strangers_are_deleted_once_sent() {
        let store = Store::open_in_memory().unwrap();
        let mut replies = Vec::new();
        for peer in ["1", "2"] {
            let PairingOutcome::Created { reply, .. } = ask(
                &store,
                who(ChannelKind::Telegram, peer),
                None,
                limits(10, 10),
            )
            .await
            else {
                panic!("a code");
            };
            replies.push(reply);
        }
        assert!(store.claim_outbox(replies[0].id).await.unwrap());
        store
            .set_outbox_state(replies[0].id, "sent", None)
            .await
            .unwrap();
        assert_eq!(count(&store, "outbox").await, 1, "the sent reply is gone");
        assert!(store.claim_outbox(replies[1].id).await.unwrap());
        store
            .set_outbox_state(replies[1].id, "failed", Some("blocked".into()))
            .await
            .unwrap();
        assert_eq!(count(&store, "outbox").await, 0);
        // The codes themselves stay until they are decided or expire.
        assert_eq!(store.pending_pairing_count(None).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn pending_codes_stop_at_the_total_and_the_channel_cap() {
        let store = Store::open_in_memory().unwrap();
        for peer in 0..3 {
            let outcome = ask(
                &store,
                who(ChannelKind::Telegram, &peer.to_string()),
                None,
                limits(5, 3),
            )
            .await;
            assert!(
                matches!(outcome, PairingOutcome::Created { .. }),
                "{outcome:?}"
            );
        }
        let outcome = ask(&store, who(ChannelKind::Telegram, "99"), None, limits(5, 3)).await;
        assert_eq!(outcome, PairingOutcome::AtCapacity { cap: "channel" });
        for peer in 0..2 {
            let outcome = ask(
                &store,
                who(ChannelKind::Signal, &peer.to_string()),
                None,
                limits(5, 3),
            )
            .await;
            assert!(
                matches!(outcome, PairingOutcome::Created { .. }),
                "{outcome:?}"
            );
        }
        let outcome = ask(&store, who(ChannelKind::Signal, "9"), None, limits(5, 3)).await;
        assert_eq!(outcome, PairingOutcome::AtCapacity { cap: "total" });
        assert_eq!(store.pending_pairing_count(None).await.unwrap(), 5);
        assert_eq!(
            store
                .pending_pairing_count(Some(ChannelKind::Telegram))
                .await
                .unwrap(),
            3
        );
        assert_eq!(count(&store, "pairing_requests").await, 5);
        assert_eq!(count(&store, "outbox").await, 5);
        // A stranger who already has a code still counts as pending, not as over the cap.
        let outcome = ask(&store, who(ChannelKind::Telegram, "0"), None, limits(5, 3)).await;
        assert!(matches!(outcome, PairingOutcome::AlreadyPending(_)));
    }

    #[tokio::test]
    async fn long_expired_codes_are_deleted_and_names_are_bounded() {
        let store = Store::open_in_memory().unwrap();
        let long_name = "x\n".repeat(10_000);
        let outcome = ask(
            &store,
            who(ChannelKind::Telegram, "1"),
            Some(&long_name),
            PairingLimits {
                ttl: Duration::ZERO,
                ..limits(5, 5)
            },
        )
        .await;
        let PairingOutcome::Created { request, .. } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            request.sender_name.as_deref().map(str::len),
            Some(MAX_SENDER_NAME_CHARS)
        );
        // Backdate it past the retention; the next new code deletes it.
        store
            .with(|c| {
                c.prepare_cached("UPDATE pairing_requests SET expires_at = expires_at - ?1")?
                    .execute(params![EXPIRED_PAIRING_RETENTION.as_millis() as i64 + 1])?;
                Ok(())
            })
            .await
            .unwrap();
        ask(&store, who(ChannelKind::Telegram, "2"), None, limits(5, 5)).await;
        assert_eq!(count(&store, "pairing_requests").await, 1);
    }
}
