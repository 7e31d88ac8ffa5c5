//! Pairing codes for unknown senders, with bounded work per stranger.
//!
//! A sender who is not let in costs at most one code (one row, one reply) per code lifetime:
//! while their code is pending they get nothing more. Pending codes are capped, overall and per
//! channel; past the cap a new sender gets no code and no reply, and nothing is stored for them.
//! Expired pending codes are deleted a day after they expire (until then `pairing approve` can
//! still say the code expired rather than that it never existed), so the table holds at most
//! about `cap × (1 + 24 h / ttl)` rows however many strangers write.

use crate::db::{new_pairing_code, now_millis, PairingRequest, PairingState, Store, StoreError};
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

/// What to do with a message from a sender who needs pairing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingOutcome {
    /// A new code: send it. This is the only reply the code ever gets.
    Created(PairingRequest),
    /// The sender already has a pending code and was sent it: send nothing.
    AlreadyPending(PairingRequest),
    /// Too many codes are pending: drop the sender silently; nothing was stored.
    AtCapacity {
        /// Which cap was hit: `total` or `channel`.
        cap: &'static str,
    },
}

impl Store {
    /// The sender's pending code, or a new one if the caps allow (see [`PairingOutcome`]).
    /// Deletes codes that expired more than [`EXPIRED_PAIRING_RETENTION`] ago.
    pub async fn pairing_for_stranger(
        &self,
        identity: &Identity,
        chat_id: &str,
        sender_name: Option<&str>,
        limits: PairingLimits,
    ) -> Result<PairingOutcome, StoreError> {
        let identity = identity.clone();
        let chat_id = chat_id.to_string();
        let sender_name = sender_name.map(bounded_name);
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_millis();
            let retention = i64::try_from(EXPIRED_PAIRING_RETENTION.as_millis()).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM pairing_requests WHERE state = 'pending' AND expires_at <= ?1",
                params![now.saturating_sub(retention)],
            )?;
            if let Some(request) = pending_request(&tx, &identity, now)? {
                tx.commit()?;
                return Ok(PairingOutcome::AlreadyPending(request));
            }
            let (total, on_channel): (i64, i64) = tx.query_row(
                "SELECT COUNT(*), COALESCE(SUM(channel = ?2), 0) FROM pairing_requests
                 WHERE state = 'pending' AND expires_at > ?1",
                params![now, identity.channel.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
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
            let request = insert_request(&tx, &identity, &chat_id, sender_name, now, limits.ttl)?;
            tx.commit()?;
            Ok(PairingOutcome::Created(request))
        })
        .await
    }

    /// Pending, unexpired codes on `channel` (all channels with `None`).
    pub async fn pending_pairing_count(
        &self,
        channel: Option<ChannelKind>,
    ) -> Result<usize, StoreError> {
        self.with(move |c| {
            let count: i64 = c.query_row(
                "SELECT COUNT(*) FROM pairing_requests
                 WHERE state = 'pending' AND expires_at > ?1 AND (?2 IS NULL OR channel = ?2)",
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
        .query_row(
            "SELECT code, chat_id, sender_name, created_at, expires_at FROM pairing_requests
             WHERE channel = ?1 AND peer = ?2 AND state = 'pending' AND expires_at > ?3
             ORDER BY created_at DESC LIMIT 1",
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
            .query_row(
                "SELECT 1 FROM pairing_requests WHERE code = ?1",
                params![code],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !taken {
            break;
        }
        code = new_pairing_code();
    }
    tx.execute(
        "INSERT INTO pairing_requests (code, channel, peer, chat_id, sender_name, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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

    #[tokio::test]
    async fn a_stranger_gets_one_code_and_then_nothing_while_it_is_pending() {
        let store = Store::open_in_memory().unwrap();
        let eve = who(ChannelKind::Telegram, "42");
        let PairingOutcome::Created(first) = store
            .pairing_for_stranger(&eve, "42", Some("Eve"), limits(10, 10))
            .await
            .unwrap()
        else {
            panic!("the first message creates a code");
        };
        for _ in 0..5 {
            assert_eq!(
                store
                    .pairing_for_stranger(&eve, "42", Some("Eve"), limits(10, 10))
                    .await
                    .unwrap(),
                PairingOutcome::AlreadyPending(first.clone())
            );
        }
        assert_eq!(store.pending_pairing_count(None).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn pending_codes_stop_at_the_total_and_the_channel_cap() {
        let store = Store::open_in_memory().unwrap();
        for peer in 0..3 {
            let outcome = store
                .pairing_for_stranger(
                    &who(ChannelKind::Telegram, &peer.to_string()),
                    "c",
                    None,
                    limits(5, 3),
                )
                .await
                .unwrap();
            assert!(matches!(outcome, PairingOutcome::Created(_)), "{outcome:?}");
        }
        let outcome = store
            .pairing_for_stranger(&who(ChannelKind::Telegram, "99"), "c", None, limits(5, 3))
            .await
            .unwrap();
        assert_eq!(outcome, PairingOutcome::AtCapacity { cap: "channel" });
        for peer in 0..2 {
            let outcome = store
                .pairing_for_stranger(
                    &who(ChannelKind::Signal, &peer.to_string()),
                    "c",
                    None,
                    limits(5, 3),
                )
                .await
                .unwrap();
            assert!(matches!(outcome, PairingOutcome::Created(_)), "{outcome:?}");
        }
        let outcome = store
            .pairing_for_stranger(&who(ChannelKind::Signal, "9"), "c", None, limits(5, 3))
            .await
            .unwrap();
        assert_eq!(outcome, PairingOutcome::AtCapacity { cap: "total" });
        assert_eq!(store.pending_pairing_count(None).await.unwrap(), 5);
        assert_eq!(
            store
                .pending_pairing_count(Some(ChannelKind::Telegram))
                .await
                .unwrap(),
            3
        );
        // A stranger who already has a code still counts as pending, not as over the cap.
        let outcome = store
            .pairing_for_stranger(&who(ChannelKind::Telegram, "0"), "c", None, limits(5, 3))
            .await
            .unwrap();
        assert!(matches!(outcome, PairingOutcome::AlreadyPending(_)));
    }

    #[tokio::test]
    async fn long_expired_codes_are_deleted_and_names_are_bounded() {
        let store = Store::open_in_memory().unwrap();
        let long_name = "x\n".repeat(10_000);
        let outcome = store
            .pairing_for_stranger(
                &who(ChannelKind::Telegram, "1"),
                "1",
                Some(&long_name),
                PairingLimits {
                    ttl: Duration::ZERO,
                    ..limits(5, 5)
                },
            )
            .await
            .unwrap();
        let PairingOutcome::Created(request) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            request.sender_name.as_deref().map(str::len),
            Some(MAX_SENDER_NAME_CHARS)
        );
        // Backdate it past the retention; the next stranger's request deletes it.
        store
            .with(|c| {
                c.execute(
                    "UPDATE pairing_requests SET expires_at = expires_at - ?1",
                    params![EXPIRED_PAIRING_RETENTION.as_millis() as i64 + 1],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        store
            .pairing_for_stranger(&who(ChannelKind::Telegram, "2"), "2", None, limits(5, 5))
            .await
            .unwrap();
        let rows: i64 = store
            .with(|c| Ok(c.query_row("SELECT COUNT(*) FROM pairing_requests", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(rows, 1);
    }
}
