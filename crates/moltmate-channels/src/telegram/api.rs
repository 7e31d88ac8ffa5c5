//! A minimal Bot API client: one POST per method, JSON in, envelope out, errors classified.
//!
//! The bot token is part of every request URL (`/bot<token>/<method>`). reqwest prints the URL
//! in its error messages, so every transport error is stripped of its URL and, as a second line
//! of defence, every text we keep from a failure is scrubbed of the token before it can reach a
//! log line or an error value.

use super::wire::Envelope;
use moltmate_core::channel::ChannelError;
use moltmate_core::channel_status::ErrorClass;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::error::Error as _;
use std::fmt;
use std::time::Duration;

/// Service name used in [`ChannelError`]s.
pub(crate) const SERVICE: &str = "Telegram";

/// Largest reply we read. 100 updates of 4096-character texts stay far below it; a broken
/// server streaming forever does not exhaust memory.
const MAX_REPLY_BYTES: usize = 16 << 20;

/// Longest piece of a server-provided description we keep.
const MAX_DESCRIPTION_CHARS: usize = 300;

/// Why a Bot API call failed, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("could not reach the Telegram Bot API: {0}")]
    Transport(String),
    #[error("Telegram asked us to retry after {retry_after}s: {description}")]
    RateLimited {
        retry_after: u64,
        description: String,
    },
    #[error("Telegram server error (HTTP {status}): {description}")]
    Server { status: u16, description: String },
    #[error("Telegram refused the bot token (HTTP {status}: {description}); check the configured bot token")]
    Unauthorized { status: u16, description: String },
    #[error(
        "Telegram reports a conflict ({description}): another process is polling updates for this bot, \
         or a webhook is set (remove it with deleteWebhook)"
    )]
    Conflict { description: String },
    #[error("Telegram rejected the request (HTTP {status}): {description}")]
    Refused { status: u16, description: String },
    #[error("Telegram sent a reply we could not understand: {0}")]
    InvalidReply(String),
}

impl ApiError {
    /// Errors after which polling cannot continue: the token is wrong or revoked.
    pub(crate) fn is_fatal(&self) -> bool {
        match self {
            ApiError::Unauthorized { .. } => true,
            ApiError::Transport(_)
            | ApiError::RateLimited { .. }
            | ApiError::Server { .. }
            | ApiError::Conflict { .. }
            | ApiError::Refused { .. }
            | ApiError::InvalidReply(_) => false,
        }
    }

    /// Whether resending the same outgoing message may succeed. A garbled 2xx reply is not
    /// retried: the message was most likely delivered, and resending would duplicate it.
    pub(crate) fn is_send_retryable(&self) -> bool {
        match self {
            ApiError::Transport(_) | ApiError::RateLimited { .. } | ApiError::Server { .. } => true,
            ApiError::Unauthorized { .. }
            | ApiError::Conflict { .. }
            | ApiError::Refused { .. }
            | ApiError::InvalidReply(_) => false,
        }
    }

    /// The operator-facing class of this failure.
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            ApiError::Transport(_) => ErrorClass::Unreachable,
            ApiError::RateLimited { .. } => ErrorClass::RateLimited,
            ApiError::Server { .. } => ErrorClass::Server,
            ApiError::Unauthorized { .. } => ErrorClass::Credentials,
            ApiError::Conflict { .. } | ApiError::Refused { .. } => ErrorClass::Rejected,
            ApiError::InvalidReply(_) => ErrorClass::InvalidReply,
        }
    }

    /// The wait the server asked for, if any.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::Transport(_)
            | ApiError::Server { .. }
            | ApiError::Unauthorized { .. }
            | ApiError::Conflict { .. }
            | ApiError::Refused { .. }
            | ApiError::InvalidReply(_) => None,
        }
    }

    pub(crate) fn into_channel_error(self) -> ChannelError {
        let detail = self.to_string();
        match self {
            ApiError::Transport(_) => ChannelError::Unreachable {
                service: SERVICE,
                detail,
            },
            ApiError::RateLimited { retry_after, .. } => ChannelError::RateLimited {
                service: SERVICE,
                retry_after_seconds: retry_after,
            },
            ApiError::Server { status, .. } => ChannelError::Server {
                service: SERVICE,
                status,
                detail,
            },
            ApiError::Unauthorized { status, .. } | ApiError::Refused { status, .. } => {
                ChannelError::Rejected {
                    service: SERVICE,
                    status,
                    detail,
                }
            }
            ApiError::Conflict { .. } => ChannelError::Rejected {
                service: SERVICE,
                status: 409,
                detail,
            },
            ApiError::InvalidReply(_) => ChannelError::InvalidReply {
                service: SERVICE,
                detail,
            },
        }
    }
}

