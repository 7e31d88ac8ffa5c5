//! Discord Gateway payloads: the fields we use, nothing more. Unknown fields are ignored;
//! missing optional ones default, so one odd event never breaks the connection.

use serde::{Deserialize, Serialize};

/// Gateway opcodes we send or handle.
pub(crate) mod op {
    pub const DISPATCH: u8 = 0;
    pub const HEARTBEAT: u8 = 1;
    pub const IDENTIFY: u8 = 2;
    pub const RESUME: u8 = 6;
    pub const RECONNECT: u8 = 7;
    pub const INVALID_SESSION: u8 = 9;
    pub const HELLO: u8 = 10;
    pub const HEARTBEAT_ACK: u8 = 11;
}

/// Intents (bit flags).
pub(crate) mod intents {
    pub const GUILD_MESSAGES: u64 = 1 << 9;
    pub const DIRECT_MESSAGES: u64 = 1 << 12;
    pub const MESSAGE_CONTENT: u64 = 1 << 15;
}

/// One frame from the gateway: `{"op": .., "d": .., "s": .., "t": ..}`.
#[derive(Debug, Deserialize)]
pub(crate) struct Frame {
    pub op: u8,
    #[serde(default)]
    pub d: serde_json::Value,
    #[serde(default)]
    pub s: Option<i64>,
    #[serde(default)]
    pub t: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Hello {
    pub heartbeat_interval: u64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Ready {
    pub session_id: String,
    pub resume_gateway_url: Option<String>,
    pub user: User,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct User {
    pub id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub global_name: Option<String>,
    #[serde(default)]
    pub bot: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessageCreate {
    pub id: String,
    pub channel_id: String,
    #[serde(default)]
    pub guild_id: Option<String>,
    pub author: User,
    #[serde(default)]
    pub content: String,
    #[serde(default, rename = "type")]
    pub kind: u32,
    #[serde(default)]
    pub mentions: Vec<User>,
    /// Set when a webhook posted it.
    #[serde(default)]
    pub webhook_id: Option<String>,
    /// Message flags; [`IS_VOICE_MESSAGE`] marks a voice message.
    #[serde(default)]
    pub flags: u64,
    /// Files sent with the message (at most 10 on Discord), each parsed on its own
    /// ([`Attachment`]) so one odd attachment never loses the message.
    #[serde(default)]
    pub attachments: Vec<serde_json::Value>,
}

/// Message flag of a voice message (its one attachment is the recording).
pub(crate) const IS_VOICE_MESSAGE: u64 = 1 << 13;

/// An attachment object of a message. Everything in it is what the sender's client claimed,
/// except `url`, which Discord made (and which we check anyway before fetching it).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Attachment {
    pub id: String,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    pub url: String,
    /// Length of a voice message in seconds (fractional).
    #[serde(default)]
    pub duration_secs: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Outgoing<T: Serialize> {
    pub op: u8,
    pub d: T,
}

#[derive(Debug, Serialize)]
pub(crate) struct Identify<'a> {
    pub token: &'a str,
    pub intents: u64,
    pub properties: Properties,
}

#[derive(Debug, Serialize)]
pub(crate) struct Properties {
    pub os: &'static str,
    pub browser: &'static str,
    pub device: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct Resume<'a> {
    pub token: &'a str,
    pub session_id: &'a str,
    pub seq: i64,
}
