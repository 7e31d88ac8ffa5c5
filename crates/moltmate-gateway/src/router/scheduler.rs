//! The reminder scheduler: one task that turns due reminders into inbox rows.
//!
//! It sleeps until the earliest reminder is due (at most [`MAX_SLEEP`], so a reminder another
//! process created is seen too) or until the `schedule` tool wakes it, then fires at most
//! [`BATCH`] due reminders per round. Firing is the store's one durable transaction (the inbox
//! row and the reminder moving on), after which the user's worker is woken: from there a
//! reminder is an accepted message like any other — answered in the user's order, under their queue
//! cap and budgets, once. It never runs on a channel's accept path and ends with the gateway's
//! `Shutdown`.

use super::worker::wake_worker;
use super::Inner;
use crate::schedule::rules;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use moltmate_core::blocking;
use moltmate_store::{DueReminder, FireOutcome, FireRequest};
use std::sync::Arc;
use std::time::Duration;

/// Due reminders fired per round at most; more wait for the next round (right after).
const BATCH: usize = 32;
/// Longest sleep between two looks at the database.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// A reminder whose user's queue is full is looked at again this much later.
const QUEUE_FULL_RETRY: chrono::Duration = chrono::Duration::seconds(60);
/// Longest the next occurrence of one rule may take to compute.
const NEXT_DEADLINE: Duration = Duration::from_secs(5);

pub(super) async fn run(inner: Arc<Inner>) {
    // Reminders due before this were due while the gateway was down: they are marked late.
    let started = inner.settings.clock.now();
    let mut backoff = Duration::from_millis(500);
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        let now = inner.settings.clock.now();
        let sleep = match inner
            .store
            .due_reminders(now.timestamp_millis(), BATCH)
            .await
        {
            Ok(due) => {
                backoff = Duration::from_millis(500);
                let full = due.len() == BATCH;
                for reminder in due {
                    if inner.shutdown.is_cancelled() {
                        return;
                    }
                    if let Err(e) = fire(&inner, reminder, now, started).await {
                        tracing::error!(error = %e, "could not fire a reminder; will retry");
                    }
                }
                if full {
                    // More are due: go on right away, but let everything else run first.
                    tokio::task::yield_now().await;
                    continue;
                }
                match inner.store.next_reminder_attempt().await {
                    Ok(Some(at)) => {
                        let wait = at.saturating_sub(inner.settings.clock.now().timestamp_millis());
                        Duration::from_millis(u64::try_from(wait).unwrap_or(0)).min(MAX_SLEEP)
                    }
                    Ok(None) => MAX_SLEEP,
                    Err(e) => {
                        tracing::error!(error = %e, "could not read when the next reminder is due");
                        backoff
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not read due reminders; retrying");
                backoff = (backoff * 2).min(MAX_SLEEP);
                backoff
            }
        };
        if sleep.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = inner.schedule_wake.notified() => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

/// Fires one due reminder: computes its next occurrence (recurring), then commits the inbox
/// row and the reminder's move in one transaction, and wakes the user's worker.
async fn fire(
    inner: &Arc<Inner>,
    reminder: DueReminder,
    now: DateTime<Utc>,
    started: DateTime<Utc>,
) -> Result<(), moltmate_store::StoreError> {
    let zone = reminder.timezone.parse::<Tz>().unwrap_or_else(|_| {
        tracing::warn!(user = %reminder.user, "a reminder has an unknown time zone; using the server's");
        inner.settings.server_timezone
    });
    let due = DateTime::from_timestamp_millis(reminder.due_at).unwrap_or(now);
    let (next_due, missed) = match reminder.cron.clone() {
        None => (None, 0),
        Some(rule) => {
            let min_interval = inner.settings.reminder_min_interval_minutes;
            let next = blocking::run(
                "computing a reminder's next time",
                NEXT_DEADLINE,
                move || {
                    rules::parse_cron(&rule)
                        .map(|cron| rules::after_delivery(&cron, zone, due, now, min_interval))
                },
            )
            .await;
            match next {
                Ok(Ok((next, missed))) => (next.map(|t| t.timestamp_millis()), missed),
                // A rule that no longer parses or computes: deliver this one, then end it.
                Ok(Err(e)) => {
                    tracing::warn!(user = %reminder.user, error = %e, "a recurring reminder's rule failed; it ends after this delivery");
                    (None, 0)
                }
                Err(e) => {
                    tracing::warn!(user = %reminder.user, error = %e, "a recurring reminder's rule took too long; it ends after this delivery");
                    (None, 0)
                }
            }
        }
    };
    let request = FireRequest {
        id: reminder.id,
        due_at: reminder.due_at,
        now: now.timestamp_millis(),
        next_due,
        missed,
        after_downtime: reminder.due_at < started.timestamp_millis(),
        preferred: inner
            .settings
            .preferred_channels
            .get(&reminder.user)
            .copied(),
        pushable: inner.channels.keys().copied().collect(),
        retry_at: (now + QUEUE_FULL_RETRY).timestamp_millis(),
    };
    let for_caps = Arc::clone(inner);
    let outcome = inner
        .store
        .fire_reminder(request, move |user, channel| {
            for_caps
                .settings
                .user_settings(user, channel)
                .limits
                .queued_messages
        })
        .await?;
    match outcome {
        FireOutcome::Fired { user, .. } => {
            inner.metrics.count_message("reminder", "queued");
            tracing::info!(user = %user, reminder = reminder.number, late_ms = now.timestamp_millis().saturating_sub(reminder.due_at), "reminder due");
            wake_worker(inner, &user);
        }
        FireOutcome::AlreadyFired { user } => wake_worker(inner, &user),
        FireOutcome::QueueFull { user } => {
            inner.metrics.count_message("reminder", "queue_full");
            tracing::info!(user = %user, reminder = reminder.number, "reminder waits: the user's queue is full");
        }
        FireOutcome::Gone => {}
    }
    Ok(())
}
