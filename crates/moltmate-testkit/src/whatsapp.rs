//! A fake WhatsApp Cloud API for tests: the Graph API endpoints the gateway calls, and a
//! [`WebhookSigner`] that posts deliveries to the gateway's webhook the way Meta does.
//!
//! Graph API (`http://127.0.0.1:<port>`): `GET /{version}/{phone-number-id}` (the token
//! check) and `POST /{version}/{phone-number-id}/messages` (text messages: `{messaging_product,
//! to, type: "text", text: {body}}` → `{messaging_product, contacts: [{input, wa_id}],
//! messages: [{id}]}`). A wrong bearer token gets 401 with error code 190; a body over 4096
//! characters 400 (code 100); recipients marked outside the 24-hour window 400 with code
//! 131047; injected rate limits 429 with code 130429 and `Retry-After`.
//!
//! Deliveries: `{"object":"whatsapp_business_account","entry":[{"id","changes":[{"field":
//! "messages","value":{"messaging_product","metadata":{...},"contacts":[...],"messages":[...]}}]}]}`
//! signed with `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body under the app
//! secret>`.

use axum::body::Bytes;
use axum::extract::{Path, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A message the gateway sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub to: String,
    pub text: String,
}

/// A file the gateway sent by media id (`type: image` or `document`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMedia {
    pub to: String,
    /// `image` or `document`.
    pub kind: String,
    pub file_name: Option<String>,
    pub caption: Option<String>,
    /// The uploaded bytes the media id names.
    pub content: Vec<u8>,
}

/// A media object the double serves (`GET /{version}/{media-id}` and its download URL).
#[derive(Clone)]
struct Media {
    content: Vec<u8>,
    mime_type: String,
    /// The `file_size` claimed (defaults to the real size).
    claimed_size: u64,
    /// Where `url` points: our own `/media/<id>` unless a foreign URL was set.
    url: Option<String>,
}

#[derive(Default)]
struct Graph {
    media: std::collections::HashMap<String, Media>,
    /// Uploaded media by id: (type, file name, bytes).
    uploads: std::collections::HashMap<String, Field>,
    sent_media: Vec<SentMedia>,
    media_downloads: usize,
    foreign_hits: usize,
    token: String,
    phone_number_id: String,
    sent: Vec<SentMessage>,
    outside_window: HashSet<String>,
    rate_limit_sends: usize,
    rate_limit_seconds: u64,
    send_calls: usize,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Graph>>);

