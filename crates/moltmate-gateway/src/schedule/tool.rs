//! The `schedule` tool: create, list and cancel the calling user's reminders.
//!
//! An instance is bound to one user, their zone and their limits for one turn (the worker
//! builds it from the turn's settings); the user is the one in the tool context, never one
//! named in the arguments, and every query is scoped to them, so another user's reminder is
//! simply "not found".

use super::rules::{self, Request};
use super::Clock;
use async_trait::async_trait;
use chrono_tz::Tz;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_core::UserId;
use moltmate_store::{CreateOutcome, NewReminder, ReminderRecord, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The tool's argument schema, built once.
static PARAMETERS: std::sync::LazyLock<std::sync::Arc<serde_json::Value>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(rules::parameters()));

/// Longest a plan may compute (an odd cron rule can make the search scan years).
const PLAN_DEADLINE: Duration = Duration::from_secs(5);

/// The `schedule` tool for one user's turn.
pub struct ScheduleTool {
    pub(crate) store: Store,
    /// The user of the turn; calls for anyone else are refused.
    pub(crate) user: UserId,
    /// The user's zone (`users.<id>.timezone`, else the server's).
    pub(crate) zone: Tz,
    /// `limits.reminders` of the user's trust level.
    pub(crate) max_reminders: usize,
    /// `limits.reminderMinIntervalMinutes`.
    pub(crate) min_interval_minutes: u32,
    pub(crate) clock: Clock,
    /// Wakes the scheduler, which may be sleeping past the new reminder's time.
    pub(crate) wake: Arc<Notify>,
}

/// What a [`ScheduleTool`] is bound to besides the store.
#[derive(Debug, Clone)]
pub struct ScheduleBinding {
    /// The turn's user.
    pub user: UserId,
    /// Their zone.
    pub zone: Tz,
    /// Their `limits.reminders`.
    pub max_reminders: usize,
    /// `limits.reminderMinIntervalMinutes`.
    pub min_interval_minutes: u32,
    pub clock: Clock,
}

impl ScheduleTool {
    /// A tool for `binding.user`'s turn; `wake` is notified when a reminder is created.
    pub fn new(store: Store, binding: ScheduleBinding, wake: Arc<Notify>) -> Self {
        ScheduleTool {
            store,
            user: binding.user,
            zone: binding.zone,
            max_reminders: binding.max_reminders,
            min_interval_minutes: binding.min_interval_minutes,
            clock: binding.clock,
            wake,
        }
    }
}

fn fatal(e: moltmate_store::StoreError) -> ToolError {
    ToolError::Fatal(e.to_string())
}

/// One reminder in a line, for `list`.
fn describe(reminder: &ReminderRecord, fallback: Tz) -> String {
    let zone = reminder.timezone.parse::<Tz>().unwrap_or(fallback);
    let next = chrono::DateTime::from_timestamp_millis(reminder.due_at)
        .map(|t| rules::in_words(t.with_timezone(&zone)))
        .unwrap_or_else(|| "?".to_string());
    let how = match &reminder.cron {
        Some(rule) => match rules::parse_cron(rule) {
            Ok(cron) => format!(
                "recurring ({}, rule \"{rule}\"), next {next}",
                cron.describe().trim_end_matches('.')
            ),
            Err(_) => format!("recurring (rule \"{rule}\"), next {next}"),
        },
        None => format!("once, {next}"),
    };
    format!(
        "#{} — {how} ({}) — {}",
        reminder.number, reminder.timezone, reminder.text
    )
}

#[async_trait]
impl Tool for ScheduleTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "schedule".to_string(),
            description: "Reminders for your user: create one (once at a local date and time, once in N minutes, \
                          or recurring by a cron rule), list theirs, or cancel one by its number. Times are in your \
                          user's time zone unless you name another. When a reminder is due you get a message starting \
                          with [Reminder #N ...] and tell your user in your own words. Repeat back to your user what \
                          the tool says was set."
                .to_string(),
            // One schema for every user's turn (the tool is registered per turn): providers
            // recognise a tool list they encoded before by its schemas' pointers.
            parameters: std::sync::Arc::clone(&PARAMETERS),
        }
    }

    async fn call(
        &self,
        context: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        if context.user != self.user {
            // The worker binds each instance to its turn's user; anything else is a bug, and
            // says nothing about anyone's reminders.
            return Err(ToolError::Refused("no reminders found".to_string()));
        }
        let request = rules::parse_arguments(arguments).map_err(ToolError::InvalidArguments)?;
        let now = self.clock.now();
        match request {
            Request::Create {
                text,
                when,
                timezone,
            } => {
                let zone = match timezone {
                    Some(name) => rules::zone(&name).map_err(ToolError::InvalidArguments)?,
                    None => self.zone,
                };
                if self.max_reminders == 0 {
                    return Err(ToolError::Refused(
                        "your user may not set reminders (the operator's limits.reminders is 0 for them)".to_string(),
                    ));
                }
                let min_interval = self.min_interval_minutes;
                let planned =
                    moltmate_core::blocking::run("checking a reminder", PLAN_DEADLINE, move || {
                        rules::plan(&when, zone, now, min_interval)
                    })
                    .await
                    .map_err(|e| {
                        ToolError::Failed(format!(
                            "the rule took too long to check ({e}); use a simpler one"
                        ))
                    })?
                    .map_err(ToolError::InvalidArguments)?;
                let outcome = self
                    .store
                    .create_reminder(
                        NewReminder {
                            user: self.user.clone(),
                            text,
                            cron: planned.cron.clone(),
                            timezone: zone.name().to_string(),
                            due_at: planned.first.timestamp_millis(),
                        },
                        self.max_reminders,
                    )
                    .await
                    .map_err(fatal)?;
                match outcome {
                    CreateOutcome::Created(record) => {
                        self.wake.notify_one();
                        Ok(ToolOutput::text(format!(
                            "Reminder #{} set: {}. Tell your user in these words when it will come.",
                            record.number, planned.words
                        )))
                    }
                    CreateOutcome::AtCap { cap } => Err(ToolError::Refused(format!(
                        "your user already has {cap} reminders, the most they may have; cancel one first (list shows them)"
                    ))),
                }
            }
            Request::List => {
                let reminders = self.store.list_reminders(&self.user).await.map_err(fatal)?;
                let now_words = format!(
                    "It is now {} ({}).",
                    rules::in_words(now.with_timezone(&self.zone)),
                    self.zone.name()
                );
                if reminders.is_empty() {
                    return Ok(ToolOutput::text(format!("No reminders. {now_words}")));
                }
                let mut text = format!(
                    "{} reminder(s) (at most {}). {now_words}",
                    reminders.len(),
                    self.max_reminders
                );
                for reminder in &reminders {
                    text.push('\n');
                    text.push_str(&describe(reminder, self.zone));
                }
                Ok(ToolOutput::text(text))
            }
            Request::Cancel { number } => {
                if self
                    .store
                    .cancel_reminder(&self.user, number)
                    .await
                    .map_err(fatal)?
                {
                    Ok(ToolOutput::text(format!("Reminder #{number} cancelled.")))
                } else {
                    Err(ToolError::Failed(format!(
                        "reminder #{number} not found (list shows your user's reminders)"
                    )))
                }
            }
        }
    }
}
