//! WhatsApp channel: the official WhatsApp Business Cloud API.
//!
//! # Receiving (a webhook on the gateway's web server)
//!
//! `GET /webhooks/whatsapp` answers Meta's verification handshake (`hub.mode=subscribe`,
//! `hub.verify_token` compared in constant time, `hub.challenge` echoed). `POST` deliveries must
//! carry `X-Hub-Signature-256: sha256=<hex>`, the HMAC-SHA256 of the raw body under the app
//! secret, checked in constant time; unsigned or wrongly signed deliveries get 401 and are not
//! read further. Each text message of a delivery is stored through the gateway (deduplicated by
//! its `wamid` id) **before** the 200 answer; if any cannot be stored the answer is 500 and Meta
//! delivers again (what was stored is recognised as a duplicate). Status updates are read only
//! for failures (a refused reply shows on `/admin`).
//!
//! Photos (`image`), voice notes and audio (`audio`, `voice: true`) and documents (`document`)
//! become attachment references (media id and the delivery's `sha256`; the caption is the
//! text). The user's worker fetches them ([`Channel::fetch_attachment`]): `GET /{media-id}` for
//! the short-lived URL, then that URL with the token — only on Meta's media hosts
//! ([`MEDIA_HOSTS`]) or the configured Graph API's own origin, no redirects, bounded size and
//! time, and the bytes must match the `sha256`.
//!
//! # Sending
//!
//! `POST {apiUrl}/{apiVersion}/{phoneNumberId}/messages` with the access token as bearer, plain
//! text in parts of at most 4096 characters. 429 and Meta's rate-limit codes are waited out
//! (`Retry-After`, else backoff). Outside the 24-hour customer-service window Meta refuses free
//! text (error 131047): that is logged as an error, counted as `outside_window` on `/admin`,
//! `/healthz` and `/metrics`, and the outbox row is marked failed with the reason — never lost
//! silently. The person has to write first (or the operator sends an approved template, which
//! this gateway does not do). Files (`send_file`) are uploaded with `POST /{phone-number-id}/media`
//! (multipart) and sent as an `image` or `document` message by media id, through the same
//! retries and window handling.

use crate::retry::Backoff;
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use moltmate_core::channel::{
    Attachment, AttachmentKind, Channel, ChannelError, InboundMessage, InboundSink, OutboundFile,
};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::webhook::{Webhook, WebhookRequest, WebhookResponse};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use subtle::ConstantTimeEq;

const SERVICE: &str = "WhatsApp";

/// Meta's limit for a text message body, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// Meta's error code for free text outside the 24-hour customer-service window.
pub const OUTSIDE_WINDOW_CODE: i64 = 131047;

/// Text messages handled from one delivery at most (Meta batches a few).
const MAX_MESSAGES_PER_DELIVERY: usize = 100;

/// Longest reply body we read from the Graph API.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The public Graph API.
pub const DEFAULT_API_URL: &str = "https://graph.facebook.com";

/// How the WhatsApp channel reaches Meta. `Debug` shows no secret.
#[derive(Clone)]
pub struct WhatsAppSettings {
    /// The business phone number's id (not the number itself).
    pub phone_number_id: String,
    /// A system-user access token (`Authorization: Bearer`).
    pub access_token: String,
    /// The app secret: key of the deliveries' `X-Hub-Signature-256`.
    pub app_secret: String,
    /// What the webhook handshake must present as `hub.verify_token`.
    pub verify_token: String,
    pub api_url: String,
    pub api_version: String,
    pub request_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_retry_after: Duration,
    pub send_attempts: u32,
}

impl std::fmt::Debug for WhatsAppSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsAppSettings")
            .field("phone_number_id", &self.phone_number_id)
            .field("access_token", &"<redacted>")
            .field("app_secret", &"<redacted>")
            .field("verify_token", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

impl WhatsAppSettings {
    pub fn new(
        phone_number_id: impl Into<String>,
        access_token: impl Into<String>,
        app_secret: impl Into<String>,
        verify_token: impl Into<String>,
    ) -> Self {
        WhatsAppSettings {
            phone_number_id: phone_number_id.into(),
            access_token: access_token.into(),
            app_secret: app_secret.into(),
            verify_token: verify_token.into(),
            api_url: DEFAULT_API_URL.to_string(),
            api_version: "v21.0".to_string(),
            request_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
            send_attempts: 5,
        }
    }
}

/// Why the channel could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WhatsAppSetupError {
    #[error("phoneNumberId must be the numeric id of the business phone number")]
    PhoneNumberId,
    #[error("accessToken, appSecret and verifyToken must not be empty")]
    EmptySecret,
    #[error("invalid apiUrl or apiVersion")]
    Url,
    #[error("could not build the HTTP client: {0}")]
    HttpClient(String),
}

