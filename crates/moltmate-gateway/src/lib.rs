//! The Moltmates gateway: everything between a channel and a model.
//!
//! ```text
//! channel ──InboundMessage──▶ Gateway::accept ──(access policy)──▶ inbox (SQLite, durable)
//!                                                     │
//!                            per-user worker ◀────────┘   (one task per active user:
//!                                 │                         strictly in order for that user,
//!                                 ▼                         concurrent across users)
//!                            agent turn: prompt from the user's own files + session history,
//!                            model ⇄ tools (each call carries the user's identity)
//!                                 │
//!                                 ▼
//!                 transcript + usage + outbox (one transaction) ──▶ channel.send_text
//! ```
//!
//! * [`access`] — `dmPolicy` (pairing, allowlist, open, disabled): who reaches a model at all.
//! * [`router`] — [`Gateway`]: accepts messages, runs per-user workers, delivers replies.
//! * [`agent`] — one turn: model calls, tool calls, bounded iterations, audit.
//! * [`prompt`] — the system prompt, built from that user's files only.
//! * [`persona`] — default persona files for a new home.
//! * [`strangers`] — bounds on what senders who are not let in cost (audit rows, log lines).
//! * [`limits`] — caps per answer, turn and user; [`budget`] — daily and monthly budgets.
//! * [`schedule`] — reminders: the `schedule` tool and its rules (the scheduler task is in
//!   [`router`]).

pub mod access;
pub mod agent;
pub mod budget;
pub mod limits;
pub mod memory_tool;
pub mod metrics;
pub mod onboarding;
pub mod persona;
pub mod prompt;
pub mod router;
pub mod schedule;
pub mod session;
pub mod settings;
pub mod strangers;

pub use router::{Gateway, GatewayParts, Reply, Submitted};
pub use settings::{
    AttachmentSettings, GatewaySettings, SandboxIdPolicy, SpeechSettings, UserSettings,
};
