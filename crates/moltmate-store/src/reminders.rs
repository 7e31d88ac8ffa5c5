//! Reminders and scheduled messages (`schedule` tool): one row per active reminder, and the
//! one transaction that turns a due occurrence into an inbox row.
//!
//! * A reminder belongs to one user and is addressed by that user's own number (`#3`), from a
//!   per-user counter that only grows: a user never sees, guesses or reaches another user's
//!   reminders, and a cancelled number is never reused for a new one.
//! * `due_at` is the occurrence to deliver next (unix millis); `attempt_at` is when the
//!   scheduler next looks at it — the same, or later while the user's queue is full.
//! * Firing ([`Store::fire_reminder`]) is one durable transaction: the reminder still being
//!   there with the same `due_at`, the user's queue having room, the inbox row (its external
//!   id `reminder:<row id>:<due_at>` is unique, so one occurrence can never become two rows)
//!   and the reminder moving on to its next occurrence (or being deleted). After a crash either
//!   all of it happened — the inbox row is answered like any accepted message — or none.
//! * `users remove`/`reset` delete a user's reminders and counter
//!   ([`Store::cancel_user_schedules`], also inside `delete_user`/`wipe_user_history`).

use crate::db::{now_millis, Store, StoreError};
use moltmate_core::{ChannelKind, UserId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Appended to the store's migrations (see `db::MIGRATIONS`).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE reminders (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    number        INTEGER NOT NULL,
    text          TEXT NOT NULL,
    cron          TEXT,
    timezone      TEXT NOT NULL,
    due_at        INTEGER NOT NULL,
    attempt_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    fired         INTEGER NOT NULL DEFAULT 0,
    last_fired_at INTEGER,
    UNIQUE (user_id, number)
);
CREATE INDEX reminders_attempt ON reminders(attempt_at, id);
CREATE TABLE reminder_numbers (
    user_id TEXT PRIMARY KEY,
    last    INTEGER NOT NULL
);
ALTER TABLE inbox ADD COLUMN reminder TEXT;
"#;

/// Reminders listed at most (the per-user cap is far below).
const LIST_LIMIT: usize = 1_000;

/// A reminder to create. Validation (times, rules, caps on text) is the gateway's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReminder {
    pub user: UserId,
    pub text: String,
    /// The cron rule of a recurring reminder; `None` for a one-off.
    pub cron: Option<String>,
    /// IANA name of the time zone the times are meant in.
    pub timezone: String,
    /// First occurrence, unix millis.
    pub due_at: i64,
}

/// A stored reminder, as its user (and the operator) sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReminderRecord {
    /// The user's own number for it.
    pub number: i64,
    pub text: String,
    pub cron: Option<String>,
    pub timezone: String,
    /// Next occurrence, unix millis.
    pub due_at: i64,
    pub created_at: i64,
    /// Occurrences delivered so far (recurring reminders).
    pub fired: i64,
    pub last_fired_at: Option<i64>,
}

/// What creating a reminder did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(ReminderRecord),
    /// The user already has `cap` reminders.
    AtCap {
        cap: usize,
    },
}

/// A reminder the scheduler should look at now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueReminder {
    /// Row id (internal; users see `number`).
    pub id: i64,
    pub user: UserId,
    pub number: i64,
    pub text: String,
    pub cron: Option<String>,
    pub timezone: String,
    pub due_at: i64,
}

/// Marks an inbox row as a reminder's delivery; the worker phrases it as a turn (or a plain
/// notice when the user is over budget). Stored as JSON in `inbox.reminder`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderFire {
    /// The user's number of the reminder.
    pub number: i64,
    pub text: String,
    /// The occurrence delivered, unix millis.
    pub due_at: i64,
    /// When the scheduler turned it into this row, unix millis.
    pub fired_at: i64,
    pub timezone: String,
    pub cron: Option<String>,
    /// Further occurrences that passed while the gateway was down, folded into this one.
    pub missed: u32,
    /// The next occurrence of a recurring reminder, unix millis.
    pub next_at: Option<i64>,
    /// It was due while the gateway was not running (delivered after startup).
    #[serde(default)]
    pub after_downtime: bool,
}

