//! What each user has used, for budgets and storage caps: per-day counters (messages, tokens,
//! spend, `exec` time), the bytes of their stored transcript, their queue of unanswered
//! messages, and history loaded in bounded pages.
//!
//! * `usage_days` holds one row per user and day (`YYYY-MM-DD` in the gateway's local time,
//!   chosen by the caller). It is charged as the usage happens — after each model call and each
//!   sandboxed command — not with the turn's commit, so a turn that fails and is answered again
//!   still counts what its first attempt spent. A month is the sum of its days.
//! * `user_storage.transcript_bytes` is kept by triggers on `transcript`, so every path that adds
//!   or deletes transcript rows (turns, compaction, `users reset`, `/forget`) keeps it exact
//!   without knowing about it.
//! * `compaction_attempts` remembers, per session, the size at which compaction last failed to
//!   bring the session under the threshold, so it is not retried on every message.

use crate::db::{Store, StoreError};
use moltmate_core::model::{ConversationItem, WireCache};
use moltmate_core::UserId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Appended to the store's migrations (see `db::MIGRATIONS`).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE usage_days (
    user_id       TEXT NOT NULL,
    day           TEXT NOT NULL,
    messages      INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros   INTEGER NOT NULL DEFAULT 0,
    exec_ms       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
) WITHOUT ROWID;
CREATE INDEX usage_days_day ON usage_days(day);
CREATE TABLE user_storage (
    user_id          TEXT PRIMARY KEY,
    transcript_bytes INTEGER NOT NULL DEFAULT 0
);
INSERT INTO user_storage (user_id, transcript_bytes)
    SELECT user_id, SUM(octet_length(item)) FROM transcript GROUP BY user_id;
CREATE TRIGGER transcript_bytes_added AFTER INSERT ON transcript BEGIN
    INSERT OR IGNORE INTO user_storage (user_id, transcript_bytes) VALUES (NEW.user_id, 0);
    UPDATE user_storage SET transcript_bytes = transcript_bytes + octet_length(NEW.item)
        WHERE user_id = NEW.user_id;
END;
CREATE TRIGGER transcript_bytes_removed AFTER DELETE ON transcript BEGIN
    UPDATE user_storage SET transcript_bytes = MAX(0, transcript_bytes - octet_length(OLD.item))
        WHERE user_id = OLD.user_id;
END;
CREATE TABLE compaction_attempts (
    session_id    TEXT PRIMARY KEY,
    session_bytes INTEGER NOT NULL,
    at            INTEGER NOT NULL
);
CREATE TRIGGER compaction_attempts_of_deleted_sessions AFTER DELETE ON sessions BEGIN
    DELETE FROM compaction_attempts WHERE session_id = OLD.id;
END;
"#;

/// Appended after [`MIGRATION`]: counters clamped to [`COUNTER_MAX`] (rows an older release
/// stored from a hostile `usage`), and message texts kept only while they are needed — an
/// inbox row's text until it is answered (`done_at`), an outbox row's until it is claimed for
/// sending (a claimed row is never sent again, see `claim_outbox`). The triggers make that
/// hold for every path that finishes a row, present and future; the rows themselves (ids,
/// external ids for de-duplication, states, times) stay for idempotency and crash recovery and
/// are pruned after [`ANSWERED_ROW_RETENTION`].
pub(crate) const RETENTION_MIGRATION: &str = r#"
UPDATE usage_days SET
    messages = MIN(messages, 9007199254740992),
    input_tokens = MIN(input_tokens, 9007199254740992),
    output_tokens = MIN(output_tokens, 9007199254740992),
    cost_micros = MIN(cost_micros, 9007199254740992),
    exec_ms = MIN(exec_ms, 9007199254740992);
UPDATE token_usage SET
    input_tokens = MIN(MAX(input_tokens, 0), 9007199254740992),
    output_tokens = MIN(MAX(output_tokens, 0), 9007199254740992);
UPDATE inbox SET text = '' WHERE done_at IS NOT NULL AND text <> '';
UPDATE outbox SET text = '' WHERE state <> 'pending' AND text <> '';
CREATE TRIGGER inbox_text_cleared_when_answered AFTER UPDATE OF done_at ON inbox
    WHEN NEW.done_at IS NOT NULL AND NEW.text <> '' BEGIN
    UPDATE inbox SET text = '' WHERE id = NEW.id;
END;
CREATE TRIGGER outbox_text_cleared_when_claimed AFTER UPDATE OF state ON outbox
    WHEN NEW.state <> 'pending' AND NEW.text <> '' BEGIN
    UPDATE outbox SET text = '' WHERE id = NEW.id;
END;
CREATE INDEX outbox_user ON outbox(user_id, updated_at);
"#;

/// Appended last: each session counts the changes to rows it held (a row deleted, moved to
/// another session by compaction, or rewritten), so a worker's [`HistoryCache`] checks one
/// number before a turn instead of counting the session's rows (which grew with the session).
/// Triggers keep it for every delete and update. Rows join a session only through
/// `complete_turn`'s plain insert with a new `AUTOINCREMENT` id: an insert with an explicit id
/// or `INSERT OR REPLACE` (whose delete fires no trigger) would go around the count, and
/// `tests/sql_rules.rs` refuses both in the store's code.
pub(crate) const HISTORY_CHANGES_MIGRATION: &str = r#"
ALTER TABLE sessions ADD COLUMN history_changes INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER transcript_row_deleted AFTER DELETE ON transcript BEGIN
    UPDATE sessions SET history_changes = history_changes + 1 WHERE id = OLD.session_id;
END;
CREATE TRIGGER transcript_row_changed AFTER UPDATE ON transcript BEGIN
    UPDATE sessions SET history_changes = history_changes + 1
        WHERE id IN (OLD.session_id, NEW.session_id);
END;
"#;

/// How long answered inbox rows and sent outbox rows (already without their texts) are kept
/// before they are deleted: long past any redelivery a channel could make (Telegram's cursor
/// is committed with the row; its update ids restart after a week of silence).
pub const ANSWERED_ROW_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// What [`Store::charge_usage_since`] does, inside the caller's transaction.
pub(crate) fn charge_usage(
    c: &Connection,
    user: &UserId,
    day: &str,
    charge: UsageCharge,
    since: i64,
) -> Result<bool, StoreError> {
    if charge.is_empty() {
        return Ok(true);
    }
    let charged = c
        .prepare_cached(
            "INSERT INTO usage_days (user_id, day, messages, input_tokens, output_tokens, cost_micros, exec_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
             WHERE EXISTS (SELECT 1 FROM users WHERE id = ?1 AND created_at <= ?8)
             ON CONFLICT (user_id, day) DO UPDATE SET
               messages = messages + excluded.messages,
               input_tokens = input_tokens + excluded.input_tokens,
               output_tokens = output_tokens + excluded.output_tokens,
               cost_micros = cost_micros + excluded.cost_micros,
               exec_ms = exec_ms + excluded.exec_ms",
        )?
        .execute(params![
            user.as_str(),
            day,
            to_i64(charge.messages),
            to_i64(charge.input_tokens),
            to_i64(charge.output_tokens),
            to_i64(charge.cost_micros),
            to_i64(charge.exec_ms),
            since,
        ])?;
    Ok(charged > 0)
}

