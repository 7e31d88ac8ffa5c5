//! Ending a user: what `moltmate users remove` and `users reset` do to the database, in one
//! transaction each, and the durable signal that tells a running gateway about it.
//!
//! The CLI is a separate process next to a running gateway (same database, WAL). It cannot
//! reach the gateway's memory, so the transaction that ends a user also appends a row to
//! `user_events`; the gateway polls that table (one primary-key range read every ~500 ms, off
//! the message path) and stops the user's worker, running turn, sandboxes and caches. When
//! the CLI has wiped the user's files it appends a `settled` event; until then the gateway
//! starts no worker for the user, so nothing of the new life runs on the old home.
//!
//! What each ending removes:
//!
//! | | remove | reset |
//! |---|---|---|
//! | user row, identities (config, paired, seen) | deleted | kept |
//! | sessions, transcripts, inbox (pending messages too), outbox | deleted | deleted |
//! | web sessions, login links, API tokens | deleted | deleted |
//! | download links (`send_file` on the web/API; files wiped by the CLI) | deleted | deleted |
//! | pending pairing codes of their identities | deleted | deleted |
//! | onboarding | — | starts again |
//! | budget counters (`usage_days`), stored-bytes counter | deleted | kept (spent is spent) |
//! | sandbox uid | retired (never given out again) | retired |
//! | `token_usage`, `audit_events` (the operator's records) | kept | kept |
//!
//! Credentials are also checked against the user's creation time when used
//! ([`crate::auth`]): a credential issued before the user row it names was created belongs to
//! an earlier user of that id and is refused, whatever path deleted the rows.

use crate::db::{now_millis, Store, StoreError};
use moltmate_core::UserId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Appended to the store's migrations (see `db::MIGRATIONS`).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE user_events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id  TEXT NOT NULL,
    kind     TEXT NOT NULL,
    at       INTEGER NOT NULL
);
CREATE INDEX user_events_user ON user_events(user_id, id);
CREATE TRIGGER web_sessions_of_deleted_users AFTER DELETE ON users BEGIN
    DELETE FROM web_sessions WHERE user_id = OLD.id;
END;
DELETE FROM web_sessions
    WHERE user_id IS NOT NULL AND user_id NOT IN (SELECT id FROM users);
"#;

/// Events older than this are deleted when a new one is written (the gateway needs them for
/// seconds; a week leaves the operator time to look).
const EVENT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// How a user ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `users remove`: nothing of the user stays but the operator's records.
    Remove,
    /// `users reset`: the user and their identities stay; everything they had starts over.
    Reset,
}

impl Ending {
    fn kind(self) -> UserEventKind {
        match self {
            Ending::Remove => UserEventKind::Removed,
            Ending::Reset => UserEventKind::Reset,
        }
    }
}

/// What a `user_events` row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserEventKind {
    /// The user was removed: stop everything of theirs.
    Removed,
    /// The user was reset: stop everything of theirs (they stay).
    Reset,
    /// Whoever ended the user has finished with their files: the user may run again.
    Settled,
}

impl UserEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UserEventKind::Removed => "removed",
            UserEventKind::Reset => "reset",
            UserEventKind::Settled => "settled",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "removed" => Some(UserEventKind::Removed),
            "reset" => Some(UserEventKind::Reset),
            "settled" => Some(UserEventKind::Settled),
            _ => None,
        }
    }

    /// Whether the event ends the user (rather than letting them run again).
    pub fn ends(self) -> bool {
        match self {
            UserEventKind::Removed | UserEventKind::Reset => true,
            UserEventKind::Settled => false,
        }
    }
}

/// One row of `user_events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    pub id: i64,
    pub user: UserId,
    pub kind: UserEventKind,
    /// Milliseconds since the epoch.
    pub at: i64,
}

/// What [`Store::end_user`] ended, for the operator's message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ended {
    /// The `user_events` row written with it.
    pub event_id: i64,
    pub web_sessions: usize,
    /// Login links not used yet and not expired.
    pub login_links: usize,
    /// API tokens not revoked.
    pub api_tokens: usize,
    /// Pending pairing codes of the user's identities.
    pub pairing_codes: usize,
    /// Messages that were waiting for an answer (dropped, never answered).
    pub pending_messages: usize,
    /// Reminders cancelled (removed with the user, or forgotten by a reset).
    pub reminders: usize,
}

/// Where an inbox row stands for the worker about to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxState {
    /// Waiting for its answer: go ahead.
    Pending,
    /// Answered (by another process) or gone: skip it.
    Done,
    /// Its user was removed or reset by an event the gateway has not handled yet: do nothing
    /// for this user until it has.
    UserEnding,
}

