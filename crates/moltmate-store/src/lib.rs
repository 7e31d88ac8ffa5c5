//! Storage of the Moltmates gateway.
//!
//! * [`db::Store`] — one embedded SQLite database (`<home>/moltmate.db`, WAL, versioned
//!   migrations) holding users, identities, sessions, transcripts, the inbox and outbox that make
//!   message handling crash-safe, pairing requests, token usage and audit events.
//! * [`homes::Homes`] — each user's files under `<home>/users/<user_id>/` (SOUL.md, USER.md,
//!   IDENTITY.md, MEMORY.md, `memory/YYYY-MM-DD.md`, `workspace/`), read beneath the home with
//!   the kernel's `RESOLVE_BENEATH` and written atomically (temp file + fsync + rename).
//! * [`ending`] — `users remove`/`reset` in one transaction each, and the `user_events` signal
//!   a running gateway polls to stop what the user had running.
//! * [`reminders`] — each user's reminders (`schedule` tool) and the one transaction that turns
//!   a due occurrence into an inbox row (so none is delivered twice, and none lost to a crash).
//! * [`downloads`] — files `send_file` keeps for web and API users, behind per-user links
//!   that expire.
//! * [`usage`] — per-user, per-day counters for budgets (messages, tokens, spend, `exec` time),
//!   stored transcript bytes (kept by triggers), queue length, history in bounded pages.
//!
//! Durability model: an inbound message is inserted into `inbox` (together with the channel
//! cursor) before the channel acknowledges it; a turn's transcript items, token usage, reply
//! (into `outbox`) and the inbox row's completion are committed in one transaction; a reply is
//! marked `sending` before it is handed to the channel and `sent` after. After `kill -9`, pending
//! inbox rows are processed again and `pending` outbox rows are sent; `sending` rows are *not*
//! resent (at-most-once delivery of replies — see ARCHITECTURE.md).

pub mod auth;
pub mod db;
pub mod downloads;
mod durable;
pub mod ending;
pub mod homes;
pub mod memory_index;
pub mod pairing;
mod readers;
pub mod reminders;
pub mod reports;
pub mod usage;

pub use db::{
    AuditEvent, AuditRecord, InboxItem, OutboxItem, PairingRequest, PairingState, SessionRecord,
    Store, StoreError, TurnRecord, UsageRow, UserRecord, SCHEMA_VERSION,
};
pub use ending::{Completion, Ended, Ending, InboxState, UserEvent, UserEventKind};
pub use homes::{HomeError, Homes};
pub use pairing::{PairingLimits, PairingOutcome, StrangerMessage};
pub use reminders::{
    CreateOutcome, DueReminder, FireOutcome, FireRequest, NewReminder, ReminderFire, ReminderRecord,
};
pub use usage::{
    DeferredCharge, HistoryCache, HistoryPage, TranscriptPage, UsageCharge, UsageTotals, UserUsage,
};
