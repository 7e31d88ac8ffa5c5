//! Discord channel settings.

use moltmate_core::channel::GroupPolicy;
use std::fmt;
use std::time::Duration;

/// Discord's REST API, version 10. The gateway's websocket URL is asked from it
/// (`GET /gateway/bot`), so a test double only needs this one URL.
pub const DEFAULT_API_URL: &str = "https://discord.com/api/v10";

/// How the Discord channel connects and how patiently it retries.
///
/// `Debug` never shows the bot token.
#[derive(Clone)]
pub struct DiscordSettings {
    /// The bot's token from the Developer Portal (Bot → Reset Token). Sent only in the
    /// `Authorization` header and the gateway's Identify/Resume payloads.
    pub bot_token: String,
    /// Base URL of the REST API, e.g. `https://discord.com/api/v10`.
    pub api_url: String,
    /// Group conversations (server channels and threads).
    pub groups: GroupPolicy,
    /// Timeout of one REST request, and of the websocket handshake.
    pub request_timeout: Duration,
    /// First delay of the exponential backoff after a lost connection or a server error.
    pub backoff_initial: Duration,
    /// Upper bound of that backoff (before jitter).
    pub backoff_max: Duration,
    /// Upper bound for a server-requested `retry_after`.
    pub max_retry_after: Duration,
    /// How many times one outgoing message is attempted before `send_text` gives up.
    pub send_attempts: u32,
    /// Largest file `send_file` uploads (Discord's limit for bots without boosts: 10 MiB).
    pub max_upload_bytes: u64,
}

/// Discord's upload limit for a bot in a DM or an unboosted server.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 10 << 20;

impl DiscordSettings {
    /// Settings for the public API with production defaults.
    pub fn new(bot_token: impl Into<String>) -> Self {
        DiscordSettings {
            bot_token: bot_token.into(),
            api_url: DEFAULT_API_URL.to_string(),
            groups: GroupPolicy::default(),
            request_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            send_attempts: 5,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
        }
    }

    /// Same settings against another REST base URL.
    pub fn with_api_url(mut self, api_url: impl Into<String>) -> Self {
        self.api_url = api_url.into();
        self
    }
}

impl fmt::Debug for DiscordSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordSettings")
            .field("bot_token", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("groups", &self.groups)
            .field("request_timeout", &self.request_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_retry_after", &self.max_retry_after)
            .field("send_attempts", &self.send_attempts)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .finish()
    }
}
