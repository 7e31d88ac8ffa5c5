//! The HTTP side shared by every wire format: one pooled client per provider, auth headers,
//! timeouts, status-code classification, `Retry-After`, error-message extraction with key
//! redaction, and a guarded SSE reader (idle timeout and size cap).
//!
//! Nothing here formats a URL, a request body or a header value into an error: reqwest's own
//! error `Display` includes the URL, so errors are described from their kind instead.

use crate::settings::{ApiKey, ProviderSettings};
use bytes::Bytes;
use eventsource_stream::{EventStream, EventStreamError};
use futures::stream::{BoxStream, StreamExt};
use moltmate_core::model::ProviderError;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use std::time::{Duration, SystemTime};

/// Largest reply body accepted (streamed or not). A reply bigger than this is a broken or
/// hostile server, not a model answer.
const MAX_REPLY_BYTES: usize = 32 * 1024 * 1024;
/// Largest error body read to extract a message from.
const MAX_ERROR_BYTES: usize = 64 * 1024;
/// Longest error detail kept from a server's message.
const MAX_DETAIL_CHARS: usize = 300;

/// How a provider authenticates.
pub(crate) enum Auth {
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `Authorization: Bearer <key>` (OpenAI and compatibles).
    Bearer,
}

/// One provider's connection: pooled client, endpoint, fixed headers, timeouts.
pub(crate) struct Transport {
    pub(crate) name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    /// Kept only to redact it from server error messages that might echo it.
    key: Option<ApiKey>,
    request_timeout: Duration,
    idle_timeout: Duration,
}

/// A successful (2xx) reply: either an SSE stream or a complete JSON document.
pub(crate) enum Reply {
    Json(serde_json::Value),
    Stream(SseReader),
}

