//! Contracts and shared types of the Moltmates gateway.
//!
//! This crate is deliberately small and has no I/O of its own. Every other crate depends on it;
//! it depends on none of them. It owns:
//!
//! * identifiers whose validity is proven at construction ([`UserId`], [`ChannelKind`], [`PeerId`]),
//!   so nothing downstream takes an `Option<String>` where a user is meant;
//! * the channel contract ([`channel::Channel`], [`channel::InboundSink`]) and what the operator
//!   sees of each channel ([`channel_status::ChannelHealth`]);
//! * the model contract ([`model::Provider`]) and provider-neutral conversation types;
//! * the tool contract ([`tool::Tool`], [`tool::ToolContext`]), where a tool call always carries
//!   its user's identity;
//! * the sandbox contract ([`sandbox::Sandbox`]);
//! * [`blocking::run`]: blocking work on the runtime's blocking pool with a deadline, the one way
//!   every layer keeps filesystem work (and anything else that may block) off async code;
//! * what `exec.security: "allowlist"` may run ([`allowlist`]): the default `safeBins` and the
//!   programs that can never be allowlisted;
//! * the shape of `moltmate doctor`'s report ([`doctor::Report`]) and the [`doctor::SecurityChecks`]
//!   seam through which the admin page gets it.

pub mod allowlist;
pub mod blocking;
pub mod channel;
pub mod channel_status;
pub mod doctor;
pub mod ids;
pub mod model;
pub mod sandbox;
pub mod tool;

pub use ids::{ChannelKind, Identity, InvalidId, PeerId, UserId};

/// Cooperative shutdown for every long-running task. Cloned freely; cancelled once by the binary.
pub type Shutdown = tokio_util::sync::CancellationToken;