fn lock(s: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fake Graph API.
#[derive(Clone)]
pub struct FakeGraphApi {
    state: Arc<Mutex<Graph>>,
    url: String,
}

impl FakeGraphApi {
    pub async fn start(phone_number_id: &str, token: &str) -> Self {
        let state = Arc::new(Mutex::new(Graph {
            token: token.to_string(),
            phone_number_id: phone_number_id.to_string(),
            ..Graph::default()
        }));
        let app = Router::new()
            .route("/{version}/{phone}", get(phone_number))
            .route(
                "/{version}/{phone}/messages",
                axum::routing::post(send_message),
            )
            .route(
                "/{version}/{phone}/media",
                axum::routing::post(upload_media),
            )
            .route("/media/{id}", get(download_media))
            .with_state(Shared(Arc::clone(&state)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake graph api");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGraphApi {
            state,
            url: format!("http://{address}"),
        }
    }

    /// Serves `content` as a media object; returns its id (numeric, like Meta's) and the
    /// `sha256` a delivery names (base64, as Meta writes it).
    pub fn add_media(&self, content: &[u8], mime_type: &str) -> (String, String) {
        use base64::Engine as _;
        use sha2::Digest as _;
        let id = format!(
            "{}",
            900_000_000_000u64 + MESSAGE_IDS.fetch_add(1, Ordering::Relaxed)
        );
        lock(&self.state).media.insert(
            id.clone(),
            Media {
                content: content.to_vec(),
                mime_type: mime_type.to_string(),
                claimed_size: content.len() as u64,
                url: None,
            },
        );
        let sha = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(content));
        (id, sha)
    }

    /// Makes media `id`'s metadata claim `size` bytes.
    pub fn claim_media_size(&self, id: &str, size: u64) {
        if let Some(m) = lock(&self.state).media.get_mut(id) {
            m.claimed_size = size;
        }
    }

    /// Makes media `id`'s download URL point at a foreign server (which counts requests, see
    /// [`FakeGraphApi::foreign_hits`]).
    pub async fn point_media_elsewhere(&self, id: &str) {
        let shared = Shared(Arc::clone(&self.state));
        let app = Router::new()
            .fallback(|Extract(shared): Extract<Shared>| async move {
                lock(&shared.0).foreign_hits += 1;
                "foreign"
            })
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind foreign host");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        if let Some(m) = lock(&self.state).media.get_mut(id) {
            m.url = Some(format!("http://{address}/media/{id}"));
        }
    }

    /// Requests the foreign media server received.
    pub fn foreign_hits(&self) -> usize {
        lock(&self.state).foreign_hits
    }

    /// Media downloads served (from our own `/media/<id>`).
    pub fn media_downloads(&self) -> usize {
        lock(&self.state).media_downloads
    }

    /// Files the gateway sent by media id.
    pub fn sent_media(&self) -> Vec<SentMedia> {
        lock(&self.state).sent_media.clone()
    }

    /// The value for `channels.whatsapp.apiUrl`.
    pub fn api_url(&self) -> &str {
        &self.url
    }

    pub fn sent_messages(&self) -> Vec<SentMessage> {
        lock(&self.state).sent.clone()
    }

    /// `POST .../messages` calls so far (refused ones included).
    pub fn send_calls(&self) -> usize {
        lock(&self.state).send_calls
    }

    /// Replies to `wa_id` are refused as outside the 24-hour window (code 131047).
    pub fn outside_window(&self, wa_id: &str) {
        lock(&self.state).outside_window.insert(wa_id.to_string());
    }

    /// The next `count` sends get 429 (code 130429) with `Retry-After: seconds`.
    pub fn rate_limit_next_sends(&self, count: usize, seconds: u64) {
        let mut s = lock(&self.state);
        s.rate_limit_sends = count;
        s.rate_limit_seconds = seconds;
    }

    pub async fn wait_for_messages(
        &self,
        to: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, Vec<SentMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let texts: Vec<String> = self
                .sent_messages()
                .into_iter()
                .filter(|m| m.to == to)
                .map(|m| m.text)
                .collect();
            if texts.len() >= count {
                return Ok(texts);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.sent_messages());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn graph_error(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": "OAuthException", "code": code,
            "fbtrace_id": "AbCdEf"}}),
        ),
    )
        .into_response()
}

fn authorized(state: &Graph, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(state.token.as_str())
}

async fn phone_number(
    Extract(shared): Extract<Shared>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let state = lock(&shared.0);
    if !authorized(&state, &headers) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    if let Some(media) = state.media.get(&phone) {
        use base64::Engine as _;
        use sha2::Digest as _;
        let url = media
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{}/media/{phone}", host(&headers)));
        return axum::Json(json!({
            "messaging_product": "whatsapp", "url": url, "mime_type": media.mime_type,
            "sha256": base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&media.content)),
            "file_size": media.claimed_size, "id": phone
        }))
        .into_response();
    }
    if phone != state.phone_number_id {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported get request.");
    }
    axum::Json(json!({"id": phone})).into_response()
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

/// The media URL: the bytes, for the bearer token only.
async fn download_media(
    Extract(shared): Extract<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut state = lock(&shared.0);
    if !authorized(&state, &headers) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    let Some(media) = state.media.get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    state.media_downloads += 1;
    ([("content-type", media.mime_type)], media.content).into_response()
}