impl Transport {
    /// `path` is appended to the configured base URL (`/v1/messages`, `/chat/completions`).
    pub(crate) fn new(
        settings: &ProviderSettings,
        path: &str,
        auth: Auth,
        extra_headers: &[(&'static str, &'static str)],
    ) -> Result<Self, ProviderError> {
        let not_configured = |detail: &str| ProviderError::NotConfigured {
            provider: settings.name.clone(),
            detail: detail.to_string(),
        };
        let joined = format!("{}{}", settings.base_url.trim_end_matches('/'), path);
        let url = reqwest::Url::parse(&joined)
            .map_err(|_| not_configured("baseUrl is not a valid URL"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(not_configured(
                "baseUrl must start with http:// or https://",
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in extra_headers {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let key = settings
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(ApiKey::new);
        if let Some(key) = &key {
            let (name, raw) = match auth {
                Auth::XApiKey => (
                    HeaderName::from_static("x-api-key"),
                    key.expose().to_string(),
                ),
                Auth::Bearer => (
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", key.expose()),
                ),
            };
            let mut value = HeaderValue::from_str(&raw).map_err(|_| {
                not_configured(
                    "the API key contains characters that cannot be sent in an HTTP header",
                )
            })?;
            // Keeps the value out of hyper's and reqwest's Debug output.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            // A redirect would carry `x-api-key` to wherever it points; API endpoints never redirect.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|_| not_configured("the HTTP client could not be initialised"))?;
        Ok(Transport {
            name: settings.name.clone(),
            client,
            url,
            headers,
            key,
            request_timeout: settings.request_timeout,
            idle_timeout: settings.stream_idle_timeout,
        })
    }

    /// Sends the body `encode` writes and classifies the answer. Non-2xx statuses become
    /// errors here. `heavy` (the request carries photos: megabytes of base64) encodes it with
    /// [`tokio::task::block_in_place`], so the worker's other tasks — other users' turns —
    /// move to another thread meanwhile instead of waiting behind the encoding.
    pub(crate) async fn post(
        &self,
        heavy: bool,
        encode: impl FnOnce() -> serde_json::Result<Vec<u8>>,
    ) -> Result<Reply, ProviderError> {
        let body = encode_body(heavy, encode)
            .map_err(|err| self.invalid(format!("the request could not be encoded ({err})")))?;
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body);
        let response = match tokio::time::timeout(self.request_timeout, request.send()).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    provider: self.name.clone(),
                })
            }
            Ok(Err(err)) => return Err(self.send_error(&err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if !(200..300).contains(&status) {
            let body = read_body(response, self.idle_timeout, MAX_ERROR_BYTES, true)
                .await
                .unwrap_or_default();
            let detail = redact(&error_message(&body), self.key.as_ref());
            tracing::debug!(provider = %self.name, status, "model API returned an error status");
            return Err(status_error(&self.name, status, &headers, detail));
        }
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
        if is_json {
            let body = read_body(response, self.idle_timeout, MAX_REPLY_BYTES, false)
                .await
                .map_err(|err| self.body_error(err))?;
            let value = serde_json::from_slice(&body)
                .map_err(|err| self.invalid(format!("reply is not valid JSON ({err})")))?;
            Ok(Reply::Json(value))
        } else {
            Ok(Reply::Stream(SseReader::new(self, response)))
        }
    }

    pub(crate) fn invalid(&self, detail: impl Into<String>) -> ProviderError {
        ProviderError::InvalidReply {
            provider: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// Redacts a server-supplied message (e.g. from an in-stream error event).
    pub(crate) fn redact(&self, text: &str) -> String {
        redact(text, self.key.as_ref())
    }

    fn send_error(&self, err: &reqwest::Error) -> ProviderError {
        if err.is_timeout() {
            return ProviderError::Timeout {
                provider: self.name.clone(),
            };
        }
        if err.is_builder() {
            return ProviderError::NotConfigured {
                provider: self.name.clone(),
                detail: "the request could not be built".into(),
            };
        }
        ProviderError::Connect {
            provider: self.name.clone(),
            detail: describe_transport_error(err),
        }
    }

    fn body_error(&self, err: BodyError) -> ProviderError {
        match err {
            BodyError::Idle => ProviderError::Timeout {
                provider: self.name.clone(),
            },
            BodyError::TooLarge => self.invalid("reply is too large"),
            BodyError::Transport(detail) => ProviderError::Connect {
                provider: self.name.clone(),
                detail: format!("connection lost while reading the reply ({detail})"),
            },
        }
    }
}

/// Describes a reqwest error by its underlying I/O kind, never by its `Display` (which holds the URL).
fn describe_transport_error(err: &reqwest::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return io.kind().to_string();
        }
        source = current.source();
    }
    if err.is_connect() {
        "connection failed (DNS, TLS or TCP)".into()
    } else if err.is_body() || err.is_decode() {
        "the reply body could not be read".into()
    } else {
        "the request could not be sent".into()
    }
}

/// Why reading a body failed.
#[derive(Debug)]
enum BodyError {
    Idle,
    TooLarge,
    Transport(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Idle => f.write_str("no data within the idle timeout"),
            BodyError::TooLarge => f.write_str("reply too large"),
            BodyError::Transport(detail) => f.write_str(detail),
        }
    }
}

/// The body as a stream of chunks, failing when no chunk arrives within `idle` or the total
/// exceeds `cap`.
fn guarded_chunks(
    response: reqwest::Response,
    idle: Duration,
    cap: usize,
) -> BoxStream<'static, Result<Bytes, BodyError>> {
    let chunks = response.bytes_stream().boxed();
    futures::stream::unfold(
        (chunks, 0usize, false),
        move |(mut chunks, total, failed)| async move {
            if failed {
                return None;
            }
            match tokio::time::timeout(idle, chunks.next()).await {
                Err(_) => Some((Err(BodyError::Idle), (chunks, total, true))),
                Ok(None) => None,
                Ok(Some(Err(err))) => Some((
                    Err(BodyError::Transport(describe_transport_error(&err))),
                    (chunks, total, true),
                )),
                Ok(Some(Ok(bytes))) => {
                    let total = total.saturating_add(bytes.len());
                    if total > cap {
                        Some((Err(BodyError::TooLarge), (chunks, total, true)))
                    } else {
                        Some((Ok(bytes), (chunks, total, false)))
                    }
                }
            }
        },
    )
    .boxed()
}

/// Reads a whole body. With `truncate`, stops quietly at `cap` (error bodies); otherwise a
/// bigger body is an error.
async fn read_body(
    response: reqwest::Response,
    idle: Duration,
    cap: usize,
    truncate: bool,
) -> Result<Vec<u8>, BodyError> {
    let mut chunks = guarded_chunks(response, idle, if truncate { usize::MAX } else { cap });
    let mut body = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        body.extend_from_slice(&chunk);
        if truncate && body.len() >= cap {
            body.truncate(cap);
            break;
        }
    }
    Ok(body)
}

/// One server-sent event.
pub(crate) struct SseEvent {
    /// The `event:` field (empty when absent).
    pub(crate) event: String,
    pub(crate) data: String,
}

/// Reads server-sent events, mapping stalls to [`ProviderError::Timeout`].
pub(crate) struct SseReader {
    provider: String,
    events: EventStream<BoxStream<'static, Result<Bytes, BodyError>>>,
}

impl SseReader {
    fn new(transport: &Transport, response: reqwest::Response) -> Self {
        SseReader {
            provider: transport.name.clone(),
            events: EventStream::new(guarded_chunks(
                response,
                transport.idle_timeout,
                MAX_REPLY_BYTES,
            )),
        }
    }

