//! Moltmates channels: adapters between messaging services and the gateway.
//!
//! A channel turns a service's wire format into [`moltmate_core::channel::InboundMessage`]s,
//! hands them to the gateway's [`moltmate_core::channel::InboundSink`], and acknowledges them
//! to the service only once the sink has stored them. It never decides who may talk to the
//! assistant and never calls a model.
//!
//! Currently implemented: [`telegram`] (Bot API long polling), [`signal`] (signal-cli's
//! JSON-RPC daemon), [`whatsapp`] (Cloud API webhook + Graph API), [`discord`] (Gateway
//! websocket + REST), [`slack`] (Socket Mode or Events API webhook + Web API).

pub mod discord;
mod retry;
pub mod signal;
pub mod slack;
pub mod telegram;
pub mod whatsapp;

pub use discord::{DiscordChannel, DiscordSettings, DiscordSetupError};
pub use signal::{SignalChannel, SignalDaemon, SignalSettings};
pub use slack::{SlackChannel, SlackMode, SlackSettings, SlackSetupError};

pub use telegram::{BotInfo, TelegramChannel, TelegramSettings, TelegramSetupError};
pub use whatsapp::{WhatsAppChannel, WhatsAppSettings};
