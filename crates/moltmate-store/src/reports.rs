//! What the operator reads about usage (`/admin`, `moltmate usage`): per user and day, the
//! messages received, model calls and tokens by model, tool calls and `exec` time, and when
//! each user was last seen.
//!
//! Built on the tables every turn already writes — `inbox` (messages), `token_usage` (one row
//! per model call) and `audit_events` (one `tool_call` row per tool call, with its duration) —
//! so there is no second bookkeeping to drift. Reports read through a connection of their own
//! ([`Store::read_report`]), never the gateway's, and return at most [`MAX_REPORT_ROWS`]
//! grouped rows per table (the result says when it was cut).
//!
//! Days are calendar days in the gateway's local time (`YYYY-MM-DD`), like budgets.

use crate::db::{Store, StoreError};
use moltmate_core::UserId;
use rusqlite::params;
use serde::Serialize;
use std::collections::BTreeMap;

/// Grouped rows read per table at most.
pub const MAX_REPORT_ROWS: usize = 200_000;

/// Tokens of one model on one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelTokens {
    pub provider: String,
    pub model: String,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One user's activity on one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DayActivity {
    pub user: String,
    /// `YYYY-MM-DD`, local time.
    pub day: String,
    /// Messages received from the user (web, API, Telegram, terminal).
    pub messages: u64,
    /// Model calls, all models (a turn with tool rounds makes several).
    pub model_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Tool calls of the user's assistant, all tools.
    pub tool_calls: u64,
    /// `exec` calls and their summed wall-clock time.
    pub exec_calls: u64,
    pub exec_ms: u64,
    /// Tokens by model, for estimating cost (sorted by provider, model).
    pub by_model: Vec<ModelTokens>,
}

/// Activity since a moment, and when each user was last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActivityReport {
    /// Sorted by user, then day.
    pub days: Vec<DayActivity>,
    /// Last message received or model call made, per user (unix millis), over all time.
    pub last_seen: BTreeMap<String, i64>,
    /// True when a table had more grouped rows than [`MAX_REPORT_ROWS`]; the rest is missing.
    pub truncated: bool,
}

const DAY: &str = "date(? / 1000, 'unixepoch', 'localtime')";

fn day_of(column: &str) -> String {
    DAY.replace('?', column)
}

