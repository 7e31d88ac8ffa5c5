//! Telegram channel settings.

use std::fmt;
use std::time::Duration;

/// The public Bot API endpoint.
pub const DEFAULT_API_URL: &str = "https://api.telegram.org";

/// How the Telegram channel connects and how patiently it retries.
///
/// `Debug` never shows the bot token: it is a credential that controls the bot.
#[derive(Clone)]
pub struct TelegramSettings {
    /// Token from @BotFather, `123456:ABC...`. Sent only inside request URLs.
    pub bot_token: String,
    /// Base URL of the Bot API (a self-hosted Bot API server or a test double may stand here).
    pub api_url: String,
    /// How long one `getUpdates` call may wait on the server for new updates.
    pub poll_timeout: Duration,
    /// Timeout of ordinary requests, and the margin added to `poll_timeout` for long polls so a
    /// healthy long poll is never cut off by our own client.
    pub request_timeout: Duration,
    /// Accept messages from group and supergroup chats. Off by default: a personal assistant
    /// gateway talks in direct messages, and a group would mix several users into one chat.
    pub accept_group_chats: bool,
    /// First delay of the exponential backoff after a server or connection error.
    pub backoff_initial: Duration,
    /// Upper bound of that backoff (before jitter).
    pub backoff_max: Duration,
    /// Upper bound for a server-requested `retry_after`, so a bogus huge value cannot stall
    /// the channel for days.
    pub max_retry_after: Duration,
    /// How many times one outgoing message is attempted before `send_text` gives up.
    pub send_attempts: u32,
}

impl TelegramSettings {
    /// Settings for the public Bot API with production defaults.
    pub fn new(bot_token: impl Into<String>) -> Self {
        TelegramSettings {
            bot_token: bot_token.into(),
            api_url: DEFAULT_API_URL.to_string(),
            poll_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(15),
            accept_group_chats: false,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
            send_attempts: 5,
        }
    }

    /// Same settings against another Bot API base URL.
    pub fn with_api_url(mut self, api_url: impl Into<String>) -> Self {
        self.api_url = api_url.into();
        self
    }
}

impl fmt::Debug for TelegramSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelegramSettings")
            .field("bot_token", &"<redacted>")
            .field("api_url", &redact_url(&self.api_url))
            .field("poll_timeout", &self.poll_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("accept_group_chats", &self.accept_group_chats)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_retry_after", &self.max_retry_after)
            .field("send_attempts", &self.send_attempts)
            .finish()
    }
}

/// The URL without a password (a self-hosted Bot API server may sit behind basic auth).
fn redact_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one, excluded above.
            let _ = url.set_password(Some("redacted"));
            url.to_string()
        }
        Ok(_) => raw.to_string(),
        Err(_) => "<unparseable URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_token() {
        let s = TelegramSettings::new("123456:SECRET-token");
        let shown = format!("{s:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("api.telegram.org"));
        let s = s.with_api_url("https://bot:hunter2@tg.example:8081");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("tg.example"), "{shown}");
    }
}