/// What became of a turn's (or a command reply's) commit.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Committed; the outbox id of a reply the channel pushes.
    Committed(Option<i64>),
    /// Nothing was written: the inbox row is gone (its user was removed or reset while it was
    /// answered) or was answered already.
    Discarded,
}

impl Completion {
    /// The outbox id of a committed reply.
    pub fn outbox(self) -> Option<i64> {
        match self {
            Completion::Committed(outbox) => outbox,
            Completion::Discarded => None,
        }
    }
}

/// Whether inbox row `id` still waits for its answer (inside a turn's commit transaction).
pub(crate) fn inbox_row_pending(c: &Connection, id: i64) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT done_at IS NULL FROM inbox WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?
            .unwrap_or(false),
    )
}

fn count(c: &Connection, sql: &str, values: impl rusqlite::Params) -> Result<usize, StoreError> {
    let n: i64 = c.query_row(sql, values, |r| r.get(0))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn insert_event(c: &Connection, user: &UserId, kind: UserEventKind) -> Result<i64, StoreError> {
    let now = now_millis();
    c.execute(
        "DELETE FROM user_events WHERE at < ?1",
        params![now - EVENT_RETENTION_MS],
    )?;
    c.execute(
        "INSERT INTO user_events (user_id, kind, at) VALUES (?1, ?2, ?3)",
        params![user.as_str(), kind.as_str(), now],
    )?;
    Ok(c.last_insert_rowid())
}

fn end_in(c: &mut Connection, user: &UserId, how: Ending) -> Result<Option<Ended>, StoreError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !crate::db::user_exists(&tx, user)? {
        return Ok(None);
    }
    let now = now_millis();
    let mut ended = Ended {
        web_sessions: count(
            &tx,
            "SELECT COUNT(*) FROM web_sessions WHERE user_id = ?1 AND expires_at > ?2",
            params![user.as_str(), now],
        )?,
        login_links: count(
            &tx,
            "SELECT COUNT(*) FROM login_links WHERE user_id = ?1 AND used_at IS NULL AND expires_at > ?2",
            params![user.as_str(), now],
        )?,
        api_tokens: count(
            &tx,
            "SELECT COUNT(*) FROM api_tokens WHERE user_id = ?1 AND revoked_at IS NULL",
            params![user.as_str()],
        )?,
        pairing_codes: count(
            &tx,
            "SELECT COUNT(*) FROM pairing_requests WHERE state = 'pending' AND (channel, peer) IN
               (SELECT channel, peer FROM identities WHERE user_id = ?1)",
            params![user.as_str()],
        )?,
        pending_messages: count(
            &tx,
            "SELECT COUNT(*) FROM inbox WHERE user_id = ?1 AND done_at IS NULL",
            params![user.as_str()],
        )?,
        reminders: 0,
        event_id: 0,
    };
    ended.reminders = crate::reminders::delete_user_reminders(&tx, user)?;
    let id = user.as_str();
    tx.execute(
        "DELETE FROM pairing_requests WHERE (channel, peer) IN
           (SELECT channel, peer FROM identities WHERE user_id = ?1)",
        params![id],
    )?;
    for statement in [
        "DELETE FROM inbox WHERE user_id = ?1",
        "DELETE FROM outbox WHERE user_id = ?1",
        "DELETE FROM transcript WHERE user_id = ?1",
        "DELETE FROM sessions WHERE user_id = ?1",
        "DELETE FROM web_sessions WHERE user_id = ?1",
        "DELETE FROM login_links WHERE user_id = ?1",
        "DELETE FROM api_tokens WHERE user_id = ?1",
        "DELETE FROM downloads WHERE user_id = ?1",
    ] {
        tx.execute(statement, params![id])?;
    }
    crate::db::retire_sandbox_ids(&tx, user)?;
    match how {
        Ending::Remove => {
            // Budget counters go with the user: a new user of the same id starts at zero.
            // The per-call `token_usage` and the audit log stay, as the operator's record.
            tx.execute("DELETE FROM usage_days WHERE user_id = ?1", params![id])?;
            tx.execute("DELETE FROM user_storage WHERE user_id = ?1", params![id])?;
            tx.execute("DELETE FROM users WHERE id = ?1", params![id])?;
        }
        Ending::Reset => {
            tx.execute(
                "UPDATE users SET onboarded = 0, onboarding_step = NULL WHERE id = ?1",
                params![id],
            )?;
        }
    }
    let detail = format!(
        "{} web session(s), {} login link(s), {} API token(s), {} pairing code(s), {} waiting message(s), {} reminder(s) ended",
        ended.web_sessions, ended.login_links, ended.api_tokens, ended.pairing_codes, ended.pending_messages, ended.reminders
    );
    tx.execute(
        "INSERT INTO audit_events (user_id, kind, outcome, detail, at) VALUES (?1, ?2, 'ok', ?3, ?4)",
        params![
            id,
            match how {
                Ending::Remove => "user_removed",
                Ending::Reset => "user_reset",
            },
            detail,
            now
        ],
    )?;
    ended.event_id = insert_event(&tx, user, how.kind())?;
    tx.commit()?;
    Ok(Some(ended))
}

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

