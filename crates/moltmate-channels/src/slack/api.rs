//! A minimal Slack Web API client: `auth.test`, `apps.connections.open`, `chat.postMessage`,
//! file download and the external upload (`files.getUploadURLExternal`, upload,
//! `files.completeUploadExternal`).
//!
//! Tokens travel only in `Authorization` headers (marked sensitive); texts we keep from
//! failures are scrubbed of both tokens and bounded.

use crate::discord::scrub_secrets;
use moltmate_core::channel::ChannelError;
use moltmate_core::channel_status::ErrorClass;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::Deserialize;
use std::error::Error as _;
use std::fmt;
use std::time::Duration;

pub(crate) const SERVICE: &str = "Slack";

const MAX_REPLY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("could not reach the Slack API: {0}")]
    Transport(String),
    #[error("Slack asked us to retry after {0:?}")]
    RateLimited(Duration),
    #[error("Slack server error (HTTP {0})")]
    Server(u16),
    #[error("Slack refused the {which} ({error}); check channels.slack.{which}")]
    Credentials { which: &'static str, error: String },
    #[error("Slack rejected the request: {0}")]
    Refused(String),
    #[error("Slack sent a reply we could not understand: {0}")]
    InvalidReply(String),
}

impl ApiError {
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, ApiError::Credentials { .. })
    }

    pub(crate) fn is_send_retryable(&self) -> bool {
        match self {
            ApiError::Transport(_) | ApiError::RateLimited(_) | ApiError::Server(_) => true,
            ApiError::Credentials { .. } | ApiError::Refused(_) | ApiError::InvalidReply(_) => {
                false
            }
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited(d) => Some(*d),
            _ => None,
        }
    }

    pub(crate) fn class(&self) -> ErrorClass {
        ErrorClass::of(&self.clone().into_channel_error())
    }

    pub(crate) fn into_channel_error(self) -> ChannelError {
        let detail = self.to_string();
        match self {
            ApiError::Transport(_) => ChannelError::Unreachable {
                service: SERVICE,
                detail,
            },
            ApiError::RateLimited(d) => ChannelError::RateLimited {
                service: SERVICE,
                retry_after_seconds: d.as_secs_f64().ceil() as u64,
            },
            ApiError::Server(status) => ChannelError::Server {
                service: SERVICE,
                status,
                detail,
            },
            ApiError::Credentials { .. } => ChannelError::Rejected {
                service: SERVICE,
                status: 401,
                detail,
            },
            ApiError::Refused(_) => ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail,
            },
            ApiError::InvalidReply(_) => ChannelError::InvalidReply {
                service: SERVICE,
                detail,
            },
        }
    }
}

/// `auth.test`: who the bot is.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AuthTest {
    pub team_id: String,
    pub user_id: String,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// A Web API request body: most methods take JSON, the file-upload ones form fields.
enum Body<'a> {
    Json(&'a serde_json::Value),
    Form(&'a [(&'a str, String)]),
}

pub(crate) struct WebApi {
    http: reqwest::Client,
    base: String,
    bot: HeaderValue,
    app: Option<HeaderValue>,
    secrets: Vec<String>,
    timeout: Duration,
    max_retry_after: Duration,
}

impl fmt::Debug for WebApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebApi")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn bearer(token: &str) -> Result<HeaderValue, ()> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok(value)
}

impl WebApi {
    pub(crate) fn new(
        http: reqwest::Client,
        base: &str,
        bot_token: &str,
        app_token: Option<&str>,
        timeout: Duration,
        max_retry_after: Duration,
    ) -> Result<Self, ()> {
        Ok(WebApi {
            http,
            base: base.trim_end_matches('/').to_string(),
            bot: bearer(bot_token)?,
            app: app_token.map(bearer).transpose()?,
            secrets: [Some(bot_token), app_token]
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect(),
            timeout,
            max_retry_after,
        })
    }

    pub(crate) async fn auth_test(&self) -> Result<AuthTest, ApiError> {
        let reply = self
            .call("auth.test", &self.bot, "botToken", &serde_json::json!({}))
            .await?;
        serde_json::from_value(serde_json::Value::Object(reply))
            .map_err(|e| ApiError::InvalidReply(self.scrub(&format!("auth.test: {e}"))))
    }

    /// A fresh Socket Mode websocket URL (each is good for one connection).
    pub(crate) async fn connections_open(&self) -> Result<String, ApiError> {
        let Some(app) = &self.app else {
            return Err(ApiError::Credentials {
                which: "appToken",
                error: "not set".to_string(),
            });
        };
        let reply = self
            .call(
                "apps.connections.open",
                app,
                "appToken",
                &serde_json::json!({}),
            )
            .await?;
        reply
            .get("url")
            .and_then(|u| u.as_str())
            .map(str::to_string)
            .ok_or_else(|| ApiError::InvalidReply("apps.connections.open without url".into()))
    }

    pub(crate) async fn post_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> Result<(), ApiError> {
        let mut body = serde_json::json!({ "channel": channel, "text": text });
        if let Some(ts) = thread_ts {
            body["thread_ts"] = serde_json::json!(ts);
        }
        self.call("chat.postMessage", &self.bot, "botToken", &body)
            .await
            .map(|_| ())
    }