    /// The next event, or `None` when the server closed the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        match self.events.next().await {
            None => Ok(None),
            Some(Ok(event)) => Ok(Some(SseEvent {
                event: event.event,
                data: event.data,
            })),
            Some(Err(EventStreamError::Transport(BodyError::Idle))) => {
                Err(ProviderError::Timeout {
                    provider: self.provider.clone(),
                })
            }
            Some(Err(EventStreamError::Transport(BodyError::TooLarge))) => {
                Err(ProviderError::InvalidReply {
                    provider: self.provider.clone(),
                    detail: "reply is too large".into(),
                })
            }
            Some(Err(EventStreamError::Transport(BodyError::Transport(detail)))) => {
                Err(ProviderError::Connect {
                    provider: self.provider.clone(),
                    detail: format!("connection lost while streaming ({detail})"),
                })
            }
            Some(Err(EventStreamError::Utf8(_))) => Err(ProviderError::InvalidReply {
                provider: self.provider.clone(),
                detail: "event stream is not valid UTF-8".into(),
            }),
            Some(Err(EventStreamError::Parser(_))) => Err(ProviderError::InvalidReply {
                provider: self.provider.clone(),
                detail: "event stream is malformed".into(),
            }),
        }
    }
}

/// Maps a non-2xx status to an error. `detail` must already be redacted.
pub(crate) fn status_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    detail: String,
) -> ProviderError {
    let provider = provider.to_string();
    match status {
        429 => ProviderError::RateLimited {
            provider,
            retry_after: retry_after(headers, SystemTime::now()),
        },
        500..=599 => ProviderError::Server {
            provider,
            status,
            detail,
        },
        400..=499 => ProviderError::Rejected {
            provider,
            status,
            detail,
        },
        // 1xx/3xx: redirects are deliberately not followed (they would carry the key along).
        _ => ProviderError::Rejected {
            provider,
            status,
            detail: format!("unexpected HTTP status; {detail}"),
        },
    }
}

/// `retry-after-ms` (OpenAI), `retry-after` in seconds, or `retry-after` as an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let value = text(RETRY_AFTER.as_str())?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The human-readable message of an API error body: `error.message` (Anthropic and OpenAI
/// shapes), a top-level `message`/`detail` string, or the body's text.
pub(crate) fn error_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let message = value
            .pointer("/error/message")
            .or_else(|| value.get("error").filter(|e| e.is_string()))
            .or_else(|| value.get("message"))
            .or_else(|| value.get("detail"))
            .and_then(|m| m.as_str());
        if let Some(message) = message {
            return message.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "no error message".into()
    } else {
        text.to_string()
    }
}