/// One due occurrence to turn into an inbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FireRequest {
    /// The reminder's row id.
    pub id: i64,
    /// The occurrence fired; the row must still have it (else it changed or was cancelled).
    pub due_at: i64,
    pub now: i64,
    /// Recurring: the next occurrence; `None`: the reminder ends with this delivery.
    pub next_due: Option<i64>,
    pub missed: u32,
    /// It was due before the scheduler started (the gateway was down at its time).
    pub after_downtime: bool,
    /// `users.<id>.preferredChannel`.
    pub preferred: Option<ChannelKind>,
    /// Channels that push messages (Telegram); the others get the reminder in-band (it is in
    /// the conversation when the user opens it).
    pub pushable: Vec<ChannelKind>,
    /// When to look again if the user's queue is full.
    pub retry_at: i64,
}

/// What firing a reminder did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireOutcome {
    /// An inbox row for the user was committed; wake their worker.
    Fired { user: UserId, inbox_id: i64 },
    /// The row for this occurrence existed already (the reminder moved on all the same).
    AlreadyFired { user: UserId },
    /// The reminder was cancelled or changed meanwhile; nothing was done.
    Gone,
    /// The user's queue is full; the reminder waits until `retry_at` (nothing is dropped).
    QueueFull { user: UserId },
}

/// Where a reminder is delivered: channel, chat and the user's last language.
struct Target {
    channel: ChannelKind,
    chat_id: String,
    language: Option<String>,
}