/// A turn's last model charge, written with the turn itself ([`crate::TurnRecord`]) instead
/// of in a call of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredCharge {
    /// The day (`YYYY-MM-DD`, UTC) it counts on.
    pub day: String,
    pub charge: UsageCharge,
    /// Only a user who existed at this time (ms) is charged (see `charge_usage_since`).
    pub since: i64,
}

/// Usage to add to a user's day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCharge {
    pub messages: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Model spend in millionths of a US dollar (from `model.prices`).
    pub cost_micros: u64,
    /// Time commands ran in the sandbox, as the backend reported it.
    pub exec_ms: u64,
}

impl UsageCharge {
    /// Both charges together (saturating).
    pub fn plus(self, other: UsageCharge) -> UsageCharge {
        UsageCharge {
            messages: self.messages.saturating_add(other.messages),
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cost_micros: self.cost_micros.saturating_add(other.cost_micros),
            exec_ms: self.exec_ms.saturating_add(other.exec_ms),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == UsageCharge::default()
    }
}

/// Usage summed over some users: today's counters and this month's spend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    pub messages_today: u64,
    pub tokens_today: u64,
    pub exec_ms_today: u64,
    pub cost_micros_month: u64,
}

/// One user's usage and stored bytes, for the operator (admin page, `users show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserUsage {
    pub user: String,
    pub totals: UsageTotals,
    pub transcript_bytes: u64,
}

/// The newest part of a session that fits a byte budget.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryPage {
    /// Row id and item, oldest first; starts at a user message (no tool result without the
    /// call it answers).
    pub rows: Vec<(i64, ConversationItem)>,
    /// Stored bytes of `rows`.
    pub bytes: u64,
    /// The session has older rows than the page holds.
    pub truncated: bool,
}

/// A page of a session for display, see [`Store::transcript_page`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TranscriptPage {
    /// Row id and item, oldest first.
    pub rows: Vec<(i64, ConversationItem)>,
    /// Pass as `before` for the next (older) page; `None` when there is none.
    pub older: Option<i64>,
}