/// The WhatsApp channel: a [`Channel`] for sending and a [`Webhook`] for receiving.
pub struct WhatsAppChannel {
    settings: WhatsAppSettings,
    http: reqwest::Client,
    /// Media downloads: no redirects (a media host must not send the token elsewhere), no
    /// overall timeout of its own (the caller's bound applies).
    media_http: reqwest::Client,
    /// Uploads (`send_file`): a longer timeout than a text message.
    upload_http: reqwest::Client,
    health: Arc<ChannelHealth>,
    sink: OnceLock<Arc<dyn InboundSink>>,
    /// Message ids stored within the replay window (see [`SeenIds`]).
    seen: std::sync::Mutex<SeenIds>,
    /// One log line per minute for refused deliveries.
    refusal_log: std::sync::Mutex<RefusalLog>,
}

/// How old a message may be: Meta retries a delivery for up to 7 days. Anything older is a
/// replay (of a body captured at a proxy, in a log...), whose inbox row may be gone.
pub const REPLAY_WINDOW_SECONDS: i64 = 7 * 24 * 3600;

/// How far in the future a message's timestamp may be (clock skew).
pub const FUTURE_SKEW_SECONDS: i64 = 10 * 60;

/// Ids remembered at most.
const MAX_SEEN_IDS: usize = 65_536;

/// SHA-256 of the ids of messages stored within the replay window, in memory: the inbox row
/// that deduplicates a redelivery is deleted by `users remove`/`reset` (and pruned after 30
/// days), and a replayed signed body would then be answered again. Only hashes of Meta's
/// message ids are kept, never content; at most [`MAX_SEEN_IDS`] (the oldest go first).
#[derive(Default)]
struct SeenIds {
    ids: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<([u8; 32], i64)>,
}

impl SeenIds {
    fn key(id: &str) -> [u8; 32] {
        use sha2::Digest;
        Sha256::digest(id.as_bytes()).into()
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(&Self::key(id))
    }

    fn insert(&mut self, id: &str, now: i64) {
        while let Some((key, at)) = self.order.front().copied() {
            if self.order.len() < MAX_SEEN_IDS && now - at <= REPLAY_WINDOW_SECONDS {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&key);
        }
        let key = Self::key(id);
        if self.ids.insert(key) {
            self.order.push_back((key, now));
        }
    }
}

/// Refused deliveries since the last log line.
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why a Graph API call failed.
#[derive(Debug)]
struct GraphError {
    status: u16,
    code: Option<i64>,
    retry_after: Option<u64>,
    detail: String,
}