    /// `files.getUploadURLExternal`: where to upload `length` bytes named `file_name`;
    /// returns `(upload_url, file_id)`.
    pub(crate) async fn upload_url(
        &self,
        file_name: &str,
        length: usize,
    ) -> Result<(String, String), ApiError> {
        let reply = self
            .call_with(
                "files.getUploadURLExternal",
                &self.bot,
                "botToken",
                Body::Form(&[
                    ("filename", file_name.to_string()),
                    ("length", length.to_string()),
                ]),
            )
            .await?;
        let field = |name: &str| reply.get(name).and_then(|v| v.as_str()).map(str::to_string);
        match (field("upload_url"), field("file_id")) {
            (Some(url), Some(id)) => Ok((url, id)),
            _ => Err(ApiError::InvalidReply(
                "files.getUploadURLExternal without upload_url or file_id".into(),
            )),
        }
    }

    /// `files.completeUploadExternal`: shares the uploaded file in `channel` (thread optional).
    pub(crate) async fn complete_upload(
        &self,
        file_id: &str,
        title: &str,
        channel: &str,
        thread_ts: Option<&str>,
        comment: Option<&str>,
    ) -> Result<(), ApiError> {
        let files = serde_json::json!([{ "id": file_id, "title": title }]).to_string();
        let mut form = vec![("files", files), ("channel_id", channel.to_string())];
        if let Some(ts) = thread_ts {
            form.push(("thread_ts", ts.to_string()));
        }
        if let Some(comment) = comment {
            form.push(("initial_comment", comment.to_string()));
        }
        self.call_with(
            "files.completeUploadExternal",
            &self.bot,
            "botToken",
            Body::Form(&form),
        )
        .await
        .map(|_| ())
    }

    /// Uploads `content` to an upload URL Slack gave us (pre-authorised: no token sent).
    pub(crate) async fn upload(&self, url: &str, content: &[u8]) -> Result<(), ApiError> {
        let response = self
            .http
            .post(url)
            .timeout(self.timeout.max(Duration::from_secs(60)))
            .body(content.to_vec())
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe(e)))?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            status @ 500..=599 => Err(ApiError::Server(status)),
            status => Err(ApiError::Refused(format!("file upload: HTTP {status}"))),
        }
    }

    /// Downloads a file from one of Slack's file hosts with the bot token: at most `max_bytes`
    /// (the `Content-Length` first, then while reading). The client follows no redirects, so
    /// the token goes to this URL only. `Ok(None)`: larger than `max_bytes`.
    pub(crate) async fn download(
        &self,
        url: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        let mut response = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.bot.clone())
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe(e)))?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            300..=399 => {
                return Err(ApiError::Credentials {
                    which: "botToken",
                    error: "file download redirected: the bot token lacks the files:read scope"
                        .into(),
                })
            }
            401 | 403 => {
                return Err(ApiError::Credentials {
                    which: "botToken",
                    error: format!("file download refused (HTTP {status}): files:read scope?"),
                })
            }
            404 => return Err(ApiError::Refused("the file is gone".into())),
            500..=599 => return Err(ApiError::Server(status)),
            _ => return Err(ApiError::Refused(format!("file download: HTTP {status}"))),
        }
        if response.content_length().is_some_and(|n| n > max_bytes) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::Transport(self.describe(e)))?
        {
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Ok(None);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    async fn call(
        &self,
        method: &str,
        auth: &HeaderValue,
        which: &'static str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
        self.call_with(method, auth, which, Body::Json(body)).await
    }

    async fn call_with(
        &self,
        method: &str,
        auth: &HeaderValue,
        which: &'static str,
        body: Body<'_>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
        let request = self
            .http
            .post(format!("{}/{}", self.base, method))
            .header(AUTHORIZATION, auth.clone())
            .timeout(self.timeout);
        let request = match body {
            Body::Json(value) => request.json(value),
            Body::Form(fields) => request.form(fields),
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe(e)))?;
        let status = response.status().as_u16();
        if status == 429 {
            let seconds = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            return Err(ApiError::RateLimited(
                Duration::from_secs(seconds).min(self.max_retry_after),
            ));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::Transport(self.describe(e)))?
        {
            if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(ApiError::InvalidReply(format!(
                    "reply larger than {MAX_REPLY_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if status >= 500 {
            return Err(ApiError::Server(status));
        }
        let envelope: Envelope = serde_json::from_slice(&bytes).map_err(|_| {
            ApiError::InvalidReply(format!("{method}: HTTP {status}, not a Slack JSON reply"))
        })?;
        if envelope.ok {
            return Ok(envelope.rest);
        }
        let error = self.scrub(envelope.error.as_deref().unwrap_or("unknown_error"));
        Err(match error.as_str() {
            "invalid_auth"
            | "not_authed"
            | "account_inactive"
            | "token_revoked"
            | "token_expired"
            | "not_allowed_token_type"
            | "missing_scope" => ApiError::Credentials { which, error },
            "ratelimited" => ApiError::RateLimited(Duration::from_secs(1)),
            _ => ApiError::Refused(format!("{method}: {error}")),
        })
    }

    fn describe(&self, error: reqwest::Error) -> String {
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.scrub(&text)
    }

    pub(crate) fn scrub(&self, text: &str) -> String {
        scrub_secrets(text, &self.secrets)
    }
}