/// Rows as events; a row that does not parse (written by a newer release, or damaged) is
/// skipped with a warning rather than stopping every later event.
fn events(rows: Vec<(i64, String, String, i64)>) -> Vec<UserEvent> {
    rows.into_iter()
        .filter_map(|(id, user, kind, at)| {
            let parsed = UserId::new(user)
                .ok()
                .zip(UserEventKind::parse(&kind))
                .map(|(user, kind)| UserEvent { id, user, kind, at });
            if parsed.is_none() {
                tracing::warn!(event = id, "ignoring a user event that does not parse");
            }
            parsed
        })
        .collect()
}

impl Store {
    /// Ends `user` in one transaction (see the module docs for what each [`Ending`] removes),
    /// together with a `user_events` row a running gateway acts on and an audit row. `None`
    /// when there is no such user (nothing is written).
    pub async fn end_user(&self, user: &UserId, how: Ending) -> Result<Option<Ended>, StoreError> {
        let user = user.clone();
        self.with(move |c| end_in(c, &user, how)).await
    }

    /// Says that `user`'s ending is complete (their files are wiped, a reset user's new home
    /// is ready): a gateway holding the user back lets them run again.
    pub async fn settle_user(&self, user: &UserId) -> Result<i64, StoreError> {
        let user = user.clone();
        self.with(move |c| insert_event(c, &user, UserEventKind::Settled))
            .await
    }

    /// The id of the newest user event (0 when there is none).
    pub async fn last_user_event_id(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT COALESCE(MAX(id), 0) FROM user_events", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
    }