impl WhatsAppChannel {
    pub fn new(settings: WhatsAppSettings) -> Result<Self, WhatsAppSetupError> {
        if settings.phone_number_id.is_empty()
            || settings.phone_number_id.len() > 32
            || !settings.phone_number_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(WhatsAppSetupError::PhoneNumberId);
        }
        if settings.access_token.is_empty()
            || settings.app_secret.is_empty()
            || settings.verify_token.is_empty()
        {
            return Err(WhatsAppSetupError::EmptySecret);
        }
        let url_ok = reqwest::Url::parse(&settings.api_url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.query().is_none());
        let version_ok = !settings.api_version.is_empty()
            && settings
                .api_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.');
        if !url_ok || !version_ok {
            return Err(WhatsAppSetupError::Url);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| WhatsAppSetupError::HttpClient(e.without_url().to_string()))?;
        let media_http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WhatsAppSetupError::HttpClient(e.without_url().to_string()))?;
        let upload_http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .timeout(settings.request_timeout.saturating_mul(6))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WhatsAppSetupError::HttpClient(e.without_url().to_string()))?;
        Ok(WhatsAppChannel {
            settings,
            http,
            media_http,
            upload_http,
            health: ChannelHealth::new(ChannelKind::Whatsapp),
            sink: OnceLock::new(),
            seen: std::sync::Mutex::new(SeenIds::default()),
            refusal_log: std::sync::Mutex::new(RefusalLog::default()),
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/{}/{}{path}",
            self.settings.api_url.trim_end_matches('/'),
            self.settings.api_version,
            self.settings.phone_number_id
        )
    }

    async fn graph(&self, post: Option<&Value>, path: &str) -> Result<Value, GraphError> {
        let request = match post {
            Some(body) => self.http.post(self.url(path)).json(body),
            None => self.http.get(self.url(path)),
        };
        self.graph_request(request).await
    }

    /// `{apiUrl}/{apiVersion}/{media_id}`: a media object's metadata (Graph API, not under
    /// the phone number).
    fn media_url(&self, media_id: &str) -> String {
        format!(
            "{}/{}/{media_id}",
            self.settings.api_url.trim_end_matches('/'),
            self.settings.api_version,
        )
    }

    async fn graph_request(&self, request: reqwest::RequestBuilder) -> Result<Value, GraphError> {
        let response = request
            .bearer_auth(&self.settings.access_token)
            .send()
            .await
            .map_err(|e| GraphError {
                status: 0,
                code: None,
                retry_after: None,
                detail: format!("could not reach the Graph API: {}", e.without_url()),
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = read_bounded(response).await;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let error = body.get("error");
        let code = error.and_then(|e| e.get("code")).and_then(Value::as_i64);
        // Meta's own message; never contains our token. Bounded, one line.
        let message: String = error
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        Err(GraphError {
            status,
            code,
            retry_after,
            detail: format!(
                "HTTP {status}, code {}: {message}",
                code.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
            ),
        })
    }

    fn classify(&self, e: &GraphError) -> ErrorClass {
        match (e.status, e.code) {
            (0, _) => ErrorClass::Unreachable,
            (_, Some(OUTSIDE_WINDOW_CODE)) => ErrorClass::OutsideWindow,
            (429, _) | (_, Some(4 | 80007 | 130429 | 131056)) => ErrorClass::RateLimited,
            (401 | 403, _) | (_, Some(190)) => ErrorClass::Credentials,
            (500..=599, _) => ErrorClass::Server,
            _ => ErrorClass::Rejected,
        }
    }

    fn channel_error(&self, e: GraphError, class: ErrorClass) -> ChannelError {
        match class {
            ErrorClass::Unreachable => ChannelError::Unreachable {
                service: SERVICE,
                detail: e.detail,
            },
            ErrorClass::RateLimited => ChannelError::RateLimited {
                service: SERVICE,
                retry_after_seconds: e.retry_after.unwrap_or(0),
            },
            ErrorClass::Server => ChannelError::Server {
                service: SERVICE,
                status: e.status,
                detail: e.detail,
            },
            ErrorClass::OutsideWindow => ChannelError::Rejected {
                service: SERVICE,
                status: e.status,
                detail: format!(
                    "outside the 24-hour customer-service window: the person must write first ({})",
                    e.detail
                ),
            },
            ErrorClass::Credentials => ChannelError::Rejected {
                service: SERVICE,
                status: 401,
                detail: format!(
                    "the access token was refused; check channels.whatsapp.accessToken ({})",
                    e.detail
                ),
            },
            _ => ChannelError::Rejected {
                service: SERVICE,
                status: e.status,
                detail: e.detail,
            },
        }
    }

    async fn send_part(&self, to: &str, text: &str) -> Result<(), ChannelError> {
        let body = json!({
            "messaging_product": "whatsapp", "recipient_type": "individual", "to": to,
            "type": "text", "text": {"preview_url": false, "body": text}
        });
        self.send_message(&body).await
    }

    /// `POST .../messages` with retries on rate limits and server errors; outside the 24-hour
    /// window a clear, operator-visible failure.
    async fn send_message(&self, body: &Value) -> Result<(), ChannelError> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut attempt = 1;
        loop {
            let error = match self.graph(Some(body), "/messages").await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let class = self.classify(&error);
            self.health.error(class);
            let retry = match class {
                ErrorClass::RateLimited => Some(
                    error
                        .retry_after
                        .map(|s| Duration::from_secs(s).min(self.settings.max_retry_after))
                        .unwrap_or_else(|| backoff.next_delay()),
                ),
                ErrorClass::Unreachable | ErrorClass::Server => Some(backoff.next_delay()),
                _ => None,
            };
            match retry {
                Some(delay) if attempt < self.settings.send_attempts.max(1) => {
                    tracing::warn!(error = %error.detail, attempt, "whatsapp: send failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                _ => {
                    if class == ErrorClass::OutsideWindow {
                        tracing::error!("whatsapp: a reply was refused because the person last wrote more than 24 hours ago (code 131047); it is marked failed in the outbox and counted on /admin");
                    }
                    if class == ErrorClass::Credentials {
                        self.health.set_connected(false);
                    }
                    return Err(self.channel_error(error, class));
                }
            }
        }
    }

    fn verify_signature(&self, request: &WebhookRequest) -> bool {
        let Some(header) = request.header("x-hub-signature-256") else {
            return false;
        };
        let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
            return false;
        };
        let Ok(signature) = hex::decode(hex_sig) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.settings.app_secret.as_bytes())
        else {
            return false;
        };
        mac.update(&request.body);
        mac.verify_slice(&signature).is_ok()
    }

    fn handshake(&self, request: &WebhookRequest) -> WebhookResponse {
        let mode = request.query("hub.mode");
        let token = request.query("hub.verify_token").unwrap_or("");
        let challenge = request.query("hub.challenge").unwrap_or("");
        let token_ok: bool = token
            .as_bytes()
            .ct_eq(self.settings.verify_token.as_bytes())
            .into();
        if mode == Some("subscribe")
            && token_ok
            && !challenge.is_empty()
            && challenge.len() <= 256
            && challenge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            tracing::info!("whatsapp: webhook verified by Meta");
            WebhookResponse::new(200, challenge)
        } else {
            self.health.refusal(ErrorClass::BadDelivery);
            WebhookResponse::new(403, "verification failed")
        }
    }

    /// The text messages of a delivery, and whether any reply was reported failed.
    fn messages(&self, delivery: &Value, now: i64) -> Vec<InboundMessage> {
        let mut out = Vec::new();
        let entries = delivery.get("entry").and_then(Value::as_array);
        for change in entries
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("changes").and_then(Value::as_array))
            .flatten()
        {
            let Some(value) = change.get("value") else {
                continue;
            };
            let ours = value
                .pointer("/metadata/phone_number_id")
                .and_then(Value::as_str)
                .is_none_or(|id| id == self.settings.phone_number_id);
            if !ours {
                continue;
            }
            for status in value
                .get("statuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if status.get("status").and_then(Value::as_str) == Some("failed") {
                    let outside = status
                        .get("errors")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .any(|e| {
                            e.get("code").and_then(Value::as_i64) == Some(OUTSIDE_WINDOW_CODE)
                        });
                    self.health.error(if outside {
                        ErrorClass::OutsideWindow
                    } else {
                        ErrorClass::Rejected
                    });
                    tracing::warn!(
                        outside_window = outside,
                        "whatsapp: Meta reports a reply as not delivered"
                    );
                }
            }
            let contacts = value.get("contacts").and_then(Value::as_array);
            for message in value
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if out.len() >= MAX_MESSAGES_PER_DELIVERY {
                    break;
                }
                let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
                let (text, attachments) = match kind {
                    "text" => match message.pointer("/text/body").and_then(Value::as_str) {
                        Some(text) if !text.is_empty() => (text, Vec::new()),
                        _ => continue,
                    },
                    "image" | "audio" | "document" => {
                        let Some(media) = message.get(kind) else {
                            continue;
                        };
                        let Some(attachment) = media_attachment(kind, media) else {
                            continue;
                        };
                        let caption = media.get("caption").and_then(Value::as_str).unwrap_or("");
                        (caption, vec![attachment])
                    }
                    _ => continue,
                };
                let (Some(from), Some(id)) = (
                    message.get("from").and_then(Value::as_str),
                    message.get("id").and_then(Value::as_str),
                ) else {
                    continue;
                };
                if from.is_empty()
                    || from.len() > 15
                    || !from.chars().all(|c| c.is_ascii_digit())
                    || id.is_empty()
                    || id.len() > 128
                {
                    continue;
                }
                let Ok(peer) = PeerId::new(format!("+{from}")) else {
                    continue;
                };
                // The signature has no freshness: a message older than Meta's retry window,
                // or dated in the future, is a replay or a forgery.
                let fresh = message
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<i64>().ok())
                    .is_some_and(|t| {
                        t >= now - REPLAY_WINDOW_SECONDS && t <= now + FUTURE_SKEW_SECONDS
                    });
                if !fresh {
                    self.refused("a message older than 7 days, dated in the future or without a timestamp (a replayed delivery?)");
                    continue;
                }
                let name = contacts
                    .into_iter()
                    .flatten()
                    .find(|c| c.get("wa_id").and_then(Value::as_str) == Some(from))
                    .and_then(|c| c.pointer("/profile/name"))
                    .and_then(Value::as_str);
                out.push(InboundMessage {
                    attachments,
                    sender: Identity::new(ChannelKind::Whatsapp, peer),
                    chat_id: from.to_string(),
                    external_id: id.to_string(),
                    cursor: None,
                    text: text.to_string(),
                    sender_name: crate::telegram::display_name(name, None),
                    language_code: None,
                });
            }
        }
        out
    }
}