/// `POST /{phone}/media` as multipart/form-data: `messaging_product=whatsapp`, `type`, `file`.
async fn upload_media(
    Extract(shared): Extract<Shared>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = lock(&shared.0);
    if !authorized(&state, &headers) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    if phone != state.phone_number_id {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported post request.");
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(fields) = multipart(content_type, &body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "expects multipart/form-data");
    };
    let field = |name: &str| fields.iter().find(|(n, _, _)| n == name);
    if field("messaging_product").map(|(_, _, v)| v.as_slice()) != Some(b"whatsapp") {
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            "messaging_product is required",
        );
    }
    let Some((_, file_name, content)) = field("file") else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "file is required");
    };
    let Some((_, _, mime)) = field("type") else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "type is required");
    };
    let id = format!(
        "{}",
        800_000_000_000u64 + MESSAGE_IDS.fetch_add(1, Ordering::Relaxed)
    );
    state.uploads.insert(
        id.clone(),
        (
            String::from_utf8_lossy(mime).to_string(),
            file_name.clone(),
            content.clone(),
        ),
    );
    axum::Json(json!({"id": id})).into_response()
}

/// One multipart field: (name, filename, bytes).
type Field = (String, Option<String>, Vec<u8>);

/// The fields of a multipart/form-data body.
fn multipart(content_type: &str, body: &[u8]) -> Option<Vec<Field>> {
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .map(|b| format!("--{}", b.trim_matches('"')))?;
    let find =
        |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).position(|w| w == needle);
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, boundary.as_bytes()) {
        rest = &rest[start + boundary.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let data_start = head_end + 4;
        let data_len = find(&rest[data_start..], format!("\r\n{boundary}").as_bytes())?;
        let value = |key: &str| {
            head.split(&format!("{key}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        };
        fields.push((
            value(" name").or_else(|| value("name")).unwrap_or_default(),
            value("filename"),
            rest[data_start..data_start + data_len].to_vec(),
        ));
        rest = &rest[data_start + data_len..];
    }
    Some(fields)
}

static MESSAGE_IDS: AtomicU64 = AtomicU64::new(1);

async fn send_message(
    Extract(shared): Extract<Shared>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = lock(&shared.0);
    state.send_calls += 1;
    if !authorized(&state, &headers) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    if phone != state.phone_number_id {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported post request.");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    let to = body
        .get("to")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let text = body
        .pointer("/text/body")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let kind = body
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if body.get("messaging_product").and_then(Value::as_str) != Some("whatsapp")
        || !matches!(kind.as_str(), "text" | "image" | "document")
        || to.is_empty()
    {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
    let media = if kind == "text" {
        None
    } else {
        let id = body
            .pointer(&format!("/{kind}/id"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some((_, _, content)) = state.uploads.get(id).cloned() else {
            return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid media id");
        };
        Some(SentMedia {
            to: to.clone(),
            kind: kind.clone(),
            file_name: body
                .pointer(&format!("/{kind}/filename"))
                .and_then(Value::as_str)
                .map(str::to_string),
            caption: body
                .pointer(&format!("/{kind}/caption"))
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            content,
        })
    };
    if state.rate_limit_sends > 0 {
        state.rate_limit_sends -= 1;
        let seconds = state.rate_limit_seconds;
        let mut response = graph_error(StatusCode::TOO_MANY_REQUESTS, 130429, "Rate limit hit");
        if let Ok(v) = seconds.to_string().parse() {
            response.headers_mut().insert("retry-after", v);
        }
        return response;
    }
    if text.chars().count() > 4096 {
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            "Param text['body'] is too long",
        );
    }
    if state.outside_window.contains(&to) {
        return graph_error(
            StatusCode::BAD_REQUEST,
            131047,
            "Re-engagement message: more than 24 hours have passed since the recipient last replied",
        );
    }
    match media {
        Some(media) => state.sent_media.push(media),
        None => state.sent.push(SentMessage {
            to: to.clone(),
            text,
        }),
    }
    let id = MESSAGE_IDS.fetch_add(1, Ordering::Relaxed);
    axum::Json(
        json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
        "messages": [{"id": format!("wamid.OUT{id}")}]}),
    )
    .into_response()
}

/// Posts deliveries to a gateway's webhook, signed like Meta signs them.
pub struct WebhookSigner {
    pub url: String,
    pub app_secret: String,
    pub phone_number_id: String,
    http: reqwest::Client,
}

static INBOUND_IDS: AtomicU64 = AtomicU64::new(1);

impl WebhookSigner {
    /// `url` is the gateway's `.../webhooks/whatsapp`.
    pub fn new(url: &str, app_secret: &str, phone_number_id: &str) -> Self {
        WebhookSigner {
            url: url.to_string(),
            app_secret: app_secret.to_string(),
            phone_number_id: phone_number_id.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// The `sha256=<hex>` signature of `body`.
    pub fn sign(secret: &str, body: &[u8]) -> String {
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            return String::new();
        };
        mac.update(body);
        let bytes = mac.finalize().into_bytes();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={hex}")
    }

    /// A delivery with one text message from `from` (digits, no `+`); returns it and its id.
    pub fn text_delivery(&self, from: &str, text: &str) -> (Value, String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.text_delivery_at(from, text, now)
    }

    /// [`Self::text_delivery`] with the message's `timestamp` (Unix seconds) given.
    pub fn text_delivery_at(&self, from: &str, text: &str, timestamp: u64) -> (Value, String) {
        let id = format!("wamid.IN{}", INBOUND_IDS.fetch_add(1, Ordering::Relaxed));
        let delivery = json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{
            "field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000", "phone_number_id": self.phone_number_id},
                "contacts": [{"profile": {"name": format!("Person {from}")}, "wa_id": from}],
                "messages": [{"from": from, "id": id, "timestamp": timestamp.to_string(), "type": "text",
                    "text": {"body": text}}]}}]}]});
        (delivery, id)
    }

    /// A delivery with one media message (`kind`: `image`, `audio`, `document`; `media`: its
    /// object, e.g. `{"id", "mime_type", "sha256", "caption", "voice", "filename"}`).
    pub fn media_delivery(&self, from: &str, kind: &str, media: Value) -> (Value, String) {
        let id = format!("wamid.IN{}", INBOUND_IDS.fetch_add(1, Ordering::Relaxed));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut message =
            json!({"from": from, "id": id, "timestamp": now.to_string(), "type": kind});
        message[kind] = media;
        let delivery = json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{
            "field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000", "phone_number_id": self.phone_number_id},
                "contacts": [{"profile": {"name": format!("Person {from}")}, "wa_id": from}],
                "messages": [message]}}]}]});
        (delivery, id)
    }

    /// Posts a signed delivery of one media message; returns the status.
    pub async fn post_media(&self, from: &str, kind: &str, media: Value) -> u16 {
        let (delivery, _) = self.media_delivery(from, kind, media);
        let body = delivery.to_string();
        self.post_raw(body.as_bytes(), Some(&self.app_secret)).await
    }

    /// Posts `body` with a signature under `secret` (None: unsigned). Returns the status.
    pub async fn post_raw(&self, body: &[u8], secret: Option<&str>) -> u16 {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(secret) = secret {
            request = request.header("x-hub-signature-256", Self::sign(secret, body));
        }
        request
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Posts a signed delivery of one text message; returns the status and the message id.
    pub async fn post_text(&self, from: &str, text: &str) -> (u16, String) {
        let (delivery, id) = self.text_delivery(from, text);
        let body = delivery.to_string();
        (
            self.post_raw(body.as_bytes(), Some(&self.app_secret)).await,
            id,
        )
    }

    /// The GET handshake; returns status and body.
    pub async fn verify(&self, verify_token: &str, challenge: &str) -> (u16, String) {
        match self
            .http
            .get(&self.url)
            .query(&[
                ("hub.mode", "subscribe"),
                ("hub.verify_token", verify_token),
                ("hub.challenge", challenge),
            ])
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }
}