fn parse_user(raw: String) -> Result<UserId, StoreError> {
    UserId::new(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReminderRecord> {
    Ok(ReminderRecord {
        number: r.get(0)?,
        text: r.get(1)?,
        cron: r.get(2)?,
        timezone: r.get(3)?,
        due_at: r.get(4)?,
        created_at: r.get(5)?,
        fired: r.get(6)?,
        last_fired_at: r.get(7)?,
    })
}

const RECORD_COLUMNS: &str =
    "number, text, cron, timezone, due_at, created_at, fired, last_fired_at";

/// Deletes every reminder of `user` and their numbering (remove, reset). Returns how many.
pub(crate) fn delete_user_reminders(c: &Connection, user: &UserId) -> Result<usize, StoreError> {
    let deleted = c.execute(
        "DELETE FROM reminders WHERE user_id = ?1",
        params![user.as_str()],
    )?;
    c.execute(
        "DELETE FROM reminder_numbers WHERE user_id = ?1",
        params![user.as_str()],
    )?;
    Ok(deleted)
}

/// The channel and chat a reminder of `user` goes to, in one read of what they last used:
/// the preferred channel if they can be reached there, else the channel of their last own
/// message; on a pushing channel only a chat that is one of the user's own identities (their
/// private chat, never a group chat or a chat that now belongs to someone else); else in-band.
fn delivery_target(
    c: &Connection,
    user: &UserId,
    preferred: Option<ChannelKind>,
    pushable: &[ChannelKind],
) -> Result<Target, StoreError> {
    let last: Option<(String, Option<String>)> = c
        .prepare_cached(
            "SELECT channel, language_code FROM inbox WHERE user_id = ?1 AND reminder IS NULL
             ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![user.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let language = last.as_ref().and_then(|(_, l)| l.clone());
    let last_channel = last.and_then(|(channel, _)| channel.parse::<ChannelKind>().ok());
    for channel in preferred.into_iter().chain(last_channel) {
        let last_chat: Option<String> = c
            .prepare_cached(
                "SELECT chat_id FROM inbox WHERE user_id = ?1 AND channel = ?2 AND reminder IS NULL
                 ORDER BY id DESC LIMIT 1",
            )?
            .query_row(params![user.as_str(), channel.as_str()], |r| r.get(0))
            .optional()?;
        if pushable.contains(&channel) {
            // Private chats only: the chat is the peer id of one of the user's identities.
            let peer: Option<String> = c
                .prepare_cached(
                    "SELECT peer FROM identities WHERE user_id = ?1 AND channel = ?2
                     ORDER BY (peer = ?3) DESC, created_at DESC, peer LIMIT 1",
                )?
                .query_row(
                    params![user.as_str(), channel.as_str(), last_chat.as_deref()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(peer) = peer {
                return Ok(Target {
                    channel,
                    chat_id: peer,
                    language,
                });
            }
        } else {
            return Ok(Target {
                channel,
                chat_id: last_chat.unwrap_or_else(|| user.as_str().to_string()),
                language,
            });
        }
    }
    // Nowhere to push: the reminder is answered into the conversation (the web chat shows it).
    Ok(Target {
        channel: ChannelKind::Web,
        chat_id: user.as_str().to_string(),
        language,
    })
}

impl Store {
    /// Creates a reminder for its user unless they already have `max_count`. The count and the
    /// insert are one transaction, so parallel calls cannot pass the cap.
    pub async fn create_reminder(
        &self,
        reminder: NewReminder,
        max_count: usize,
    ) -> Result<CreateOutcome, StoreError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let count: i64 = tx.query_row(
                "SELECT COUNT(*) FROM reminders WHERE user_id = ?1",
                params![reminder.user.as_str()],
                |r| r.get(0),
            )?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= max_count {
                return Ok(CreateOutcome::AtCap { cap: max_count });
            }
            let number: i64 = tx.query_row(
                "INSERT INTO reminder_numbers (user_id, last) VALUES (?1, 1)
                 ON CONFLICT (user_id) DO UPDATE SET last = last + 1 RETURNING last",
                params![reminder.user.as_str()],
                |r| r.get(0),
            )?;
            let now = now_millis();
            tx.execute(
                "INSERT INTO reminders (user_id, number, text, cron, timezone, due_at, attempt_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
                params![
                    reminder.user.as_str(),
                    number,
                    reminder.text,
                    reminder.cron,
                    reminder.timezone,
                    reminder.due_at,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(CreateOutcome::Created(ReminderRecord {
                number,
                text: reminder.text,
                cron: reminder.cron,
                timezone: reminder.timezone,
                due_at: reminder.due_at,
                created_at: now,
                fired: 0,
                last_fired_at: None,
            }))
        })
        .await
    }

    /// The user's reminders, next due first.
    pub async fn list_reminders(&self, user: &UserId) -> Result<Vec<ReminderRecord>, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM reminders WHERE user_id = ?1
                 ORDER BY due_at, number LIMIT {LIST_LIMIT}"
            ))?;
            let rows = statement
                .query_map(params![user.as_str()], record_from_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Cancels the user's reminder `number`. False when they have none with that number —
    /// including when another user has one: numbers are per user.
    pub async fn cancel_reminder(&self, user: &UserId, number: i64) -> Result<bool, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(c.execute(
                "DELETE FROM reminders WHERE user_id = ?1 AND number = ?2",
                params![user.as_str(), number],
            )? == 1)
        })
        .await
    }

    /// Cancels every reminder of `user` (`users remove`/`reset`). Returns how many there were.
    pub async fn cancel_user_schedules(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = delete_user_reminders(&tx, &user)?;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    /// How many reminders each user has (for the operator), by user id.
    pub async fn reminder_counts(&self) -> Result<HashMap<String, usize>, StoreError> {
        self.with(|c| {
            let mut statement =
                c.prepare("SELECT user_id, COUNT(*) FROM reminders GROUP BY user_id")?;
            let rows = statement
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows
                .into_iter()
                .map(|(user, n)| (user, usize::try_from(n).unwrap_or(0)))
                .collect())
        })
        .await
    }

    /// Reminders to look at now (`attempt_at <= now`), oldest first, at most `limit`.
    pub async fn due_reminders(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<DueReminder>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT id, user_id, number, text, cron, timezone, due_at FROM reminders
                 WHERE attempt_at <= ?1 ORDER BY attempt_at, id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(params![now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })?;
            let mut due = Vec::new();
            for row in rows {
                let (id, user, number, text, cron, timezone, due_at) = row?;
                due.push(DueReminder {
                    id,
                    user: parse_user(user)?,
                    number,
                    text,
                    cron,
                    timezone,
                    due_at,
                });
            }
            Ok(due)
        })
        .await
    }

    /// When the scheduler must look next (the earliest `attempt_at`), if any reminder exists.
    pub async fn next_reminder_attempt(&self) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            Ok(c.prepare_cached("SELECT MIN(attempt_at) FROM reminders")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?)
        })
        .await
    }

    /// Turns one due occurrence into an inbox row for its user, in one durable transaction
    /// (see the module docs). `queue_cap` gives the user's `queuedMessages` for the channel
    /// the reminder goes to; a full queue defers the reminder to `retry_at`.
    pub async fn fire_reminder(
        &self,
        request: FireRequest,
        queue_cap: impl Fn(&UserId, ChannelKind) -> usize + Send + 'static,
    ) -> Result<FireOutcome, StoreError> {
        // Inside the durable group's transaction (see `Store::durably`): no transaction of its
        // own; returning `Ok` commits this work, an error rolls back only it.
        self.durably(move |c| {
            let tx = c;
            let row: Option<(String, i64, String, Option<String>, String)> = tx
                .query_row(
                    "SELECT user_id, number, text, cron, timezone FROM reminders
                     WHERE id = ?1 AND due_at = ?2",
                    params![request.id, request.due_at],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            let Some((user, number, text, cron, timezone)) = row else {
                return Ok(FireOutcome::Gone);
            };
            let user = parse_user(user)?;
            let target = delivery_target(tx, &user, request.preferred, &request.pushable)?;
            let waiting: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM inbox WHERE user_id = ?1 AND done_at IS NULL",
                )?
                .query_row(params![user.as_str()], |r| r.get(0))?;
            if usize::try_from(waiting).unwrap_or(usize::MAX) >= queue_cap(&user, target.channel) {
                tx.execute(
                    "UPDATE reminders SET attempt_at = ?2 WHERE id = ?1",
                    params![request.id, request.retry_at],
                )?;
                return Ok(FireOutcome::QueueFull { user });
            }
            let fire = ReminderFire {
                number,
                text: text.clone(),
                due_at: request.due_at,
                fired_at: request.now,
                timezone,
                cron,
                missed: request.missed,
                next_at: request.next_due,
                after_downtime: request.after_downtime,
            };
            let marker =
                serde_json::to_string(&fire).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO inbox (channel, external_id, user_id, chat_id, text, language_code, received_at, reminder)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    target.channel.as_str(),
                    format!("reminder:{}:{}", request.id, request.due_at),
                    user.as_str(),
                    target.chat_id,
                    text,
                    target.language,
                    request.now,
                    marker
                ],
            )?;
            let inbox_id = (inserted == 1).then(|| tx.last_insert_rowid());
            match request.next_due {
                Some(next) => {
                    tx.execute(
                        "UPDATE reminders SET due_at = ?2, attempt_at = ?2, fired = fired + 1, last_fired_at = ?3
                         WHERE id = ?1",
                        params![request.id, next, request.now],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM reminders WHERE id = ?1", params![request.id])?;
                }
            }
            Ok(match inbox_id {
                Some(inbox_id) => FireOutcome::Fired { user, inbox_id },
                None => FireOutcome::AlreadyFired { user },
            })
        })
        .await
    }

    /// How many reminders exist over all users.
    pub async fn reminder_total(&self) -> Result<usize, StoreError> {
        self.with(|c| {
            let n: i64 = c.query_row("SELECT COUNT(*) FROM reminders", [], |r| r.get(0))?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{Identity, PeerId};

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    fn new(who: &UserId, text: &str, due_at: i64) -> NewReminder {
        NewReminder {
            user: who.clone(),
            text: text.to_string(),
            cron: None,
            timezone: "Europe/Berlin".to_string(),
            due_at,
        }
    }

    async fn said(store: &Store, who: &UserId, peer: &str, external: &str) {
        let identity = Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap());
        store.link_identity(&identity, who, "seen").await.unwrap();
        let id = store
            .insert_inbound(
                &InboundMessage {
                    attachments: Vec::new(),
                    sender: identity,
                    chat_id: peer.to_string(),
                    external_id: external.to_string(),
                    cursor: None,
                    text: "hi".into(),
                    sender_name: None,
                    language_code: Some("de".into()),
                },
                who,
            )
            .await
            .unwrap()
            .unwrap();
        let _ = store.finish_inbox_with_reply(id, who, None).await.unwrap();
    }

    fn fire(id: i64, due_at: i64, now: i64, next_due: Option<i64>) -> FireRequest {
        FireRequest {
            id,
            due_at,
            now,
            next_due,
            missed: 0,
            after_downtime: false,
            preferred: None,
            pushable: vec![ChannelKind::Telegram],
            retry_at: now + 60_000,
        }
    }

    fn created(outcome: CreateOutcome) -> ReminderRecord {
        match outcome {
            CreateOutcome::Created(record) => record,
            other => panic!("not created: {other:?}"),
        }
    }

    #[tokio::test]
    async fn numbers_are_per_user_only_grow_and_another_users_number_is_not_found() {
        let store = Store::open_in_memory().unwrap();
        let (anna, ben) = (user("anna"), user("ben"));
        for who in [&anna, &ben] {
            store.ensure_user(who, None).await.unwrap();
        }
        let a1 = created(
            store
                .create_reminder(new(&anna, "a1", 10), 5)
                .await
                .unwrap(),
        );
        let a2 = created(
            store
                .create_reminder(new(&anna, "a2", 20), 5)
                .await
                .unwrap(),
        );
        let b1 = created(store.create_reminder(new(&ben, "b1", 5), 5).await.unwrap());
        assert_eq!((a1.number, a2.number, b1.number), (1, 2, 1));
        // Ben cannot cancel Anna's #2 (he has no #2) nor see it.
        assert!(!store.cancel_reminder(&ben, 2).await.unwrap());
        assert_eq!(store.list_reminders(&ben).await.unwrap(), vec![b1]);
        assert!(store.cancel_reminder(&anna, 2).await.unwrap());
        assert!(!store.cancel_reminder(&anna, 2).await.unwrap());
        // A cancelled number is not handed out again.
        let a3 = created(
            store
                .create_reminder(new(&anna, "a3", 30), 5)
                .await
                .unwrap(),
        );
        assert_eq!(a3.number, 3);
        let listed: Vec<i64> = store
            .list_reminders(&anna)
            .await
            .unwrap()
            .iter()
            .map(|r| r.number)
            .collect();
        assert_eq!(listed, vec![1, 3]);
        let counts = store.reminder_counts().await.unwrap();
        assert_eq!(counts.get("anna"), Some(&2));
        assert_eq!(counts.get("ben"), Some(&1));
    }

    #[tokio::test]
    async fn the_count_cap_holds() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        for i in 0..3 {
            created(store.create_reminder(new(&anna, "x", i), 3).await.unwrap());
        }
        assert_eq!(
            store.create_reminder(new(&anna, "x", 9), 3).await.unwrap(),
            CreateOutcome::AtCap { cap: 3 }
        );
        assert_eq!(
            store.create_reminder(new(&anna, "x", 9), 0).await.unwrap(),
            CreateOutcome::AtCap { cap: 0 }
        );
    }

    #[tokio::test]
    async fn a_reminder_for_a_user_who_does_not_exist_is_refused() {
        let store = Store::open_in_memory().unwrap();
        assert!(store
            .create_reminder(new(&user("ghost"), "x", 1), 5)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn firing_inserts_one_inbox_row_per_occurrence_on_the_users_own_private_chat() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        said(&store, &anna, "1001", "u1").await;
        created(
            store
                .create_reminder(new(&anna, "water the plants", 1_000), 5)
                .await
                .unwrap(),
        );
        let due = store.due_reminders(999, 10).await.unwrap();
        assert!(due.is_empty(), "not due yet");
        let due = store.due_reminders(5_000, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        let reminder = &due[0];
        let outcome = store
            .fire_reminder(fire(reminder.id, reminder.due_at, 5_000, None), |_, _| 10)
            .await
            .unwrap();
        assert!(matches!(outcome, FireOutcome::Fired { .. }), "{outcome:?}");
        // Fired once: the one-off is gone, a second fire of the same occurrence does nothing.
        assert!(store.list_reminders(&anna).await.unwrap().is_empty());
        assert_eq!(
            store
                .fire_reminder(fire(reminder.id, reminder.due_at, 5_001, None), |_, _| 10)
                .await
                .unwrap(),
            FireOutcome::Gone
        );
        let pending = store.pending_inbox(&anna, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        let item = &pending[0];
        assert_eq!(item.channel, ChannelKind::Telegram);
        assert_eq!(item.chat_id, "1001");
        assert_eq!(item.language_code.as_deref(), Some("de"));
        let marker = item.reminder.as_ref().expect("marked as a reminder");
        assert_eq!(marker.text, "water the plants");
        assert_eq!(marker.due_at, 1_000);
        assert_eq!(marker.fired_at, 5_000);
    }

    #[tokio::test]
    async fn a_recurring_reminder_moves_to_its_next_occurrence_in_the_same_commit() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        said(&store, &anna, "1001", "u1").await;
        let mut recurring = new(&anna, "stand up", 1_000);
        recurring.cron = Some("0 8 * * *".into());
        created(store.create_reminder(recurring, 5).await.unwrap());
        let due = store.due_reminders(1_000, 10).await.unwrap();
        let outcome = store
            .fire_reminder(fire(due[0].id, 1_000, 1_000, Some(2_000)), |_, _| 10)
            .await
            .unwrap();
        assert!(matches!(outcome, FireOutcome::Fired { .. }));
        let listed = store.list_reminders(&anna).await.unwrap();
        assert_eq!(listed[0].due_at, 2_000);
        assert_eq!(listed[0].fired, 1);
        assert!(store.due_reminders(1_999, 10).await.unwrap().is_empty());
        assert_eq!(store.next_reminder_attempt().await.unwrap(), Some(2_000));
        // The old occurrence cannot be fired again: the row moved on.
        assert_eq!(
            store
                .fire_reminder(fire(due[0].id, 1_000, 1_500, Some(2_000)), |_, _| 10)
                .await
                .unwrap(),
            FireOutcome::Gone
        );
        assert_eq!(store.pending_inbox(&anna, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_defers_the_reminder_instead_of_dropping_it() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        said(&store, &anna, "1001", "u1").await;
        created(
            store
                .create_reminder(new(&anna, "x", 1_000), 5)
                .await
                .unwrap(),
        );
        let due = store.due_reminders(1_000, 10).await.unwrap();
        let mut request = fire(due[0].id, 1_000, 1_000, None);
        request.retry_at = 61_000;
        assert_eq!(
            store
                .fire_reminder(request.clone(), |_, _| 0)
                .await
                .unwrap(),
            FireOutcome::QueueFull { user: anna.clone() }
        );
        assert!(store.due_reminders(60_999, 10).await.unwrap().is_empty());
        assert_eq!(store.due_reminders(61_000, 10).await.unwrap().len(), 1);
        request.now = 61_000;
        assert!(matches!(
            store.fire_reminder(request, |_, _| 1).await.unwrap(),
            FireOutcome::Fired { .. }
        ));
    }

    #[tokio::test]
    async fn a_reminder_never_goes_to_a_chat_that_is_not_the_users_own() {
        let store = Store::open_in_memory().unwrap();
        let (anna, ben) = (user("anna"), user("ben"));
        for who in [&anna, &ben] {
            store.ensure_user(who, None).await.unwrap();
        }
        said(&store, &anna, "1001", "u1").await;
        created(
            store
                .create_reminder(new(&anna, "secret", 1_000), 5)
                .await
                .unwrap(),
        );
        // Her Telegram identity now belongs to Ben (the operator moved it in the config).
        let identity = Identity::new(ChannelKind::Telegram, PeerId::new("1001").unwrap());
        store
            .link_identity(&identity, &ben, "config")
            .await
            .unwrap();
        let due = store.due_reminders(1_000, 10).await.unwrap();
        store
            .fire_reminder(fire(due[0].id, 1_000, 1_000, None), |_, _| 10)
            .await
            .unwrap();
        let item = &store.pending_inbox(&anna, 10).await.unwrap()[0];
        assert_eq!(
            (item.channel, item.chat_id.as_str()),
            (ChannelKind::Web, "anna"),
            "kept in her own conversation, not pushed to Ben's chat"
        );
    }

    #[tokio::test]
    async fn the_preferred_channel_wins_when_the_user_is_reachable_there() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        said(&store, &anna, "1001", "u1").await;
        let request_for = |id, due| {
            let mut request = fire(id, due, due, None);
            request.preferred = Some(ChannelKind::Web);
            request
        };
        created(
            store
                .create_reminder(new(&anna, "x", 1_000), 5)
                .await
                .unwrap(),
        );
        let due = store.due_reminders(1_000, 10).await.unwrap();
        store
            .fire_reminder(request_for(due[0].id, 1_000), |_, _| 10)
            .await
            .unwrap();
        let item = &store.pending_inbox(&anna, 10).await.unwrap()[0];
        assert_eq!(item.channel, ChannelKind::Web);
    }

    #[tokio::test]
    async fn remove_and_reset_cancel_every_reminder() {
        let store = Store::open_in_memory().unwrap();
        let (anna, ben) = (user("anna"), user("ben"));
        for who in [&anna, &ben] {
            store.ensure_user(who, None).await.unwrap();
            created(
                store
                    .create_reminder(new(who, "x", 1_000), 5)
                    .await
                    .unwrap(),
            );
            created(
                store
                    .create_reminder(new(who, "y", 2_000), 5)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(store.cancel_user_schedules(&anna).await.unwrap(), 2);
        assert!(store.list_reminders(&anna).await.unwrap().is_empty());
        // Through the store's own reset and remove, too.
        created(
            store
                .create_reminder(new(&anna, "z", 1_000), 5)
                .await
                .unwrap(),
        );
        store.wipe_user_history(&anna).await.unwrap();
        assert!(store.list_reminders(&anna).await.unwrap().is_empty());
        assert!(store.delete_user(&ben).await.unwrap());
        assert_eq!(store.reminder_total().await.unwrap(), 0);
        assert!(store.due_reminders(i64::MAX, 10).await.unwrap().is_empty());
    }
}