/// Media hosts the Cloud API hands out download URLs on (Meta's CDN). A media URL on any other
/// host — but the configured Graph API's own origin, which the test double uses — is refused
/// without a request: the bearer token goes with the download.
pub const MEDIA_HOSTS: [&str; 2] = ["lookaside.fbsbx.com", "lookaside.whatsapp.net"];

/// Separator between a media id and its expected SHA-256 in an attachment's `file_ref`.
const REF_SHA: char = '#';

/// A media message's part (`image`, `audio`, `document`) as an attachment reference:
/// `file_ref` is `<media id>#<sha256 as sent>`; everything else is the sender's claim.
fn media_attachment(kind: &str, media: &Value) -> Option<Attachment> {
    let id = media.get("id").and_then(Value::as_str)?;
    if !is_media_id(id) {
        return None;
    }
    let kind = match kind {
        "image" => AttachmentKind::Photo,
        "audio" if media.get("voice").and_then(Value::as_bool) == Some(true) => {
            AttachmentKind::Voice
        }
        "audio" => AttachmentKind::Audio,
        _ => AttachmentKind::Document,
    };
    let sha = media
        .get("sha256")
        .and_then(Value::as_str)
        .filter(|s| s.len() <= 128 && expected_digest(s).is_some())
        .unwrap_or("");
    let mut attachment = Attachment::new(kind, format!("{id}{REF_SHA}{sha}"));
    attachment.file_name = media
        .get("filename")
        .and_then(Value::as_str)
        .map(|n| n.chars().take(255).collect());
    attachment.mime_type = media
        .get("mime_type")
        .and_then(Value::as_str)
        .map(|m| m.chars().take(128).collect());
    Some(attachment)
}

