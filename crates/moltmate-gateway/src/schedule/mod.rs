//! Reminders and scheduled messages.
//!
//! * [`rules`] — the `schedule` tool's arguments, times in a zone (DST gaps and overlaps),
//!   cron rules, the next occurrence; pure functions of an explicit `now`.
//! * [`texts`] — what a due reminder says: the turn's message, the "late" mark, the plain
//!   notice over budget, the time note of the system prompt.
//! * [`tool`] — the `schedule` tool (create, list, cancel), bound to one user and their limits
//!   for one turn: the user comes from the tool context, never from the arguments.
//! * the scheduler (`router/scheduler.rs`, next to accepting: it makes inbox rows too) — the
//!   one task that turns due reminders into inbox rows (durably, once per occurrence) and
//!   wakes the user's worker, which answers them as a turn.
//!
//! Times are in the user's zone (`users.<id>.timezone`, else the server's).

pub mod rules;
pub mod texts;
pub mod tool;

use chrono::{DateTime, Utc};
use std::sync::Arc;

/// Where "now" comes from: the system clock, or a test's. Cheap to clone.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// A clock reading `now` (tests move time without sleeping).
    pub fn new(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new(Utc::now)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

pub use tool::{ScheduleBinding, ScheduleTool};