/// Sums `users`' counters of `day` and spend of `month`.
fn totals_of(
    c: &rusqlite::Connection,
    users: &[UserId],
    day: &str,
    month: &str,
) -> Result<UsageTotals, StoreError> {
    let month_start = format!("{month}-00");
    let month_end = format!("{month}-99");
    let mut totals = UsageTotals::default();
    let mut today = c.prepare_cached(
        "SELECT messages, input_tokens + output_tokens, exec_ms FROM usage_days
         WHERE user_id = ?1 AND day = ?2",
    )?;
    let mut spend = c.prepare_cached(
        "SELECT CAST(MIN(total(cost_micros), 9007199254740992.0) AS INTEGER) FROM usage_days
         WHERE user_id = ?1 AND day > ?2 AND day < ?3",
    )?;
    for user in users {
        let row: Option<(i64, i64, i64)> = today
            .query_row(params![user.as_str(), day], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((messages, tokens, exec_ms)) = row {
            totals.messages_today = totals.messages_today.saturating_add(to_u64(messages));
            totals.tokens_today = totals.tokens_today.saturating_add(to_u64(tokens));
            totals.exec_ms_today = totals.exec_ms_today.saturating_add(to_u64(exec_ms));
        }
        let cost: i64 =
            spend.query_row(params![user.as_str(), month_start, month_end], |r| r.get(0))?;
        totals.cost_micros_month = totals.cost_micros_month.saturating_add(to_u64(cost));
    }
    Ok(totals)
}

/// The most any stored counter holds (2^53, exact in a double: 9 × 10^15 tokens, or
/// 9 billion dollars of spend in micro-dollars). Every value is clamped to it on the way in and
/// every addition saturates at it in SQL, so no sum the store computes — a day's tokens,
/// input + output, a month's `SUM` over at most 31 days — comes near SQLite's 64-bit integer
/// overflow, which would fail every later read of the user's (and their family's) usage.
pub const COUNTER_MAX: i64 = 1 << 53;

/// A count for the database, saturated at [`COUNTER_MAX`].
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX).min(COUNTER_MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl Store {
    /// Adds `charge` to the user's counters of `day` (`YYYY-MM-DD`).
    pub async fn charge_usage(
        &self,
        user: &UserId,
        day: &str,
        charge: UsageCharge,
    ) -> Result<(), StoreError> {
        if charge.is_empty() {
            return Ok(());
        }
        let user = user.clone();
        let day = day.to_string();
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO usage_days (user_id, day, messages, input_tokens, output_tokens, cost_micros, exec_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (user_id, day) DO UPDATE SET
                   messages = MIN(messages + excluded.messages, ?8),
                   input_tokens = MIN(input_tokens + excluded.input_tokens, ?8),
                   output_tokens = MIN(output_tokens + excluded.output_tokens, ?8),
                   cost_micros = MIN(cost_micros + excluded.cost_micros, ?8),
                   exec_ms = MIN(exec_ms + excluded.exec_ms, ?8)",
            )?
            .execute(params![
                user.as_str(),
                day,
                to_i64(charge.messages),
                to_i64(charge.input_tokens),
                to_i64(charge.output_tokens),
                to_i64(charge.cost_micros),
                to_i64(charge.exec_ms),
                COUNTER_MAX,
            ])?;
            Ok(())
        })
        .await
    }

    /// Like [`Store::charge_usage`], for a turn that began at `since` (ms): nothing is charged
    /// when the user no longer exists or was created after that (removed while the turn ran,
    /// and maybe given to someone new since) — an ended user's last turn never lands on a new
    /// user's budget.
    pub async fn charge_usage_since(
        &self,
        user: &UserId,
        day: &str,
        charge: UsageCharge,
        since: i64,
    ) -> Result<bool, StoreError> {
        if charge.is_empty() {
            return Ok(true);
        }
        let user = user.clone();
        let day = day.to_string();
        self.with(move |c| charge_usage(c, &user, &day, charge, since))
            .await
    }

    /// Usage of `users` together (one user, or a family's members): counters of `day` and the
    /// spend of the month `month` (`YYYY-MM`, the prefix of its days).
    pub async fn usage_totals(
        &self,
        users: &[UserId],
        day: &str,
        month: &str,
    ) -> Result<UsageTotals, StoreError> {
        let users = users.to_vec();
        let (day, month) = (day.to_string(), month.to_string());
        self.with(move |c| totals_of(c, &users, &day, &month)).await
    }

    /// What a turn checks before it runs, in one read: the user's usage, their family's (when
    /// `family` names the members) and the user's stored transcript bytes.
    pub async fn usage_before_turn(
        &self,
        user: &UserId,
        family: Option<&[UserId]>,
        day: &str,
        month: &str,
    ) -> Result<(UsageTotals, Option<UsageTotals>, u64), StoreError> {
        let user = user.clone();
        let family = family.map(<[UserId]>::to_vec);
        let (day, month) = (day.to_string(), month.to_string());
        self.read(move |c| {
            let own = totals_of(c, std::slice::from_ref(&user), &day, &month)?;
            let family = family
                .map(|members| totals_of(c, &members, &day, &month))
                .transpose()?;
            let bytes: Option<i64> = c
                .prepare_cached("SELECT transcript_bytes FROM user_storage WHERE user_id = ?1")?
                .query_row(params![user.as_str()], |r| r.get(0))
                .optional()?;
            Ok((own, family, bytes.map(to_u64).unwrap_or(0)))
        })
        .await
    }

    /// Every user's usage of `day` and `month` and their stored transcript bytes, by user id.
    pub async fn usage_overview(
        &self,
        day: &str,
        month: &str,
    ) -> Result<Vec<UserUsage>, StoreError> {
        let day = day.to_string();
        let month_start = format!("{month}-00");
        let month_end = format!("{month}-99");
        self.with(move |c| {
            let mut statement = c.prepare(
                "SELECT u.id,
                        COALESCE((SELECT messages FROM usage_days WHERE user_id = u.id AND day = ?1), 0),
                        COALESCE((SELECT input_tokens + output_tokens FROM usage_days WHERE user_id = u.id AND day = ?1), 0),
                        COALESCE((SELECT exec_ms FROM usage_days WHERE user_id = u.id AND day = ?1), 0),
                        (SELECT CAST(MIN(total(cost_micros), 9007199254740992.0) AS INTEGER) FROM usage_days WHERE user_id = u.id AND day > ?2 AND day < ?3),
                        COALESCE((SELECT transcript_bytes FROM user_storage WHERE user_id = u.id), 0)
                 FROM users u ORDER BY u.id",
            )?;
            let rows = statement.query_map(params![day, month_start, month_end], |r| {
                Ok(UserUsage {
                    user: r.get(0)?,
                    totals: UsageTotals {
                        messages_today: to_u64(r.get(1)?),
                        tokens_today: to_u64(r.get(2)?),
                        exec_ms_today: to_u64(r.get(3)?),
                        cost_micros_month: to_u64(r.get(4)?),
                    },
                    transcript_bytes: to_u64(r.get(5)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Bytes of the user's stored transcript items (all sessions).
    pub async fn transcript_bytes(&self, user: &UserId) -> Result<u64, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let bytes: Option<i64> = c
                .prepare_cached("SELECT transcript_bytes FROM user_storage WHERE user_id = ?1")?
                .query_row(params![user.as_str()], |r| r.get(0))
                .optional()?;
            Ok(bytes.map(to_u64).unwrap_or(0))
        })
        .await
    }

    /// How many of the user's messages wait for an answer.
    pub async fn pending_inbox_count(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            let count: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM inbox WHERE user_id = ?1 AND done_at IS NULL",
                )?
                .query_row(params![user.as_str()], |r| r.get(0))?;
            Ok(usize::try_from(count).unwrap_or(0))
        })
        .await
    }

    /// The newest rows of a session whose stored size fits `max_bytes`, oldest first, starting
    /// at a user message. Only the sizes of rows are read past the budget, never their content,
    /// and the scan stops at the first row that does not fit: the cost follows the page, not
    /// the session.
    pub async fn history_page(
        &self,
        session_id: &str,
        max_bytes: u64,
    ) -> Result<HistoryPage, StoreError> {
        let session_id = session_id.to_string();
        self.with(move |c| {
            let mut first_id = None;
            let mut truncated = false;
            {
                let mut sizes = c.prepare_cached(
                    "SELECT id, octet_length(item) FROM transcript WHERE session_id = ?1 ORDER BY id DESC",
                )?;
                let mut rows = sizes.query(params![session_id])?;
                let mut used: u64 = 0;
                while let Some(row) = rows.next()? {
                    let id: i64 = row.get(0)?;
                    let size = to_u64(row.get(1)?);
                    if used.saturating_add(size) > max_bytes {
                        truncated = true;
                        break;
                    }
                    used += size;
                    first_id = Some(id);
                }
            }
            let Some(first_id) = first_id else {
                return Ok(HistoryPage {
                    rows: Vec::new(),
                    bytes: 0,
                    truncated,
                });
            };
            let mut statement = c.prepare_cached(
                "SELECT id, item FROM transcript WHERE session_id = ?1 AND id >= ?2 ORDER BY id",
            )?;
            let mut rows = statement.query(params![session_id, first_id])?;
            let mut page = HistoryPage {
                rows: Vec::new(),
                bytes: 0,
                truncated,
            };
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let json: String = row.get(1)?;
                let item: ConversationItem = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
                if page.rows.is_empty() && !matches!(item, ConversationItem::User { .. }) {
                    // The page must not start in the middle of a turn.
                    page.truncated = true;
                    continue;
                }
                page.bytes += json.len() as u64;
                page.rows.push((id, item));
            }
            Ok(page)
        })
        .await
    }

    /// One page of a session for display (the web chat's history), newest rows first in the
    /// scan and oldest first in the result: rows older than `before` (all rows when `None`), at
    /// most `max_rows` of them and at most `max_bytes` stored bytes — except that the newest
    /// row is always included, so paging makes progress (a row is bounded by the per-turn
    /// storage cap). Like [`Store::history_page`], sizes are read before contents, so the cost
    /// follows the page, not the session. `older` is the cursor for the next page (pass it as
    /// `before`), `None` when the page reaches the session's first row.
    pub async fn transcript_page(
        &self,
        session_id: &str,
        before: Option<i64>,
        max_rows: usize,
        max_bytes: u64,
    ) -> Result<TranscriptPage, StoreError> {
        let session_id = session_id.to_string();
        let before = before.unwrap_or(i64::MAX);
        let max_rows = max_rows.max(1);
        self.with(move |c| {
            let mut first_id = None;
            let mut more = false;
            {
                let mut sizes = c.prepare_cached(
                    "SELECT id, octet_length(item) FROM transcript
                     WHERE session_id = ?1 AND id < ?2 ORDER BY id DESC",
                )?;
                let mut rows = sizes.query(params![session_id, before])?;
                let (mut used, mut count) = (0u64, 0usize);
                while let Some(row) = rows.next()? {
                    let id: i64 = row.get(0)?;
                    let size = to_u64(row.get(1)?);
                    if count > 0 && (count >= max_rows || used.saturating_add(size) > max_bytes) {
                        more = true;
                        break;
                    }
                    used = used.saturating_add(size);
                    count += 1;
                    first_id = Some(id);
                }
            }
            let Some(first_id) = first_id else {
                return Ok(TranscriptPage::default());
            };
            let mut statement = c.prepare_cached(
                "SELECT id, item FROM transcript WHERE session_id = ?1 AND id >= ?2 AND id < ?3 ORDER BY id",
            )?;
            let mut rows = statement.query(params![session_id, first_id, before])?;
            let mut page = TranscriptPage {
                rows: Vec::new(),
                older: more.then_some(first_id),
            };
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let json: String = row.get(1)?;
                let item: ConversationItem = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
                page.rows.push((id, item));
            }
            Ok(page)
        })
        .await
    }

    /// The session size at which compaction last failed to shrink this session, if it did.
    pub async fn compaction_attempt(&self, session_id: &str) -> Result<Option<u64>, StoreError> {
        let session_id = session_id.to_string();
        self.with(move |c| {
            let bytes: Option<i64> = c
                .prepare_cached(
                    "SELECT session_bytes FROM compaction_attempts WHERE session_id = ?1",
                )?
                .query_row(params![session_id], |r| r.get(0))
                .optional()?;
            Ok(bytes.map(to_u64))
        })
        .await
    }

    /// Records that compaction did not bring the session under its threshold at this size
    /// (`Some`), or clears the record after it did (`None`).
    pub async fn set_compaction_attempt(
        &self,
        session_id: &str,
        session_bytes: Option<u64>,
    ) -> Result<(), StoreError> {
        let session_id = session_id.to_string();
        self.with(move |c| {
            match session_bytes {
                Some(bytes) => c.prepare_cached("INSERT INTO compaction_attempts (session_id, session_bytes, at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (session_id) DO UPDATE SET session_bytes = excluded.session_bytes, at = excluded.at")?.execute(
                    params![session_id, to_i64(bytes), chrono::Utc::now().timestamp_millis()],
                )?,
                None => c.prepare_cached("DELETE FROM compaction_attempts WHERE session_id = ?1")?.execute(
                    params![session_id],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// Compaction: sets the session's summary and moves its rows before `keep_from_id` into a
    /// new ended session of the same user — out of what the model is sent, but still the
    /// user's (export, memory search, their storage cap; `/forget` deletes them).
    pub async fn archive_before(
        &self,
        session_id: &str,
        summary: &str,
        keep_from_id: i64,
    ) -> Result<(), StoreError> {
        let session_id = session_id.to_string();
        let summary = summary.to_string();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let user: Option<String> = tx
                .prepare_cached("SELECT user_id FROM sessions WHERE id = ?1")?
                .query_row(params![session_id], |r| r.get(0))
                .optional()?;
            let Some(user) = user else {
                return Err(StoreError::NotFound(format!("no session {session_id}")));
            };
            let archive = format!(
                "{}-archived-{}",
                session_id,
                hex::encode(rand::random::<[u8; 6]>())
            );
            let now = chrono::Utc::now().timestamp_millis();
            tx.prepare_cached(
                "INSERT INTO sessions (id, user_id, started_at, last_active, ended_at, summary)
                 VALUES (?1, ?2, ?3, ?3, ?3, NULL)",
            )?
            .execute(params![archive, user, now])?;
            tx.prepare_cached(
                "UPDATE transcript SET session_id = ?3 WHERE session_id = ?1 AND id < ?2",
            )?
            .execute(params![session_id, keep_from_id, archive])?;
            tx.prepare_cached("UPDATE sessions SET summary = NULLIF(?2, '') WHERE id = ?1")?
                .execute(params![session_id, summary])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// `/forget`: deletes every transcript item of the user, the summaries of all their
    /// sessions (ended ones too: `/forget` runs after the session was ended, and `/reset` or the
    /// idle reset end sessions with their summary), the texts of their answered messages and
    /// claimed replies (the triggers of [`RETENTION_MIGRATION`] already clear them; this also
    /// covers rows an older release left), and ends their open session (a new one starts with
    /// the next message). Memory files, pending messages (the `/forget` message itself is
    /// still being answered) and replies not yet sent, usage and audit records stay. Returns the
    /// bytes freed.
    pub async fn forget_transcripts(&self, user: &UserId) -> Result<u64, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before: i64 = tx
                .prepare_cached("SELECT COALESCE((SELECT transcript_bytes FROM user_storage WHERE user_id = ?1), 0)")?.query_row(
                    params![user.as_str()],
                    |r| r.get(0),
                )?;
            tx.prepare_cached("DELETE FROM transcript WHERE user_id = ?1")?.execute(
                params![user.as_str()],
            )?;
            tx.prepare_cached("DELETE FROM compaction_attempts WHERE session_id IN (SELECT id FROM sessions WHERE user_id = ?1)")?.execute(
                params![user.as_str()],
            )?;
            tx.prepare_cached("UPDATE sessions SET ended_at = ?2 WHERE user_id = ?1 AND ended_at IS NULL")?.execute(
                params![user.as_str(), chrono::Utc::now().timestamp_millis()],
            )?;
            tx.execute(
                "UPDATE sessions SET summary = NULL WHERE user_id = ?1 AND summary IS NOT NULL",
                params![user.as_str()],
            )?;
            tx.execute(
                "UPDATE inbox SET text = '' WHERE user_id = ?1 AND done_at IS NOT NULL AND text <> ''",
                params![user.as_str()],
            )?;
            tx.execute(
                "UPDATE outbox SET text = '' WHERE user_id = ?1 AND state <> 'pending' AND text <> ''",
                params![user.as_str()],
            )?;
            tx.commit()?;
            Ok(to_u64(before))
        })
        .await
    }
}

// ---- the history a worker keeps between turns -------------------------------------------

/// Most stored bytes of one session a worker keeps parsed between turns.
pub const HISTORY_CACHE_SESSION_BYTES: u64 = 1024 * 1024;
/// Most stored bytes all workers together keep parsed between turns. A session that does not
/// fit (in either bound) is read page by page, as without a cache.
pub const HISTORY_CACHE_TOTAL_BYTES: u64 = 16 * 1024 * 1024;

/// Every row of one session, parsed, kept by the user's worker between turns, so a turn reads
/// and parses only the rows added since instead of the whole page (see
/// [`Store::history_page_cached`]). Transcript ids are never reused (`AUTOINCREMENT`), new rows
/// only join a session above its newest id, and every other change to a session's rows (a
/// delete, a move by compaction, a rewrite) bumps the session's `history_changes`
/// ([`HISTORY_CHANGES_MIGRATION`]): so when that number is what it was when the cache was
/// filled and the newest cached row is still there (a session id is never used twice, this
/// guards that too), the cache is exact, and the rows above that id are all that is new.
#[derive(Debug)]
pub struct HistoryCache {
    session_id: String,
    /// Id, item and stored bytes of every row of the session up to the newest read, oldest first.
    rows: Vec<(i64, ConversationItem, u64)>,
    /// The session's `history_changes` when `rows` were read.
    changes: i64,
    /// Stored bytes of `rows`, reserved in `budget`.
    bytes: u64,
    /// Set when the session did not fit: read page by page from then on.
    too_big: bool,
    budget: Arc<AtomicU64>,
    /// The rows from this index on are lent to a turn (their items moved out, placeholders
    /// left); [`HistoryCache::give_back`] puts them back. A cache whose loan did not come back
    /// (the turn failed) is read afresh.
    lent: Option<usize>,
    /// The wire forms of `rows` a provider made (reserved in the same `budget`); made anew
    /// with the cache whenever the session's rows are read afresh, so never stale.
    wire: Arc<WireCache>,
}

impl HistoryCache {
    fn new(session_id: &str, budget: &Arc<AtomicU64>) -> Self {
        HistoryCache {
            session_id: session_id.to_string(),
            rows: Vec::new(),
            changes: 0,
            bytes: 0,
            too_big: false,
            budget: Arc::clone(budget),
            lent: None,
            wire: new_wire_cache(budget),
        }
    }

    /// The cache of wire forms for the rows just lent by [`Store::history_page_cached`];
    /// `None` when the page was not lent from this cache (read page by page instead).
    pub fn lent_wire(&self) -> Option<Arc<WireCache>> {
        self.lent.map(|_| Arc::clone(&self.wire))
    }

    /// Takes back the items [`Store::history_page_cached`] lent, in the order it gave them
    /// (what a turn hands back as its history). Anything else empties the cache, which is then
    /// read afresh: never a wrong history, at worst one more read.
    pub fn give_back(&mut self, items: Vec<ConversationItem>) {
        let Some(first) = self.lent.take() else {
            return;
        };
        if items.len() != self.rows.len().saturating_sub(first) {
            self.rows = Vec::new();
            self.budget.fetch_sub(self.bytes, Ordering::SeqCst);
            self.bytes = 0;
            self.lent = Some(0);
            return;
        }
        for ((_, slot, _), item) in self.rows.iter_mut().skip(first).zip(items) {
            *slot = item;
        }
    }

    /// Reserves `more` bytes of the shared budget. False (nothing reserved) when this session
    /// or all of them together would go over their bound.
    fn reserve(&mut self, more: u64) -> bool {
        let bytes = self.bytes.saturating_add(more);
        if bytes > HISTORY_CACHE_SESSION_BYTES {
            return false;
        }
        let reserved = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |total| {
                let total = total.checked_add(more)?;
                (total <= HISTORY_CACHE_TOTAL_BYTES).then_some(total)
            })
            .is_ok();
        if reserved {
            self.bytes = bytes;
        }
        reserved
    }

    /// Drops every row and gives their bytes back; `too_big` from now on.
    fn give_up(&mut self) {
        self.rows = Vec::new();
        self.wire = new_wire_cache(&self.budget);
        self.budget.fetch_sub(self.bytes, Ordering::SeqCst);
        self.bytes = 0;
        self.too_big = true;
    }

    /// The page [`Store::history_page`] would read: the newest rows within `max_bytes`,
    /// starting at a user message.
    fn page(&mut self, max_bytes: u64) -> HistoryPage {
        let mut used: u64 = 0;
        let mut first = self.rows.len();
        let mut truncated = false;
        for (index, (_, _, size)) in self.rows.iter().enumerate().rev() {
            if used.saturating_add(*size) > max_bytes {
                truncated = true;
                break;
            }
            used += size;
            first = index;
        }
        let mut page = HistoryPage {
            rows: Vec::new(),
            bytes: 0,
            truncated,
        };
        // The page's items are moved out, not copied (a long session's history was the largest
        // allocation of a turn); the turn hands them back (`give_back`).
        let mut lent_from = None;
        for (index, (id, item, size)) in self.rows.iter_mut().enumerate().skip(first) {
            if page.rows.is_empty() && !matches!(item, ConversationItem::User { .. }) {
                page.truncated = true;
                continue;
            }
            lent_from.get_or_insert(index);
            page.bytes += *size;
            let placeholder = ConversationItem::User {
                text: String::new(),
            };
            page.rows.push((*id, std::mem::replace(item, placeholder)));
        }
        self.lent = Some(lent_from.unwrap_or(self.rows.len()));
        page
    }
}

/// Wire forms share the history cache's bounds: a session's at most
/// [`HISTORY_CACHE_SESSION_BYTES`], items and wire forms of all sessions together at most
/// [`HISTORY_CACHE_TOTAL_BYTES`].
fn new_wire_cache(budget: &Arc<AtomicU64>) -> Arc<WireCache> {
    Arc::new(WireCache::new(
        Arc::clone(budget),
        HISTORY_CACHE_SESSION_BYTES,
        HISTORY_CACHE_TOTAL_BYTES,
    ))
}

impl Drop for HistoryCache {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Bytes of new transcript rows a history cache reads on the caller's thread; more go to the
/// database thread.
const INLINE_DELTA_BYTES: u64 = 64 * 1024;

/// The rows of `session` after `after`, if the rows a cache holds (up to `after`, read when the
/// session's `history_changes` was `changes`) are still exactly there, and the new ones fit
/// `room` bytes.
fn read_delta(
    c: &Connection,
    session: &str,
    after: i64,
    changes: i64,
    room: u64,
) -> Result<Delta, StoreError> {
    let state: Option<(i64, bool)> = c
        .prepare_cached(
            "SELECT history_changes, EXISTS (SELECT 1 FROM transcript WHERE id = ?2 AND session_id = ?1)
             FROM sessions WHERE id = ?1",
        )?
        .query_row(params![session, after], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let now = match state {
        // An empty cache has nothing to check.
        Some((now, _)) if after == 0 => now,
        Some((now, newest_there)) if newest_there && now == changes => now,
        None if after == 0 => 0,
        _ => return Ok(Delta::Stale),
    };
    let mut statement = c.prepare_cached(
        "SELECT id, item FROM transcript WHERE session_id = ?1 AND id > ?2 ORDER BY id",
    )?;
    let mut rows = statement.query(params![session, after])?;
    let mut new = Vec::new();
    let mut bytes: u64 = 0;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        // Size first, from the stored text, before anything is parsed.
        let text = row
            .get_ref(1)?
            .as_str()
            .map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
        bytes = bytes.saturating_add(text.len() as u64);
        if bytes > room {
            return Ok(Delta::TooBig);
        }
        let item: ConversationItem = serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
        new.push((id, item, text.len() as u64));
    }
    Ok(Delta::Rows {
        rows: new,
        changes: now,
    })
}

/// What the database had for a cache.
enum Delta {
    /// The cache is exact; these rows are new, and `changes` is the session's count now.
    Rows {
        rows: Vec<(i64, ConversationItem, u64)>,
        changes: i64,
    },
    /// Rows the cache holds are gone or changed (deleted, archived): read it again from the
    /// start.
    Stale,
    /// The new rows would go over the bounds.
    TooBig,
}

impl Store {
    /// [`Store::history_page`], with the session's rows kept in `cache` between turns: only
    /// rows added since the last call are read and parsed. `cache` belongs to one user's
    /// worker; a cache of another session is replaced. Sessions over the bounds
    /// ([`HISTORY_CACHE_SESSION_BYTES`], [`HISTORY_CACHE_TOTAL_BYTES`]) are read page by page.
    pub async fn history_page_cached(
        &self,
        cache: &mut Option<HistoryCache>,
        session_id: &str,
        max_bytes: u64,
    ) -> Result<HistoryPage, StoreError> {
        // A loan that did not come back leaves placeholders: read the session afresh.
        if cache
            .as_ref()
            .is_none_or(|c| c.session_id != session_id || c.lent.is_some())
        {
            *cache = Some(HistoryCache::new(session_id, &self.history_budget));
        }
        let Some(current) = cache.as_mut() else {
            return self.history_page(session_id, max_bytes).await;
        };
        for _ in 0..2 {
            if current.too_big {
                return self.history_page(session_id, max_bytes).await;
            }
            let session = session_id.to_string();
            let after = current.rows.last().map_or(0, |(id, _, _)| *id);
            let changes = current.changes;
            let room = HISTORY_CACHE_SESSION_BYTES.saturating_sub(current.bytes);
            // New rows of up to 64 KiB (a turn or a few) are read on the caller's thread; more
            // (the first fill, a turn that stored much) on the database thread, so no user's
            // transcript makes a runtime thread parse a megabyte.
            let inline_room = room.min(INLINE_DELTA_BYTES);
            let for_inline = session.clone();
            let mut delta = self
                .read(move |c| read_delta(c, &for_inline, after, changes, inline_room))
                .await?;
            if matches!(delta, Delta::TooBig) && inline_room < room {
                delta = self
                    .with(move |c| read_delta(c, &session, after, changes, room))
                    .await?;
            }
            match delta {
                Delta::Rows { rows: new, changes } => {
                    let bytes = new.iter().map(|(_, _, size)| *size).sum();
                    if current.reserve(bytes) {
                        current.rows.extend(new);
                        current.changes = changes;
                        return Ok(current.page(max_bytes));
                    }
                    current.give_up();
                }
                Delta::TooBig => current.give_up(),
                Delta::Stale => {
                    *current = HistoryCache::new(session_id, &self.history_budget);
                }
            }
        }
        // Stale twice in a row (another process keeps changing the session): no cache.
        self.history_page(session_id, max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::TurnRecord;
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    async fn store_turn(store: &Store, who: &UserId, texts: &[ConversationItem]) -> String {
        store.ensure_user(who, None).await.unwrap();
        let inbox = store
            .insert_inbound(
                &InboundMessage {
                    sender: Identity::new(ChannelKind::Telegram, PeerId::new("1").unwrap()),
                    chat_id: "1".into(),
                    external_id: format!("{}", rand::random::<u64>()),
                    cursor: None,
                    text: "x".into(),
                    sender_name: None,
                    language_code: None,
                    attachments: Vec::new(),
                },
                who,
            )
            .await
            .unwrap()
            .unwrap();
        let session = store.current_session(who).await.unwrap();
        store
            .complete_turn(TurnRecord {
                charge: None,
                inbox_id: inbox,
                user: who.clone(),
                session_id: session.id.clone(),
                items: texts.to_vec(),
                reply: None,
                usage: vec![],
            })
            .await
            .unwrap()
            .outbox();
        session.id
    }

    fn said(text: &str) -> ConversationItem {
        ConversationItem::User { text: text.into() }
    }

    fn answered(text: &str) -> ConversationItem {
        ConversationItem::Assistant {
            text: text.into(),
            tool_calls: vec![],
        }
    }

    #[tokio::test]
    async fn charges_add_up_per_day_and_month_per_user_and_for_several_users() {
        let store = Store::open_in_memory().unwrap();
        let (anna, ben) = (user("anna"), user("ben"));
        let charge = UsageCharge {
            messages: 1,
            input_tokens: 100,
            output_tokens: 20,
            cost_micros: 5_000,
            exec_ms: 1_500,
        };
        store
            .charge_usage(&anna, "2026-03-01", charge)
            .await
            .unwrap();
        store
            .charge_usage(&anna, "2026-03-02", charge)
            .await
            .unwrap();
        store
            .charge_usage(&anna, "2026-03-02", charge)
            .await
            .unwrap();
        store
            .charge_usage(&anna, "2026-04-01", charge)
            .await
            .unwrap();
        store
            .charge_usage(&ben, "2026-03-02", charge)
            .await
            .unwrap();
        let anna_day = store
            .usage_totals(std::slice::from_ref(&anna), "2026-03-02", "2026-03")
            .await
            .unwrap();
        assert_eq!(
            anna_day,
            UsageTotals {
                messages_today: 2,
                tokens_today: 240,
                exec_ms_today: 3_000,
                cost_micros_month: 15_000,
            }
        );
        let both = store
            .usage_totals(&[anna.clone(), ben.clone()], "2026-03-02", "2026-03")
            .await
            .unwrap();
        assert_eq!(both.messages_today, 3);
        assert_eq!(both.cost_micros_month, 20_000);
        let nobody = store
            .usage_totals(&[user("carl")], "2026-03-02", "2026-03")
            .await
            .unwrap();
        assert_eq!(nobody, UsageTotals::default());
        let overview = store.usage_overview("2026-03-02", "2026-03").await.unwrap();
        assert!(overview.is_empty(), "only users in the users table");
    }

    #[tokio::test]
    async fn transcript_bytes_follow_every_insert_and_delete() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        let session = store_turn(&store, &anna, &[said("hello"), answered("hi")]).await;
        let stored = store.transcript_bytes(&anna).await.unwrap();
        let expected: u64 = [said("hello"), answered("hi")]
            .iter()
            .map(|i| serde_json::to_string(i).unwrap().len() as u64)
            .sum();
        assert_eq!(stored, expected);
        let rows = store.transcript(&session).await.unwrap();
        store
            .compact_session(&session, "summary", rows[1].0)
            .await
            .unwrap();
        let kept = serde_json::to_string(&answered("hi")).unwrap().len() as u64;
        assert_eq!(store.transcript_bytes(&anna).await.unwrap(), kept);
        assert_eq!(store.forget_transcripts(&anna).await.unwrap(), kept);
        assert_eq!(store.transcript_bytes(&anna).await.unwrap(), 0);
        assert!(store.transcript(&session).await.unwrap().is_empty());
        assert_ne!(store.current_session(&anna).await.unwrap().id, session);
        let overview = store.usage_overview("2026-03-02", "2026-03").await.unwrap();
        assert_eq!(overview[0].user, "anna");
        assert_eq!(overview[0].transcript_bytes, 0);
    }

    #[tokio::test]
    async fn history_page_is_the_newest_turns_that_fit_starting_at_a_user_message() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let mut session = String::new();
        for turn in 0..10 {
            session = store_turn(
                &store,
                &anna,
                &[
                    said(&format!("question {turn}")),
                    ConversationItem::Assistant {
                        text: String::new(),
                        tool_calls: vec![],
                    },
                    ConversationItem::ToolResult {
                        call_id: "c".into(),
                        content: "x".repeat(1000),
                        is_error: false,
                    },
                    answered(&format!("answer {turn}")),
                ],
            )
            .await;
        }
        let everything = store.history_page(&session, u64::MAX).await.unwrap();
        assert_eq!(everything.rows.len(), 40);
        assert!(!everything.truncated);
        // Room for two and a half turns: the half turn is dropped, the page starts at a
        // user message.
        let turn_bytes = everything.bytes / 10;
        let page = store
            .history_page(&session, turn_bytes * 5 / 2)
            .await
            .unwrap();
        assert!(page.truncated);
        assert_eq!(page.rows.len(), 8);
        assert_eq!(page.rows[0].1, said("question 8"));
        assert!(page.bytes <= turn_bytes * 5 / 2);
        let none = store.history_page(&session, 10).await.unwrap();
        assert!(none.rows.is_empty() && none.truncated);
    }

    #[tokio::test]
    async fn archived_rows_leave_the_session_but_stay_the_users() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store_turn(&store, &anna, &[said("old"), answered("old answer")]).await;
        let session = store_turn(&store, &anna, &[said("new"), answered("new answer")]).await;
        let rows = store.transcript(&session).await.unwrap();
        let bytes = store.transcript_bytes(&anna).await.unwrap();
        store
            .archive_before(&session, "we said old things", rows[2].0)
            .await
            .unwrap();
        let page = store.history_page(&session, u64::MAX).await.unwrap();
        assert_eq!(page.rows.len(), 2);
        assert_eq!(page.rows[0].1, said("new"));
        let current = store.current_session(&anna).await.unwrap();
        assert_eq!(current.id, session, "the session goes on");
        assert_eq!(current.summary.as_deref(), Some("we said old things"));
        assert_eq!(store.user_transcripts(&anna).await.unwrap().len(), 4);
        assert_eq!(store.transcript_bytes(&anna).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn compaction_attempts_are_remembered_per_session() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.compaction_attempt("s1").await.unwrap(), None);
        store.set_compaction_attempt("s1", Some(500)).await.unwrap();
        store.set_compaction_attempt("s1", Some(700)).await.unwrap();
        assert_eq!(store.compaction_attempt("s1").await.unwrap(), Some(700));
        store.set_compaction_attempt("s1", None).await.unwrap();
        assert_eq!(store.compaction_attempt("s1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn pending_inbox_count_counts_only_unanswered_rows_of_that_user() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store_turn(&store, &anna, &[said("answered")]).await;
        for n in 0..3 {
            store
                .insert_inbound(
                    &InboundMessage {
                        sender: Identity::new(ChannelKind::Telegram, PeerId::new("1").unwrap()),
                        chat_id: "1".into(),
                        external_id: format!("p{n}"),
                        cursor: None,
                        text: "waiting".into(),
                        sender_name: None,
                        language_code: None,
                        attachments: Vec::new(),
                    },
                    &anna,
                )
                .await
                .unwrap();
        }
        assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), 3);
        assert_eq!(store.pending_inbox_count(&user("ben")).await.unwrap(), 0);
    }

    /// A turn still running when its user is removed charges nothing, before or after a new
    /// user is given the id: the new user's budget starts at zero.
    #[tokio::test]
    async fn a_turn_of_a_removed_user_charges_no_budget_old_or_new() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        store.ensure_user(&anna, None).await.unwrap();
        let since = crate::db::now_millis();
        let one = UsageCharge {
            messages: 1,
            ..UsageCharge::default()
        };
        let day = "2030-01-01";
        assert!(store
            .charge_usage_since(&anna, day, one, since)
            .await
            .unwrap());
        store
            .end_user(&anna, crate::Ending::Remove)
            .await
            .unwrap()
            .unwrap();
        assert!(!store
            .charge_usage_since(&anna, day, one, since)
            .await
            .unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        store.ensure_user(&anna, None).await.unwrap();
        assert!(!store
            .charge_usage_since(&anna, day, one, since)
            .await
            .unwrap());
        let totals = store
            .usage_totals(std::slice::from_ref(&anna), day, "2030-01")
            .await
            .unwrap();
        assert_eq!(totals.messages_today, 0);
    }

    /// The cached page is the page `history_page` reads, whatever happened to the session in
    /// between: new turns, compaction archiving older rows, `/forget`, another session.
    #[tokio::test]
    async fn history_page_cached_is_always_the_page_history_page_reads() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let mut cache = None;
        async fn same(store: &Store, cache: &mut Option<HistoryCache>, session: &str) {
            for budget in [0, 10, 60, 100, 250, 1_000, u64::MAX] {
                let cached = store
                    .history_page_cached(cache, session, budget)
                    .await
                    .unwrap();
                let read = store.history_page(session, budget).await.unwrap();
                assert_eq!(cached.rows, read.rows, "budget {budget}");
                assert_eq!(cached.bytes, read.bytes, "budget {budget}");
                assert_eq!(cached.truncated, read.truncated, "budget {budget}");
                // As a worker does after its turn: the lent items go back to the cache.
                if let Some(cache) = cache.as_mut() {
                    cache.give_back(cached.rows.into_iter().map(|(_, item)| item).collect());
                }
            }
        }
        let mut session = String::new();
        for turn in 0..6 {
            session = store_turn(
                &store,
                &anna,
                &[
                    said(&format!("question {turn}")),
                    ConversationItem::ToolResult {
                        call_id: "c".into(),
                        content: "y".repeat(turn * 10),
                        is_error: false,
                    },
                    answered(&format!("answer {turn}")),
                ],
            )
            .await;
            same(&store, &mut cache, &session).await;
        }
        let rows = store.transcript(&session).await.unwrap();
        store
            .archive_before(&session, "summary", rows[9].0)
            .await
            .unwrap();
        same(&store, &mut cache, &session).await;
        store_turn(&store, &anna, &[said("after"), answered("compaction")]).await;
        same(&store, &mut cache, &session).await;
        store.forget_transcripts(&anna).await.unwrap();
        same(&store, &mut cache, &session).await;
        let next = store_turn(&store, &anna, &[said("new"), answered("session")]).await;
        same(&store, &mut cache, &next).await;
        assert!(store.history_budget.load(Ordering::SeqCst) > 0);
        drop(cache);
        assert_eq!(store.history_budget.load(Ordering::SeqCst), 0);
    }

    /// Three short turns of `who`; their session.
    async fn three_turns(store: &Store, who: &UserId) -> String {
        let mut session = String::new();
        for turn in 0..3 {
            session = store_turn(
                store,
                who,
                &[said(&format!("q{turn}")), answered(&format!("a{turn}"))],
            )
            .await;
        }
        session
    }

    /// Rewrites transcript row `id` in place (what an operator's tool or a bug could do).
    async fn rewrite_row(store: &Store, id: i64, item: &ConversationItem) {
        let json = serde_json::to_string(item).unwrap();
        store
            .with(move |c| {
                Ok(c.execute(
                    "UPDATE transcript SET item = ?1 WHERE id = ?2",
                    params![json, id],
                )?)
            })
            .await
            .unwrap();
    }

    /// The whole session's page from the cache, handed back as a worker does after its turn.
    async fn page_given_back(
        store: &Store,
        cache: &mut Option<HistoryCache>,
        session: &str,
    ) -> Vec<ConversationItem> {
        let page = store
            .history_page_cached(cache, session, u64::MAX)
            .await
            .unwrap();
        let items: Vec<ConversationItem> = page.rows.into_iter().map(|(_, item)| item).collect();
        if let Some(cache) = cache.as_mut() {
            cache.give_back(items.clone());
        }
        items
    }

    /// The cache is checked by the session's change count, not by counting its rows: a row
    /// rewritten in place (which a count would not see) or deleted from the middle makes the
    /// next page read afresh, and plain new turns keep the cache.
    #[tokio::test]
    async fn a_row_rewritten_or_deleted_under_the_cache_is_read_afresh() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let session = three_turns(&store, &anna).await;
        let mut cache = None;
        let first = page_given_back(&store, &mut cache, &session).await;
        assert_eq!(first.len(), 6);
        let changes = cache.as_ref().unwrap().changes;
        let rows = store.transcript(&session).await.unwrap();
        let id = rows[0].0;
        rewrite_row(&store, id, &said("q0, rewritten")).await;
        let second = page_given_back(&store, &mut cache, &session).await;
        assert_eq!(second[0], said("q0, rewritten"));
        assert!(cache.as_ref().unwrap().changes > changes);
        let middle = rows[2].0;
        store
            .with(move |c| Ok(c.execute("DELETE FROM transcript WHERE id = ?1", params![middle])?))
            .await
            .unwrap();
        let third = page_given_back(&store, &mut cache, &session).await;
        assert_eq!(
            third,
            store
                .history_page(&session, u64::MAX)
                .await
                .unwrap()
                .rows
                .into_iter()
                .map(|(_, i)| i)
                .collect::<Vec<_>>()
        );
        assert_eq!(third.len(), 5);
        let before = cache.as_ref().unwrap().changes;
        store_turn(&store, &anna, &[said("q3"), answered("a3")]).await;
        let fourth = page_given_back(&store, &mut cache, &session).await;
        assert_eq!(fourth.len(), 7);
        assert_eq!(
            cache.as_ref().unwrap().changes,
            before,
            "a new turn changes nothing"
        );
    }

    /// The wire forms a provider kept for the rows of a kept history go with that history: a
    /// row rewritten in place (or any change that makes the history be read afresh) comes with
    /// an empty cache of wire forms, so a provider never sends a row's old bytes; a page that
    /// was not lent from the kept history offers none; and the bytes kept are given back.
    #[tokio::test]
    async fn wire_forms_of_a_rewritten_row_are_never_reused() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let session = three_turns(&store, &anna).await;
        let mut cache = None;
        let first = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        let wire = cache
            .as_ref()
            .unwrap()
            .lent_wire()
            .expect("lent from the cache");
        let id = first.rows[0].0;
        let mut out = Vec::new();
        wire.rows("test")
            .append(id, &mut out, |out| {
                out.extend_from_slice(b"old bytes");
                Ok(())
            })
            .unwrap();
        assert!(wire.kept_bytes() > 0);
        cache
            .as_mut()
            .unwrap()
            .give_back(first.rows.into_iter().map(|(_, item)| item).collect());
        drop(wire);

        rewrite_row(&store, id, &said("q0, rewritten")).await;
        let second = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(second.rows[0], (id, said("q0, rewritten")));
        let fresh = cache.as_ref().unwrap().lent_wire().unwrap();
        assert_eq!(fresh.kept_bytes(), 0, "the old row's bytes are gone");
        let mut out = Vec::new();
        fresh
            .rows("test")
            .append(id, &mut out, |out| {
                out.extend_from_slice(b"new bytes");
                Ok(())
            })
            .unwrap();
        assert_eq!(out, b"new bytes");
        assert_eq!(
            store.history_budget.load(Ordering::SeqCst),
            cache.as_ref().unwrap().bytes + fresh.kept_bytes(),
            "the old wire forms were given back"
        );
        drop(fresh);
        cache
            .as_mut()
            .unwrap()
            .give_back(second.rows.into_iter().map(|(_, item)| item).collect());

        // A session over the cache's bound is read page by page: nothing to reuse.
        let bo = user("bo");
        let big = "x".repeat(HISTORY_CACHE_SESSION_BYTES as usize + 1);
        let big_session = store_turn(&store, &bo, &[said(&big), answered("ok")]).await;
        let mut other = None;
        let page = store
            .history_page_cached(&mut other, &big_session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(page.rows.len(), 2);
        assert!(other.as_ref().unwrap().lent_wire().is_none());
        drop(cache);
        drop(other);
        assert_eq!(
            store.history_budget.load(Ordering::SeqCst),
            0,
            "all given back"
        );
    }

    /// The page's items are lent, not copied: a loan that never comes back (a failed turn) or
    /// comes back wrong leaves no placeholder in any later page.
    #[tokio::test]
    async fn a_history_loan_not_given_back_or_given_back_wrong_never_shows_placeholders() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let session = three_turns(&store, &anna).await;
        let expected = store.history_page(&session, u64::MAX).await.unwrap().rows;
        let mut cache = None;
        // Lent and never given back.
        let first = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(first.rows, expected);
        let second = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(second.rows, expected);
        // Given back with a row missing: emptied, and its bytes are the budget's again.
        let mut short: Vec<ConversationItem> =
            second.rows.into_iter().map(|(_, item)| item).collect();
        short.pop();
        if let Some(cache) = cache.as_mut() {
            cache.give_back(short);
        }
        assert_eq!(store.history_budget.load(Ordering::SeqCst), 0);
        let third = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(third.rows, expected);
        // Given back whole: the cache holds the real items again and the next page comes
        // from it, still the same.
        if let Some(cache) = cache.as_mut() {
            cache.give_back(third.rows.into_iter().map(|(_, item)| item).collect());
            assert!(cache.lent.is_none());
            let held: Vec<ConversationItem> =
                cache.rows.iter().map(|(_, item, _)| item.clone()).collect();
            let wanted: Vec<ConversationItem> =
                expected.iter().map(|(_, item)| item.clone()).collect();
            assert_eq!(held, wanted);
        }
        let fourth = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(fourth.rows, expected);
    }

    /// A session over the cache's bound is read page by page, and holds nothing of the budget.
    #[tokio::test]
    async fn a_session_over_the_bound_is_not_cached() {
        let store = Store::open_in_memory().unwrap();
        let anna = user("anna");
        let big = "z".repeat((HISTORY_CACHE_SESSION_BYTES / 2) as usize);
        let mut session = String::new();
        for _ in 0..3 {
            session = store_turn(&store, &anna, &[said(&big), answered("ok")]).await;
        }
        let mut cache = None;
        let page = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(page.rows.len(), 6);
        assert_eq!(store.history_budget.load(Ordering::SeqCst), 0);
        let again = store
            .history_page_cached(&mut cache, &session, u64::MAX)
            .await
            .unwrap();
        assert_eq!(again.rows, page.rows);
    }
}