    /// Events after `after`, oldest first, at most `limit`: one primary-key range read.
    pub async fn user_events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<UserEvent>, StoreError> {
        self.with(move |c| {
            let rows = c
                .prepare_cached(&format!(
                    "SELECT id, user_id, kind, at FROM user_events WHERE id > ?1 ORDER BY id LIMIT {}",
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ))?
                .query_map(params![after], event_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(events(rows))
        })
        .await
    }

    /// Ending events since `since` (ms) not yet followed by a `settled` event of the same
    /// user: users whose ending may still be under way (a gateway starting up holds them back).
    pub async fn unsettled_user_events(&self, since: i64) -> Result<Vec<UserEvent>, StoreError> {
        self.with(move |c| {
            let rows = c
                .prepare(
                    "SELECT e.id, e.user_id, e.kind, e.at FROM user_events e
                     WHERE e.at >= ?1 AND e.kind != 'settled'
                       AND NOT EXISTS (SELECT 1 FROM user_events s
                                       WHERE s.user_id = e.user_id AND s.id > e.id AND s.kind = 'settled')
                     ORDER BY e.id",
                )?
                .query_map(params![since], event_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(events(rows))
        })
        .await
    }

    /// Where inbox row `id` stands for a worker about to answer it. `handled` is the newest
    /// user event the gateway has acted on: an ending event of the row's user after it means
    /// the user is being removed or reset right now ([`InboxState::UserEnding`]). One read.
    pub async fn inbox_state(&self, id: i64, handled: i64) -> Result<InboxState, StoreError> {
        self.read(move |c| {
            let row: Option<(bool, bool)> = c
                .prepare_cached(
                    "SELECT i.done_at IS NULL,
                            EXISTS (SELECT 1 FROM user_events e
                                    WHERE e.user_id = i.user_id AND e.id > ?2 AND e.kind != 'settled')
                     FROM inbox i WHERE i.id = ?1",
                )?
                .query_row(params![id, handled], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(match row {
                None | Some((false, _)) => InboxState::Done,
                Some((true, true)) => InboxState::UserEnding,
                Some((true, false)) => InboxState::Pending,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    use std::time::Duration;

    fn message(peer: &str, external: &str) -> InboundMessage {
        InboundMessage {
            attachments: Vec::new(),
            sender: Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap()),
            chat_id: peer.into(),
            external_id: external.into(),
            cursor: None,
            text: "hi".into(),
            sender_name: None,
            language_code: None,
        }
    }

    async fn user_with_everything(store: &Store, name: &str, peer: &str) -> UserId {
        let user = UserId::new(name).unwrap();
        let identity = Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap());
        store
            .link_identity(&identity, &user, "pairing")
            .await
            .unwrap();
        store.issue_token(&user, None).await.unwrap();
        store
            .create_login_link(&user, Duration::from_secs(600))
            .await
            .unwrap();
        store
            .create_web_session(Some(&user), false, Duration::from_secs(600))
            .await
            .unwrap();
        store
            .insert_inbound(&message(peer, &format!("{name}-1")), &user)
            .await
            .unwrap();
        store
            .charge_usage(
                &user,
                "2030-01-01",
                crate::UsageCharge {
                    messages: 3,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        user
    }

    #[tokio::test]
    async fn remove_ends_every_credential_and_signals_the_gateway() {
        let store = Store::open_in_memory().unwrap();
        let anna = user_with_everything(&store, "anna", "1").await;
        let bob = user_with_everything(&store, "bob", "2").await;
        let ended = store
            .end_user(&anna, Ending::Remove)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                ended.web_sessions,
                ended.login_links,
                ended.api_tokens,
                ended.pending_messages
            ),
            (1, 1, 1, 1)
        );
        assert!(store.user(&anna).await.unwrap().is_none());
        let events = store.user_events_after(0, 10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].user.clone(), events[0].kind),
            (anna.clone(), UserEventKind::Removed)
        );
        assert_eq!(store.unsettled_user_events(0).await.unwrap().len(), 1);
        store.settle_user(&anna).await.unwrap();
        assert!(store.unsettled_user_events(0).await.unwrap().is_empty());
        // Bob keeps everything.
        assert!(store.user(&bob).await.unwrap().is_some());
        assert_eq!(store.pending_inbox(&bob, 10).await.unwrap().len(), 1);
        assert_eq!(store.list_tokens(Some(&bob)).await.unwrap().len(), 1);
        // Anna is gone, and a second removal finds nobody.
        assert!(store
            .end_user(&anna, Ending::Remove)
            .await
            .unwrap()
            .is_none());
        let totals = store
            .usage_totals(std::slice::from_ref(&anna), "2030-01-01", "2030-01")
            .await
            .unwrap();
        assert_eq!(totals.messages_today, 0, "budget counters went with her");
    }

    #[tokio::test]
    async fn reset_keeps_the_user_and_identities_and_ends_the_rest() {
        let store = Store::open_in_memory().unwrap();
        let anna = user_with_everything(&store, "anna", "1").await;
        let ended = store.end_user(&anna, Ending::Reset).await.unwrap().unwrap();
        assert_eq!((ended.api_tokens, ended.web_sessions), (1, 1));
        let record = store.user(&anna).await.unwrap().unwrap();
        assert_eq!(record.identities.len(), 1, "identities stay");
        assert!(store.list_tokens(Some(&anna)).await.unwrap().is_empty());
        assert!(store.pending_inbox(&anna, 10).await.unwrap().is_empty());
        let totals = store
            .usage_totals(std::slice::from_ref(&anna), "2030-01-01", "2030-01")
            .await
            .unwrap();
        assert_eq!(totals.messages_today, 3, "a reset does not refill budgets");
        let events = store.user_events_after(0, 10).await.unwrap();
        assert_eq!(events[0].kind, UserEventKind::Reset);
    }

    #[tokio::test]
    async fn inbox_state_sees_an_ending_the_gateway_has_not_handled() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        store.ensure_user(&anna, None).await.unwrap();
        let row = store
            .insert_inbound(&message("1", "a"), &anna)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.inbox_state(row, 0).await.unwrap(),
            InboxState::Pending
        );
        let ended = store.end_user(&anna, Ending::Reset).await.unwrap().unwrap();
        assert_eq!(store.inbox_state(row, 0).await.unwrap(), InboxState::Done);
        // A message accepted after the reset, before the gateway handled the event.
        let later = store
            .insert_inbound(&message("1", "b"), &anna)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.inbox_state(later, 0).await.unwrap(),
            InboxState::UserEnding
        );
        assert_eq!(
            store.inbox_state(later, ended.event_id).await.unwrap(),
            InboxState::Pending
        );
    }
}
