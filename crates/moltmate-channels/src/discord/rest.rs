//! A minimal Discord REST client: the few endpoints the channel uses, errors classified, rate
//! limits honoured.
//!
//! The token travels only in the `Authorization` header (marked sensitive, so it is never
//! printed); server texts we keep are scrubbed of it anyway and bounded in length.
//!
//! Rate limits: a 429 carries `retry_after` (seconds, fractional) and `global`; a global limit
//! holds back *every* request of this bot until it expires (kept in `global_until`), a
//! per-route one only the request that hit it (the caller waits and retries).

use moltmate_core::channel::ChannelError;
use moltmate_core::channel_status::ErrorClass;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::Deserialize;
use std::error::Error as _;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Service name used in [`ChannelError`]s.
pub(crate) const SERVICE: &str = "Discord";

/// Largest reply we read.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// Longest piece of a server-provided message we keep.
const MAX_DESCRIPTION_CHARS: usize = 300;

/// Why a REST call failed, classified by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RestError {
    #[error("could not reach the Discord API: {0}")]
    Transport(String),
    #[error("Discord asked us to retry after {retry_after:?}{}", if *global { " (global rate limit)" } else { "" })]
    RateLimited { retry_after: Duration, global: bool },
    #[error("Discord server error (HTTP {status}): {description}")]
    Server { status: u16, description: String },
    #[error("Discord refused the bot token (HTTP {status}); check channels.discord.botToken (Developer Portal → your app → Bot → Reset Token)")]
    Unauthorized { status: u16 },
    #[error("Discord rejected the request (HTTP {status}): {description}")]
    Refused { status: u16, description: String },
    #[error("Discord sent a reply we could not understand: {0}")]
    InvalidReply(String),
}

impl RestError {
    /// The token is wrong or revoked: nothing works until the operator fixes it.
    pub(crate) fn is_fatal(&self) -> bool {
        match self {
            RestError::Unauthorized { .. } => true,
            RestError::Transport(_)
            | RestError::RateLimited { .. }
            | RestError::Server { .. }
            | RestError::Refused { .. }
            | RestError::InvalidReply(_) => false,
        }
    }

    /// Whether sending the same message again may succeed. A garbled 2xx reply is not
    /// retried: the message was most likely delivered.
    pub(crate) fn is_send_retryable(&self) -> bool {
        match self {
            RestError::Transport(_) | RestError::RateLimited { .. } | RestError::Server { .. } => {
                true
            }
            RestError::Unauthorized { .. }
            | RestError::Refused { .. }
            | RestError::InvalidReply(_) => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            RestError::RateLimited { retry_after, .. } => Some(*retry_after),
            RestError::Transport(_)
            | RestError::Server { .. }
            | RestError::Unauthorized { .. }
            | RestError::Refused { .. }
            | RestError::InvalidReply(_) => None,
        }
    }

    /// The class of this error for the channel's status.
    pub(crate) fn class(&self) -> ErrorClass {
        ErrorClass::of(&self.clone().into_channel_error())
    }

    pub(crate) fn into_channel_error(self) -> ChannelError {
        let detail = self.to_string();
        match self {
            RestError::Transport(_) => ChannelError::Unreachable {
                service: SERVICE,
                detail,
            },
            RestError::RateLimited { retry_after, .. } => ChannelError::RateLimited {
                service: SERVICE,
                retry_after_seconds: retry_after.as_secs_f64().ceil() as u64,
            },
            RestError::Server { status, .. } => ChannelError::Server {
                service: SERVICE,
                status,
                detail,
            },
            RestError::Unauthorized { status } | RestError::Refused { status, .. } => {
                ChannelError::Rejected {
                    service: SERVICE,
                    status,
                    detail,
                }
            }
            RestError::InvalidReply(_) => ChannelError::InvalidReply {
                service: SERVICE,
                detail,
            },
        }
    }
}

/// `GET /gateway/bot`.
#[derive(Debug, Deserialize)]
pub(crate) struct GatewayBot {
    pub url: String,
}

/// The body of a 429.
#[derive(Debug, Deserialize)]
struct RateLimitBody {
    retry_after: Option<f64>,
    #[serde(default)]
    global: bool,
}

/// The body of other errors: `{"message": "...", "code": 50007}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    message: Option<String>,
    code: Option<i64>,
}

/// HTTP client bound to one bot.
pub(crate) struct Rest {
    http: reqwest::Client,
    base: String,
    auth: HeaderValue,
    token: String,
    timeout: Duration,
    max_retry_after: Duration,
    /// A global rate limit holds every request back until this instant.
    global_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for Rest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Rest {
    /// `token` must already be validated (header-safe characters only).
    pub(crate) fn new(
        http: reqwest::Client,
        base: &str,
        token: &str,
        timeout: Duration,
        max_retry_after: Duration,
    ) -> Result<Self, String> {
        let mut auth = HeaderValue::from_str(&format!("Bot {token}"))
            .map_err(|_| "the bot token contains characters not allowed in a header".to_string())?;
        auth.set_sensitive(true);
        Ok(Rest {
            http,
            base: base.trim_end_matches('/').to_string(),
            auth,
            token: token.to_string(),
            timeout,
            max_retry_after,
            global_until: Mutex::new(None),
        })
    }

    pub(crate) async fn gateway_bot(&self) -> Result<GatewayBot, RestError> {
        let body = self
            .request(reqwest::Method::GET, "/gateway/bot", None)
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| RestError::InvalidReply(self.scrub(&format!("/gateway/bot: {e}"))))
    }