/// Meta's media ids are numbers; nothing else is put into a URL path.
fn is_media_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit())
}

/// A SHA-256 as Meta writes it: 64 hex digits or 44 characters of base64.
fn expected_digest(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let bytes = if text.len() == 64 {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?
    };
    bytes.try_into().ok()
}

fn media_error(status: u16, detail: impl Into<String>) -> ChannelError {
    ChannelError::Rejected {
        service: SERVICE,
        status,
        detail: detail.into(),
    }
}

/// A MIME type for an outgoing file by its name (Meta requires one with the upload).
fn upload_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "pdf" => "application/pdf",
        "txt" | "md" | "csv" | "log" => "text/plain",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        _ => "application/octet-stream",
    }
}

impl WhatsAppChannel {
    /// Whether a media URL Meta returned may be fetched with our token: `https` on one of
    /// [`MEDIA_HOSTS`], or the configured Graph API's own origin (scheme, host and port).
    fn media_url_allowed(&self, url: &reqwest::Url) -> bool {
        if url.username() != "" || url.password().is_some() {
            return false;
        }
        let documented = url.scheme() == "https"
            && url.port().is_none()
            && url.host_str().is_some_and(|h| MEDIA_HOSTS.contains(&h));
        let graph = reqwest::Url::parse(&self.settings.api_url)
            .is_ok_and(|api| api.origin() == url.origin());
        documented || graph
    }