fn entry(
    days: &mut BTreeMap<(String, String), DayActivity>,
    user: String,
    day: String,
) -> &mut DayActivity {
    days.entry((user.clone(), day.clone()))
        .or_insert_with(|| DayActivity {
            user,
            day,
            ..DayActivity::default()
        })
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl Store {
    /// Activity of every user (or of `user`) from `since` (unix millis) on.
    pub async fn activity(
        &self,
        since: i64,
        user: Option<&UserId>,
    ) -> Result<ActivityReport, StoreError> {
        let user = user.map(|u| u.as_str().to_string());
        self.read_report(move |c| {
            let mut report = ActivityReport::default();
            let mut days: BTreeMap<(String, String), DayActivity> = BTreeMap::new();
            let limit = MAX_REPORT_ROWS as i64 + 1;

            let sql = format!(
                "SELECT user_id, {d} AS day, provider, model, COUNT(*), CAST(MIN(total(input_tokens), 9007199254740992.0) AS INTEGER), CAST(MIN(total(output_tokens), 9007199254740992.0) AS INTEGER)
                 FROM token_usage WHERE at >= ?1 AND (?2 IS NULL OR user_id = ?2)
                 GROUP BY user_id, day, provider, model ORDER BY user_id, day, provider, model LIMIT {limit}",
                d = day_of("at")
            );
            let mut statement = c.prepare(&sql)?;
            let mut rows = statement.query(params![since, user])?;
            let mut read = 0usize;
            while let Some(row) = rows.next()? {
                read += 1;
                if read > MAX_REPORT_ROWS {
                    report.truncated = true;
                    break;
                }
                let day = entry(&mut days, row.get(0)?, row.get(1)?);
                let tokens = ModelTokens {
                    provider: row.get(2)?,
                    model: row.get(3)?,
                    calls: to_u64(row.get(4)?),
                    input_tokens: to_u64(row.get(5)?),
                    output_tokens: to_u64(row.get(6)?),
                };
                day.model_calls = day.model_calls.saturating_add(tokens.calls);
                day.input_tokens = day.input_tokens.saturating_add(tokens.input_tokens);
                day.output_tokens = day.output_tokens.saturating_add(tokens.output_tokens);
                day.by_model.push(tokens);
            }

            let sql = format!(
                "SELECT user_id, {d} AS day, COUNT(*) FROM inbox
                 WHERE received_at >= ?1 AND (?2 IS NULL OR user_id = ?2)
                 GROUP BY user_id, day ORDER BY user_id, day LIMIT {limit}",
                d = day_of("received_at")
            );
            let mut statement = c.prepare(&sql)?;
            let mut rows = statement.query(params![since, user])?;
            let mut read = 0usize;
            while let Some(row) = rows.next()? {
                read += 1;
                if read > MAX_REPORT_ROWS {
                    report.truncated = true;
                    break;
                }
                entry(&mut days, row.get(0)?, row.get(1)?).messages = to_u64(row.get(2)?);
            }

            let sql = format!(
                "SELECT user_id, {d} AS day, COUNT(*),
                        SUM(CASE WHEN tool = 'exec' THEN 1 ELSE 0 END),
                        SUM(CASE WHEN tool = 'exec' THEN COALESCE(duration_ms, 0) ELSE 0 END)
                 FROM audit_events WHERE kind = 'tool_call' AND at >= ?1 AND (?2 IS NULL OR user_id = ?2)
                 GROUP BY user_id, day ORDER BY user_id, day LIMIT {limit}",
                d = day_of("at")
            );
            let mut statement = c.prepare(&sql)?;
            let mut rows = statement.query(params![since, user])?;
            let mut read = 0usize;
            while let Some(row) = rows.next()? {
                read += 1;
                if read > MAX_REPORT_ROWS {
                    report.truncated = true;
                    break;
                }
                let day = entry(&mut days, row.get(0)?, row.get(1)?);
                day.tool_calls = to_u64(row.get(2)?);
                day.exec_calls = to_u64(row.get(3)?);
                day.exec_ms = to_u64(row.get(4)?);
            }

            for (table, at) in [("inbox", "received_at"), ("token_usage", "at")] {
                let mut statement = c.prepare(&format!(
                    "SELECT user_id, MAX({at}) FROM {table} WHERE (?1 IS NULL OR user_id = ?1) GROUP BY user_id LIMIT {limit}"
                ))?;
                let mut rows = statement.query(params![user])?;
                while let Some(row) = rows.next()? {
                    let (who, at): (String, i64) = (row.get(0)?, row.get(1)?);
                    let seen = report.last_seen.entry(who).or_insert(at);
                    *seen = (*seen).max(at);
                }
            }
            report.days = days.into_values().collect();
            Ok(report)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::model::TokenUsage;
    use moltmate_core::{ChannelKind, Identity, PeerId};

    #[tokio::test]
    async fn activity_groups_messages_tokens_and_tool_calls_per_user_and_day() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        store.ensure_user(&anna, None).await.unwrap();
        let message = InboundMessage {
            attachments: Vec::new(),
            sender: Identity::new(ChannelKind::Web, PeerId::new("anna").unwrap()),
            chat_id: "anna".into(),
            external_id: "1".into(),
            cursor: None,
            text: "hi".into(),
            sender_name: None,
            language_code: None,
        };
        let inbox = store
            .insert_inbound(&message, &anna)
            .await
            .unwrap()
            .unwrap();
        let session = store.current_session(&anna).await.unwrap();
        let usage = TokenUsage {
            input_tokens: 100,
            output_tokens: 10,
        };
        let _ = store
            .complete_turn(crate::TurnRecord {
                charge: None,
                inbox_id: inbox,
                user: anna.clone(),
                session_id: session.id,
                items: vec![],
                reply: None,
                usage: vec![
                    ("anthropic".into(), "a".into(), usage),
                    ("anthropic".into(), "a".into(), usage),
                    ("openai".into(), "b".into(), usage),
                ],
            })
            .await
            .unwrap();
        for (tool, ms) in [("exec", 40), ("exec", 60), ("read", 1)] {
            store
                .record_audit(crate::AuditEvent {
                    user: anna.clone(),
                    kind: "tool_call".into(),
                    tool: Some(tool.into()),
                    args_digest: None,
                    duration_ms: Some(ms),
                    outcome: "ok".into(),
                    detail: None,
                })
                .await
                .unwrap();
        }
        let report = store.activity(0, None).await.unwrap();
        assert_eq!(report.days.len(), 1, "{report:?}");
        let day = &report.days[0];
        assert_eq!(
            (
                day.messages,
                day.model_calls,
                day.input_tokens,
                day.output_tokens
            ),
            (1, 3, 300, 30)
        );
        assert_eq!((day.tool_calls, day.exec_calls, day.exec_ms), (3, 2, 100));
        assert_eq!(day.by_model.len(), 2);
        assert_eq!(day.by_model[0].calls, 2);
        assert!(report.last_seen.contains_key("anna"));
        let none = store.activity(i64::MAX, None).await.unwrap();
        assert!(none.days.is_empty());
    }
}