    /// `POST /channels/{id}/messages` with mentions disabled: nothing a user or model wrote
    /// may ping `@everyone`, a role or a member.
    pub(crate) async fn create_message(
        &self,
        channel_id: &str,
        content: &str,
    ) -> Result<(), RestError> {
        let body = serde_json::json!({
            "content": content,
            "allowed_mentions": { "parse": [] },
        });
        self.request(
            reqwest::Method::POST,
            &format!("/channels/{channel_id}/messages"),
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    /// `POST /channels/{id}/typing` (shows "typing…" for about ten seconds).
    pub(crate) async fn trigger_typing(&self, channel_id: &str) -> Result<(), RestError> {
        self.request(
            reqwest::Method::POST,
            &format!("/channels/{channel_id}/typing"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Wait out a global rate limit, if one is running.
    async fn wait_global(&self) {
        let until = *self
            .global_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(until) = until {
            let now = Instant::now();
            if until > now {
                tokio::time::sleep(until - now).await;
            }
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, RestError> {
        self.wait_global().await;
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.execute(request).await
    }

    /// `POST /channels/{id}/messages` with one file: multipart/form-data with `payload_json`
    /// (the message, naming the upload as attachment 0) and `files[0]` (the bytes and file
    /// name), mentions disabled as for text.
    pub(crate) async fn create_message_with_file(
        &self,
        channel_id: &str,
        file: &moltmate_core::channel::OutboundFile,
    ) -> Result<(), RestError> {
        self.wait_global().await;
        let content: String = file
            .caption
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(super::DISCORD_MAX_MESSAGE_CHARS)
            .collect();
        let payload = serde_json::json!({
            "content": content,
            "allowed_mentions": { "parse": [] },
            "attachments": [{ "id": 0, "filename": file.file_name }],
        });
        let part = reqwest::multipart::Part::bytes(file.content.clone())
            .file_name(file.file_name.clone())
            .mime_str("application/octet-stream")
            .map_err(|e| RestError::InvalidReply(self.scrub(&e.to_string())))?;
        let form = reqwest::multipart::Form::new()
            .text("payload_json", payload.to_string())
            .part("files[0]", part);
        // An upload takes longer than a JSON call: six seconds per MiB on top.
        let extra = Duration::from_secs(6 * (file.content.len() as u64 >> 20).max(1));
        let request = self
            .http
            .post(format!("{}/channels/{channel_id}/messages", self.base))
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(self.timeout + extra)
            .multipart(form);
        self.execute(request).await.map(|_| ())
    }

    /// Send a prepared request and classify its answer (rate limits remembered).
    async fn execute(&self, request: reqwest::RequestBuilder) -> Result<Vec<u8>, RestError> {
        let mut response = request
            .send()
            .await
            .map_err(|e| RestError::Transport(self.describe_transport(e)))?;
        let status = response.status().as_u16();
        let header_retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok());
        let header_global = response
            .headers()
            .get("x-ratelimit-global")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
            || response
                .headers()
                .get("x-ratelimit-scope")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"global"));
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| RestError::Transport(self.describe_transport(e)))?
        {
            if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(RestError::InvalidReply(format!(
                    "reply larger than {MAX_REPLY_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        if status == 429 {
            let parsed: Option<RateLimitBody> = serde_json::from_slice(&bytes).ok();
            let seconds = parsed
                .as_ref()
                .and_then(|b| b.retry_after)
                .or(header_retry_after)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or(1.0);
            let retry_after =
                Duration::from_secs_f64(seconds.min(86_400.0)).min(self.max_retry_after);
            let global = parsed.is_some_and(|b| b.global) || header_global;
            if global {
                let mut until = self
                    .global_until
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *until = Some(Instant::now() + retry_after);
            }
            return Err(RestError::RateLimited {
                retry_after,
                global,
            });
        }
        let description = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody { message, code }) => self.scrub(&format!(
                "{}{}",
                message.as_deref().unwrap_or("no message"),
                code.map(|c| format!(" (code {c})")).unwrap_or_default()
            )),
            Err(_) => "reply body is not a Discord JSON error".to_string(),
        };
        Err(match status {
            401 => RestError::Unauthorized { status },
            400..=499 => RestError::Refused {
                status,
                description,
            },
            500..=599 => RestError::Server {
                status,
                description,
            },
            _ => RestError::InvalidReply(format!("HTTP {status}: {description}")),
        })
    }

    fn describe_transport(&self, error: reqwest::Error) -> String {
        let error = error.without_url();
        let mut text = if error.is_timeout() {
            format!("request timed out ({error})")
        } else {
            error.to_string()
        };
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.scrub(&text)
    }

    /// Remove the token from text and bound its length.
    pub(crate) fn scrub(&self, text: &str) -> String {
        scrub(text, &self.token)
    }
}

/// `text` without `secret`, cut at [`MAX_DESCRIPTION_CHARS`].
pub(crate) fn scrub(text: &str, secret: &str) -> String {
    let cleaned = if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "<redacted>")
    };
    let mut chars = cleaned.chars();
    let mut bounded: String = chars.by_ref().take(MAX_DESCRIPTION_CHARS).collect();
    if chars.next().is_some() {
        bounded.push('…');
    }
    bounded
}