    async fn download_media(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ChannelError> {
        let (id, sha) = attachment
            .file_ref
            .split_once(REF_SHA)
            .unwrap_or((attachment.file_ref.as_str(), ""));
        if !is_media_id(id) {
            return Err(media_error(400, "not a WhatsApp media id"));
        }
        let meta = self
            .graph_request(self.http.get(self.media_url(id)))
            .await
            .map_err(|e| {
                let class = self.classify(&e);
                self.channel_error(e, class)
            })?;
        if let Some(size) = meta.get("file_size").and_then(Value::as_u64) {
            if size > max_bytes {
                return Err(media_error(
                    413,
                    format!("the file has {size} bytes, more than the limit of {max_bytes}"),
                ));
            }
        }
        let Some(url) = meta.get("url").and_then(Value::as_str) else {
            return Err(ChannelError::InvalidReply {
                service: SERVICE,
                detail: "the media object has no url".to_string(),
            });
        };
        let url = reqwest::Url::parse(url).map_err(|_| ChannelError::InvalidReply {
            service: SERVICE,
            detail: "the media url does not parse".to_string(),
        })?;
        if !self.media_url_allowed(&url) {
            tracing::warn!(
                host = url.host_str().unwrap_or(""),
                "whatsapp: refused a media url on a host that is not WhatsApp's"
            );
            return Err(media_error(
                403,
                "the media url is not on a WhatsApp media host; not downloaded",
            ));
        }
        let expected = expected_digest(sha).or_else(|| {
            meta.get("sha256")
                .and_then(Value::as_str)
                .and_then(expected_digest)
        });
        let mut response = self
            .media_http
            .get(url)
            .bearer_auth(&self.settings.access_token)
            .send()
            .await
            .map_err(|e| ChannelError::Unreachable {
                service: SERVICE,
                detail: format!("media download: {}", e.without_url()),
            })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(if status >= 500 {
                ChannelError::Server {
                    service: SERVICE,
                    status,
                    detail: "media download failed".to_string(),
                }
            } else {
                media_error(status, "media download refused")
            });
        }
        if let Some(length) = response.content_length().filter(|l| *l > max_bytes) {
            return Err(media_error(
                413,
                format!("the file has {length} bytes, more than the limit of {max_bytes}"),
            ));
        }
        let mut out = Vec::new();
        // Hashed chunk by chunk as it arrives: one digest over 20 MB at the end would hold a
        // runtime thread for tens of milliseconds.
        let mut digest = {
            use sha2::Digest as _;
            Sha256::new()
        };
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| ChannelError::Unreachable {
                    service: SERVICE,
                    detail: format!("media download: {}", e.without_url()),
                })?;
            let Some(chunk) = chunk else { break };
            if (out.len() + chunk.len()) as u64 > max_bytes {
                return Err(media_error(
                    413,
                    format!("the file is larger than the limit of {max_bytes} bytes"),
                ));
            }
            {
                use sha2::Digest as _;
                digest.update(&chunk);
            }
            out.extend_from_slice(&chunk);
        }
        if let Some(expected) = expected {
            use sha2::Digest as _;
            let actual: [u8; 32] = digest.finalize().into();
            let same: bool = actual.ct_eq(&expected).into();
            if !same {
                return Err(media_error(
                    422,
                    "the downloaded file does not match its sha256; refused",
                ));
            }
        }
        Ok(out)
    }

    /// `POST /{phone-number-id}/media` (multipart): the media id of the uploaded file.
    async fn upload(
        &self,
        file: &OutboundFile,
        mime: &'static str,
    ) -> Result<String, ChannelError> {
        let part = reqwest::multipart::Part::bytes(file.content.clone())
            .file_name(file.file_name.clone())
            .mime_str(mime)
            .map_err(|e| media_error(400, format!("upload type: {}", e.without_url())))?;
        let form = reqwest::multipart::Form::new()
            .text("messaging_product", "whatsapp")
            .text("type", mime)
            .part("file", part);
        let reply = self
            .graph_request(self.upload_http.post(self.url("/media")).multipart(form))
            .await
            .map_err(|e| {
                let class = self.classify(&e);
                self.health.error(class);
                self.channel_error(e, class)
            })?;
        reply
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_media_id(id))
            .map(str::to_string)
            .ok_or_else(|| ChannelError::InvalidReply {
                service: SERVICE,
                detail: "the upload returned no media id".to_string(),
            })
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WhatsAppChannel {
    /// A delivery (or message) refused: counted as `bad_delivery` without replacing the last
    /// error shown, and logged at most once a minute with the count since the last line
    /// (strangers can send as many as the rate limit lets them).
    fn refused(&self, what: &'static str) {
        self.health.refusal(ErrorClass::BadDelivery);
        let mut log = lock(&self.refusal_log);
        let now = std::time::Instant::now();
        if log
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(60))
        {
            log.suppressed = log.suppressed.saturating_add(1);
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last = Some(now);
        drop(log);
        tracing::warn!(suppressed, "whatsapp: refused {what}");
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    out
}

#[async_trait]
impl Webhook for WhatsAppChannel {
    fn channel(&self) -> ChannelKind {
        ChannelKind::Whatsapp
    }

    async fn handle(&self, request: WebhookRequest) -> WebhookResponse {
        if !request.post {
            return self.handshake(&request);
        }
        if !self.verify_signature(&request) {
            self.refused("a webhook delivery without a valid X-Hub-Signature-256 (check channels.whatsapp.appSecret if this repeats)");
            return WebhookResponse::new(401, "bad signature");
        }
        let Some(sink) = self.sink.get() else {
            return WebhookResponse::new(503, "starting");
        };
        let Ok(delivery) = serde_json::from_slice::<Value>(&request.body) else {
            self.health.error(ErrorClass::BadDelivery);
            return WebhookResponse::new(400, "not JSON");
        };
        let now = unix_now();
        for message in self.messages(&delivery, now) {
            self.health.event();
            if lock(&self.seen).contains(&message.external_id) {
                continue;
            }
            let id = message.external_id.clone();
            if let Err(e) = sink.accept(message).await {
                self.health.error(ErrorClass::Storage);
                tracing::warn!(error = %e, "whatsapp: could not store a message; Meta will deliver it again");
                return WebhookResponse::new(500, "not stored");
            }
            lock(&self.seen).insert(&id, now);
        }
        WebhookResponse::new(200, "ok")
    }
}

#[async_trait]
impl Channel for WhatsAppChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Whatsapp
    }

    fn health(&self) -> Arc<ChannelHealth> {
        Arc::clone(&self.health)
    }

    /// Deliveries come through the webhook; this checks the token once and waits.
    async fn run(
        &self,
        sink: Arc<dyn InboundSink>,
        shutdown: Shutdown,
    ) -> Result<(), ChannelError> {
        let _ = self.sink.set(sink);
        let checked = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = self.graph(None, "?fields=id") => r,
        };
        match checked {
            Ok(_) => {
                self.health.set_connected(true);
                tracing::info!("whatsapp: connected");
            }
            Err(e) => {
                let class = self.classify(&e);
                self.health.error(class);
                if class == ErrorClass::Credentials {
                    tracing::error!(error = %e.detail, "whatsapp: Meta refused the access token (channels.whatsapp.accessToken) or the phone number id; replies cannot be sent");
                } else {
                    tracing::warn!(error = %e.detail, "whatsapp: could not check the phone number with the Graph API");
                }
            }
        }
        shutdown.cancelled().await;
        Ok(())
    }

    async fn send_text(&self, chat_id: &str, text: &str) -> Result<(), ChannelError> {
        if chat_id.is_empty() || chat_id.len() > 15 || !chat_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "not a WhatsApp number".to_string(),
            });
        }
        for part in crate::telegram::split::split_message(text, MAX_MESSAGE_CHARS) {
            self.send_part(chat_id, &part).await?;
        }
        self.health.set_connected(true);
        Ok(())
    }

    async fn fetch_attachment(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        if let Some(size) = attachment.size.filter(|s| *s > max_bytes) {
            return Err(media_error(
                413,
                format!("the file has {size} bytes, more than the limit of {max_bytes}"),
            ));
        }
        match tokio::time::timeout(timeout, self.download_media(attachment, max_bytes)).await {
            Ok(result) => result,
            Err(_) => Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: format!("the download took longer than {}s", timeout.as_secs()),
            }),
        }
    }

    /// Uploads the file, then sends it by media id (`image` for JPEG/PNG, else `document`),
    /// through the same retries and 24-hour-window handling as text.
    async fn send_file(&self, chat_id: &str, file: &OutboundFile) -> Result<(), ChannelError> {
        if chat_id.is_empty() || chat_id.len() > 15 || !chat_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(media_error(400, "not a WhatsApp number"));
        }
        let mime = upload_type(&file.file_name);
        let id = self.upload(file, mime).await?;
        let caption = file.caption.clone().unwrap_or_default();
        let body = if mime.starts_with("image/") {
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual", "to": chat_id,
                "type": "image", "image": {"id": id, "caption": caption}
            })
        } else {
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual", "to": chat_id,
                "type": "document",
                "document": {"id": id, "filename": file.file_name, "caption": caption}
            })
        };
        self.send_message(&body).await?;
        self.health.set_connected(true);
        Ok(())
    }

    /// WhatsApp shows typing only tied to a received message id; not used.
    async fn send_typing(&self, _chat_id: &str) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// `sha256=<hex>` of `body` under `secret`, as Meta signs deliveries (for tests and doubles).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> WhatsAppChannel {
        WhatsAppChannel::new(WhatsAppSettings::new(
            "1234567890",
            "tok",
            "app-secret",
            "verify",
        ))
        .unwrap()
    }

    fn request(post: bool, body: &[u8], signature_header: Option<String>) -> WebhookRequest {
        WebhookRequest {
            post,
            query: vec![],
            headers: signature_header
                .map(|s| vec![("x-hub-signature-256".to_string(), s)])
                .unwrap_or_default(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn signatures_are_checked() {
        let c = channel();
        let body = br#"{"entry":[]}"#;
        assert!(c.verify_signature(&request(true, body, Some(signature("app-secret", body)))));
        assert!(!c.verify_signature(&request(true, body, Some(signature("wrong", body)))));
        assert!(!c.verify_signature(&request(true, body, None)));
        assert!(!c.verify_signature(&request(true, body, Some("sha256=zz".into()))));
        assert!(!c.verify_signature(&request(
            true,
            b"{\"entry\":[1]}",
            Some(signature("app-secret", body))
        )));
    }

    #[test]
    fn the_handshake_needs_the_verify_token() {
        let c = channel();
        let mut r = request(false, b"", None);
        r.query = vec![
            ("hub.mode".into(), "subscribe".into()),
            ("hub.verify_token".into(), "verify".into()),
            ("hub.challenge".into(), "1158201444".into()),
        ];
        assert_eq!(c.handshake(&r), WebhookResponse::new(200, "1158201444"));
        r.query[1].1 = "nope".into();
        assert_eq!(c.handshake(&r).status, 403);
    }

    #[test]
    fn text_messages_are_read_from_a_delivery() {
        let delivery = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550001", "phone_number_id": "1234567890"},
        "contacts": [{"profile": {"name": "Anna"}, "wa_id": "4917012345678"}],
        "messages": [
            {"from": "4917012345678", "id": "wamid.A", "timestamp": "1700000000", "type": "text", "text": {"body": "hallo"}},
            {"from": "4917012345678", "id": "wamid.B", "timestamp": "1700000001", "type": "image", "image": {}},
            {"from": "49x", "id": "wamid.C", "type": "text", "text": {"body": "bad sender"}}
        ]}}]}]});
        let messages = channel().messages(&delivery, 1_700_000_100);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].sender.to_string(), "whatsapp:+4917012345678");
        assert_eq!(messages[0].chat_id, "4917012345678");
        assert_eq!(messages[0].external_id, "wamid.A");
        assert_eq!(messages[0].sender_name.as_deref(), Some("Anna"));
    }

    #[test]
    fn media_messages_become_attachments() {
        let delivery = json!({"entry": [{"changes": [{"value": {"messages": [
            {"from": "4917012345678", "timestamp": "1700000000", "id": "wamid.V", "type": "audio",
             "audio": {"id": "111", "mime_type": "audio/ogg; codecs=opus", "voice": true,
                       "sha256": "Ci0Ir7qWnBnW3ti9Y5JbOtQ8HmM9QMn0wB5ot3lQD0E="}},
            {"from": "4917012345678", "timestamp": "1700000000", "id": "wamid.D", "type": "document",
             "document": {"id": "222", "filename": "a.pdf", "caption": "read this", "sha256": "nope"}},
            {"from": "4917012345678", "timestamp": "1700000000", "id": "wamid.X", "type": "image",
             "image": {"id": "../../me?x=1"}}
        ]}}]}]});
        let messages = channel().messages(&delivery, 1_700_000_000);
        assert_eq!(
            messages.len(),
            2,
            "a media id that is not a number is dropped"
        );
        assert_eq!(messages[0].attachments[0].kind, AttachmentKind::Voice);
        assert!(messages[0].attachments[0].file_ref.starts_with("111#Ci0I"));
        assert_eq!(messages[1].text, "read this");
        assert_eq!(messages[1].attachments[0].kind, AttachmentKind::Document);
        assert_eq!(
            messages[1].attachments[0].file_ref, "222#",
            "a bad sha256 is dropped"
        );
        assert_eq!(
            messages[1].attachments[0].file_name.as_deref(),
            Some("a.pdf")
        );
    }

    #[test]
    fn media_urls_only_on_whatsapp_hosts_or_the_graph_origin() {
        let mut settings = WhatsAppSettings::new("1234567890", "tok", "app-secret", "verify");
        settings.api_url = "http://127.0.0.1:4000".to_string();
        let c = WhatsAppChannel::new(settings).unwrap();
        let allowed = |u: &str| c.media_url_allowed(&reqwest::Url::parse(u).unwrap());
        assert!(allowed(
            "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1"
        ));
        assert!(allowed("http://127.0.0.1:4000/media/1"));
        assert!(!allowed("http://lookaside.fbsbx.com/x"), "plain http");
        assert!(!allowed("https://lookaside.fbsbx.com.evil.example/x"));
        assert!(!allowed("https://lookaside.fbsbx.com:8443/x"));
        assert!(!allowed("https://user@lookaside.fbsbx.com/x"));
        assert!(!allowed("http://127.0.0.1:4001/media/1"), "another port");
        assert!(!allowed("http://169.254.169.254/latest/meta-data"));
    }

    #[test]
    fn whatsapp_messages_outside_the_replay_window_are_refused() {
        let c = channel();
        let at = |ts: i64| {
            json!({"entry": [{"changes": [{"value": {"messages": [
                {"from": "4917012345678", "id": format!("wamid.{ts}"), "timestamp": ts.to_string(), "type": "text", "text": {"body": "hi"}}
            ]}}]}]})
        };
        let now = 1_800_000_000;
        assert_eq!(c.messages(&at(now), now).len(), 1);
        assert_eq!(c.messages(&at(now - REPLAY_WINDOW_SECONDS), now).len(), 1);
        assert_eq!(
            c.messages(&at(now - REPLAY_WINDOW_SECONDS - 1), now).len(),
            0
        );
        assert_eq!(c.messages(&at(now + FUTURE_SKEW_SECONDS + 1), now).len(), 0);
        let refusals = c.health.snapshot();
        assert!(
            refusals.last_error.is_none(),
            "a refusal is not the last error"
        );
        let mut seen = SeenIds::default();
        for i in 0..(MAX_SEEN_IDS + 10) {
            seen.insert(&format!("wamid.{i}"), now);
        }
        assert_eq!(seen.ids.len(), MAX_SEEN_IDS, "bounded");
        assert!(seen.contains(&format!("wamid.{}", MAX_SEEN_IDS + 9)));
        assert!(!seen.contains("wamid.0"), "the oldest went first");
        seen.insert("wamid.late", now + REPLAY_WINDOW_SECONDS + 1);
        assert!(seen.ids.len() <= 2, "expired ids are dropped");
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!(
            "{:?}",
            WhatsAppSettings::new("1", "TOKEN-X", "SECRET-Y", "VERIFY-Z")
        );
        assert!(
            !shown.contains("TOKEN-X")
                && !shown.contains("SECRET-Y")
                && !shown.contains("VERIFY-Z")
        );
    }
}