/// HTTP client bound to one bot.
#[derive(Clone)]
pub(crate) struct BotApi {
    http: reqwest::Client,
    base: String,
    token: String,
    request_timeout: Duration,
    /// The URLs of the methods every message calls, parsed once (they hold the token: never
    /// shown, like `token`).
    hot: std::sync::Arc<[(&'static str, reqwest::Url)]>,
}

/// Methods called for every message: `getUpdates` polls, `sendMessage` answers.
const HOT_METHODS: [&str; 3] = ["getUpdates", "sendMessage", "sendChatAction"];

impl fmt::Debug for BotApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BotApi")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl BotApi {
    pub(crate) fn new(
        http: reqwest::Client,
        base: &str,
        token: &str,
        request_timeout: Duration,
    ) -> Self {
        let base = base.trim_end_matches('/').to_string();
        let hot = HOT_METHODS
            .iter()
            .filter_map(|&method| {
                let url = reqwest::Url::parse(&format!("{base}/bot{token}/{method}")).ok()?;
                Some((method, url))
            })
            .collect();
        BotApi {
            http,
            base,
            token: token.to_string(),
            request_timeout,
            hot,
        }
    }

    /// A POST of `method`: to its URL parsed once for the hot methods, otherwise parsed now
    /// (an unparsable one fails in `reqwest` as before, as a transport error).
    fn post(&self, method: &str) -> reqwest::RequestBuilder {
        match self.hot.iter().find(|(hot, _)| *hot == method) {
            Some((_, url)) => self.http.post(url.clone()),
            None => self
                .http
                .post(format!("{}/bot{}/{}", self.base, self.token, method)),
        }
    }

    /// Call `method` with JSON `params`; `extra_timeout` is added to the request timeout (the
    /// server-side wait of a long poll).
    pub(crate) async fn call<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
        extra_timeout: Duration,
    ) -> Result<T, ApiError> {
        let mut response = self
            .post(method)
            .timeout(self.request_timeout + extra_timeout)
            .json(params)
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?
        {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(ApiError::InvalidReply(format!(
                    "reply larger than {MAX_REPLY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        self.interpret(status, &body)
    }

    /// Download a file from `/file/bot<token>/<path>` (a `getFile` result), at most `max_bytes`
    /// (the `Content-Length` claim is checked first, then every chunk as it arrives).
    pub(crate) async fn download(
        &self,
        path: &str,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ApiError> {
        // The path comes from Telegram; it must not walk out of the file endpoint.
        if path.is_empty()
            || path.len() > 1024
            || path.starts_with('/')
            || path.split('/').any(|p| p == ".." || p == ".")
            || path.contains(['?', '#', '\\'])
            || path.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ApiError::InvalidReply(
                "getFile returned an unusable file_path".to_string(),
            ));
        }
        let url = format!("{}/file/bot{}/{}", self.base, self.token, path);
        let mut response = self
            .http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(classify(
                status,
                None,
                format!("file download failed (HTTP {status})"),
            ));
        }
        if let Some(length) = response.content_length().filter(|l| *l > max_bytes) {
            return Err(ApiError::Refused {
                status: 413,
                description: format!(
                    "the file has {length} bytes, more than the limit of {max_bytes}"
                ),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?
        {
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(ApiError::Refused {
                    status: 413,
                    description: format!("the file is larger than the limit of {max_bytes} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// `sendDocument` as multipart/form-data (the file is uploaded, not referenced by URL).
    pub(crate) async fn send_document(
        &self,
        chat_id: &str,
        file: &moltmate_core::channel::OutboundFile,
    ) -> Result<(), ApiError> {
        let url = format!("{}/bot{}/sendDocument", self.base, self.token);
        let part =
            reqwest::multipart::Part::bytes(file.content.clone()).file_name(file.file_name.clone());
        let mut form = reqwest::multipart::Form::new()
            .text("chat_id", chat_id.to_string())
            .part("document", part);
        if let Some(caption) = &file.caption {
            form = form.text("caption", caption.chars().take(1024).collect::<String>());
        }
        // Uploads take longer than a JSON call: a minute per 10 MB on top of the usual timeout.
        let extra = Duration::from_secs(6 * (file.content.len() as u64 >> 20).max(1));
        let mut response = self
            .http
            .post(url)
            .timeout(self.request_timeout + extra)
            .multipart(form)
            .send()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ApiError::Transport(self.describe_transport(e)))?
        {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(ApiError::InvalidReply(format!(
                    "reply larger than {MAX_REPLY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let _: serde_json::Value = self.interpret(status, &body)?;
        Ok(())
    }

    fn interpret<T: DeserializeOwned>(&self, status: u16, body: &[u8]) -> Result<T, ApiError> {
        let envelope: Envelope = match serde_json::from_slice(body) {
            Ok(envelope) => envelope,
            Err(e) => {
                // serde quotes a wrongly typed value in its message: scrub and bound it too.
                let description =
                    self.scrub(&format!("reply body is not a Bot API JSON object ({e})"));
                return Err(classify(status, None, description));
            }
        };
        if envelope.ok && (200..300).contains(&status) {
            let result = envelope.result.ok_or_else(|| {
                ApiError::InvalidReply("\"ok\" reply without \"result\"".to_string())
            })?;
            return serde_json::from_value(result).map_err(|e| {
                ApiError::InvalidReply(self.scrub(&format!("unexpected \"result\" shape: {e}")))
            });
        }
        let code = envelope
            .error_code
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| *c >= 400)
            .unwrap_or(status);
        let description = self.scrub(envelope.description.as_deref().unwrap_or("no description"));
        let retry_after = envelope.parameters.and_then(|p| p.retry_after);
        Err(classify(code, retry_after, description))
    }

    /// Transport error text without URL (which holds the token) and with its causes, which
    /// usually say what actually went wrong (connection refused, DNS, TLS...).
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
    fn scrub(&self, text: &str) -> String {
        let cleaned = if self.token.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.token, "<redacted>")
        };
        let mut chars = cleaned.chars();
        let mut bounded: String = chars.by_ref().take(MAX_DESCRIPTION_CHARS).collect();
        if chars.next().is_some() {
            bounded.push('…');
        }
        bounded
    }
}

/// Map a failed reply to an [`ApiError`]. A `retry_after` wins over the status code: Telegram
/// sends it with 429, but also documents it as the generic "flood control" signal.
fn classify(status: u16, retry_after: Option<u64>, description: String) -> ApiError {
    if let Some(retry_after) = retry_after {
        return ApiError::RateLimited {
            retry_after,
            description,
        };
    }
    match status {
        429 => ApiError::RateLimited {
            retry_after: 1,
            description,
        },
        401 | 404 => ApiError::Unauthorized {
            status,
            description,
        },
        409 => ApiError::Conflict { description },
        400..=499 => ApiError::Refused {
            status,
            description,
        },
        500..=599 => ApiError::Server {
            status,
            description,
        },
        _ => ApiError::InvalidReply(format!("HTTP {status}: {description}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> BotApi {
        BotApi::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1/",
            "42:SECRET",
            Duration::from_secs(1),
        )
    }

    #[test]
    fn ok_reply_decodes_result() {
        let n: i64 = api().interpret(200, br#"{"ok":true,"result":7}"#).unwrap();
        assert_eq!(n, 7);
    }

    #[test]
    fn retry_after_is_rate_limit() {
        let body = br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 3","parameters":{"retry_after":3}}"#;
        let err = api().interpret::<serde_json::Value>(429, body).unwrap_err();
        assert_eq!(err.retry_after(), Some(3));
        assert!(err.is_send_retryable());
    }

    #[test]
    fn unauthorized_is_fatal_and_token_free() {
        let body = br#"{"ok":false,"error_code":401,"description":"Unauthorized 42:SECRET"}"#;
        let err = api().interpret::<serde_json::Value>(401, body).unwrap_err();
        assert!(err.is_fatal());
        let text = err.into_channel_error().to_string();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("bot token"), "{text}");
    }

    #[test]
    fn non_json_bodies_are_classified_by_status() {
        let a = api();
        assert!(matches!(
            a.interpret::<i64>(502, b"<html>bad gateway</html>"),
            Err(ApiError::Server { status: 502, .. })
        ));
        assert!(matches!(
            a.interpret::<i64>(200, b"{not json"),
            Err(ApiError::InvalidReply(_))
        ));
        assert!(matches!(
            a.interpret::<i64>(200, br#"{"ok":true,"result":"x"}"#),
            Err(ApiError::InvalidReply(_))
        ));
        assert!(matches!(
            a.interpret::<i64>(
                409,
                br#"{"ok":false,"error_code":409,"description":"Conflict"}"#
            ),
            Err(ApiError::Conflict { .. })
        ));
        assert!(matches!(
            a.interpret::<i64>(
                400,
                br#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#
            ),
            Err(ApiError::Refused { status: 400, .. })
        ));
    }

    use proptest::prelude::*;

    /// Reply bodies a broken, hostile or misconfigured Bot API server could send: arbitrary
    /// bytes, and envelopes with every field present, missing, null or of the wrong type, with
    /// the bot token (and long text) planted wherever a string fits.
    fn reply_body() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            Just(json_string("42:SECRET")),
            Just(json_string(&format!("x {} 42:SECRET", "y".repeat(5000)))),
            any::<String>().prop_map(|s| json_string(&s)),
        ];
        let field = prop_oneof![
            text.clone(),
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("-1.5".to_string()),
            Just("true".to_string()),
            Just("[]".to_string()),
            text.clone()
                .prop_map(|t| format!("{{\"retry_after\": {t}}}")),
            any::<u64>().prop_map(|n| format!("{{\"retry_after\": {n}}}")),
            text.clone()
                .prop_map(|t| format!("[{{\"update_id\": {t}}}]")),
        ];
        let envelope = prop::collection::vec(
            (
                prop::sample::select(vec![
                    "ok",
                    "result",
                    "error_code",
                    "description",
                    "parameters",
                    "extra",
                ]),
                prop_oneof![field, any::<bool>().prop_map(|b| b.to_string())],
            ),
            0..6,
        )
        .prop_map(|fields| {
            let inner: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            format!("{{{}}}", inner.join(", ")).into_bytes()
        });
        prop_oneof![
            envelope,
            text.prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..200),
        ]
    }

    fn json_string(text: &str) -> String {
        serde_json::Value::String(text.to_string()).to_string()
    }

    fn check_error(err: ApiError) -> Result<(), TestCaseError> {
        let (fatal, retryable, retry_after) =
            (err.is_fatal(), err.is_send_retryable(), err.retry_after());
        prop_assert!(!(fatal && retryable));
        if retry_after.is_some() {
            prop_assert!(retryable);
        }
        for text in [
            err.to_string(),
            format!("{err:?}"),
            err.into_channel_error().to_string(),
        ] {
            prop_assert!(!text.contains("SECRET"), "the token leaked: {text}");
            prop_assert!(
                text.chars().count() <= 600,
                "unbounded error text: {} chars",
                text.chars().count()
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(moltmate_testkit::prop::config(256))]

        /// Any status and body: a value or a classified, bounded, token-free error.
        #[test]
        fn prop_any_reply_is_classified_without_the_token(
            status in prop_oneof![Just(200u16), Just(429u16), Just(401u16), 100u16..600],
            body in reply_body(),
        ) {
            let a = api();
            if let Err(err) = a.interpret::<Vec<serde_json::Value>>(status, &body) {
                check_error(err)?;
            }
            if let Err(err) = a.interpret::<crate::telegram::wire::BotUser>(status, &body) {
                check_error(err)?;
            }
            if let Ok(value) = a.interpret::<serde_json::Value>(status, &body) {
                // Success needs a 2xx status and `"ok": true`.
                prop_assert!((200..300).contains(&status), "{value:?}");
            }
        }
    }

    #[test]
    fn garbled_replies_never_echo_the_token_or_grow_the_error() {
        // Found by proptest: serde's message for a wrong-typed body or result quotes the value
        // itself, unscrubbed and unbounded.
        let a = api();
        let long = format!("\"{} 42:SECRET\"", "y".repeat(5000));
        for (status, body) in [
            (200, long.clone()),
            (502, long.clone()),
            (200, format!("{{\"ok\": true, \"result\": {long}}}")),
            (200, format!("{{\"ok\": {long}}}")),
        ] {
            let err = a
                .interpret::<Vec<serde_json::Value>>(status, body.as_bytes())
                .unwrap_err();
            let text = err.to_string();
            assert!(!text.contains("SECRET"), "{text}");
            assert!(
                text.chars().count() <= 600,
                "{} chars",
                text.chars().count()
            );
        }
    }

    #[tokio::test]
    async fn transport_errors_never_show_the_token() {
        // Port 1 on loopback: connection refused.
        let err = api()
            .call::<_, serde_json::Value>("getMe", &serde_json::json!({}), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Transport(_)));
        let text = err.to_string();
        assert!(!text.contains("SECRET"), "{text}");
        let debug = format!("{:?}", api());
        assert!(!debug.contains("SECRET"), "{debug}");
    }
}
