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

#[derive(Default)]
struct Graph {
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
    if phone != state.phone_number_id {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported get request.");
    }
    axum::Json(json!({"id": phone})).into_response()
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
    if body.get("messaging_product").and_then(Value::as_str) != Some("whatsapp")
        || body.get("type").and_then(Value::as_str) != Some("text")
        || to.is_empty()
    {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
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
    state.sent.push(SentMessage {
        to: to.clone(),
        text,
    });
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