/// Removes anything that could be (part of) the API key, flattens control characters and bounds
/// the length. Servers echo keys in 401 messages ("Incorrect API key provided: sk-ab***yz").
pub(crate) fn redact(text: &str, key: Option<&ApiKey>) -> String {
    let key = key.map(ApiKey::expose).filter(|k| !k.is_empty());
    let mut text = text.to_string();
    if let Some(key) = key {
        text = text.replace(key, "[redacted]");
    }
    let key_windows: Vec<&str> = match key {
        Some(key) if key.len() >= 8 => (0..=key.len() - 8)
            .filter_map(|i| key.get(i..i + 8))
            .collect(),
        _ => Vec::new(),
    };
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| {
            let lower = word.to_ascii_lowercase();
            let looks_like_key = lower.contains("sk-")
                || lower.contains("bearer")
                || key_windows.iter().any(|w| word.contains(w))
                || (word.contains('*') && word.len() >= 8);
            if looks_like_key {
                "[redacted]".to_string()
            } else {
                word.chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect()
            }
        })
        .collect();
    let joined = words.join(" ");
    if joined.chars().count() > MAX_DETAIL_CHARS {
        let mut cut: String = joined.chars().take(MAX_DETAIL_CHARS).collect();
        cut.push('…');
        cut
    } else {
        joined
    }
}

/// Runs `encode`, off the async worker when `heavy` and the runtime can hand the worker's
/// tasks to another thread (a multi-thread runtime; a current-thread one, as in some tests,
/// encodes in place).
fn encode_body(
    heavy: bool,
    encode: impl FnOnce() -> serde_json::Result<Vec<u8>>,
) -> serde_json::Result<Vec<u8>> {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi_thread {
        tokio::task::block_in_place(encode)
    } else {
        encode()
    }
}

/// Whether a request carries photos (their base64 is what makes a body megabytes long).
pub(crate) fn carries_images(items: &[moltmate_core::model::ConversationItem]) -> bool {
    items
        .iter()
        .any(|item| matches!(item, moltmate_core::model::ConversationItem::Image { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With one async worker (the gateway's default on two CPUs), a request with photos is
    /// encoded while the worker goes on serving other users' tasks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_heavy_body_is_encoded_while_the_worker_serves_other_tasks() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ticks = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&ticks);
        let ticker = tokio::spawn(async move {
            loop {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = ticks.load(Ordering::SeqCst);
        let body = encode_body(true, || {
            std::thread::sleep(Duration::from_millis(300));
            Ok(b"{}".to_vec())
        })
        .unwrap();
        let during = ticks.load(Ordering::SeqCst) - before;
        ticker.abort();
        assert_eq!(body, b"{}");
        assert!(during >= 10, "the other task ran {during} times meanwhile");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_heavy_body_on_a_current_thread_runtime_is_encoded_in_place() {
        assert_eq!(encode_body(true, || Ok(b"[]".to_vec())).unwrap(), b"[]");
        assert_eq!(encode_body(false, || Ok(b"1".to_vec())).unwrap(), b"1");
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(
            retry_after(&headers, now),
            Some(Duration::from_millis(1500))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
    }

    #[test]
    fn redaction_removes_key_and_fragments() {
        let key = ApiKey::new("sk-proj-abcdefghijklmnop");
        let out = redact(
            "Incorrect API key provided: sk-proj-abc*****mnop. Check",
            Some(&key),
        );
        assert!(!out.contains("abc"), "{out}");
        let out = redact("key ghijklmnop leaked and Bearer x", Some(&key));
        assert!(!out.contains("ghijklmnop"), "{out}");
        let out = redact(&"x".repeat(1000), None);
        assert!(out.chars().count() <= MAX_DETAIL_CHARS + 1);
    }

    #[test]
    fn error_message_shapes() {
        assert_eq!(
            error_message(br#"{"type":"error","error":{"type":"x","message":"bad model"}}"#),
            "bad model"
        );
        assert_eq!(
            error_message(br#"{"error":{"message":"nope","type":"invalid_request_error"}}"#),
            "nope"
        );
        assert_eq!(error_message(br#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message(b"<html>502</html>"), "<html>502</html>");
        assert_eq!(error_message(b""), "no error message");
    }
}
