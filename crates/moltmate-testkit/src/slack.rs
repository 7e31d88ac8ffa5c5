//! A fake Slack (Web API + Socket Mode websocket) for tests, in-process on `127.0.0.1:0`.
//!
//! * Web API under `/api`: `auth.test` (bot token), `apps.connections.open` (app-level token;
//!   returns a one-time `ws://…/link/?ticket=N`), `chat.postMessage` (bot token; records
//!   `channel`, `text`, `thread_ts`; `msg_too_long` past 40,000 characters). Tokens are checked
//!   as Slack does: HTTP 200 with `{"ok": false, "error": "invalid_auth"}`; an app token on a
//!   bot method gets `not_allowed_token_type`. 429s with `Retry-After` can be injected.
//! * Socket Mode at `/link`: `hello` on connect, then every envelope not yet acknowledged —
//!   like Slack, an envelope stays pending until the app sends `{"envelope_id": …}` and is
//!   redelivered (with `retry_attempt` + 1) on the next connection. `disconnect` envelopes can
//!   be sent (`refresh_requested`, `link_disabled`).
//! * Files: `/files/<id>/<name>` serves files people shared (bot token required, else a 302 to
//!   the sign-in page as Slack does); `files.getUploadURLExternal` (form) hands out an upload
//!   URL, `/upload/<id>` takes the bytes (length checked), `files.completeUploadExternal` (form)
//!   shares them into a channel, recorded as [`SharedFile`].

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const TEAM_ID: &str = "T0TEST";
pub const BOT_USER_ID: &str = "UBOT";

#[derive(Debug, Clone, PartialEq)]
pub struct PostedMessage {
    pub channel: String,
    pub text: String,
    pub thread_ts: Option<String>,
    pub at: Instant,
}

enum ToApp {
    Frame(Value),
    Close,
    /// Go silent: keep the socket open but never read or write it again (a half-open TCP
    /// connection after a router reboot). Pings go unanswered.
    Freeze,
}

/// A file the app shared with `files.completeUploadExternal`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedFile {
    pub channel: String,
    pub thread_ts: Option<String>,
    pub title: String,
    pub file_name: String,
    pub content: Vec<u8>,
    pub comment: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// Files people shared, served at `/files/<id>/<name>` with the bot token.
    files: std::collections::HashMap<String, Vec<u8>>,
    /// Downloads: (file id, whether the bot token came with it).
    downloads: Vec<(String, bool)>,
    /// Upload slots handed out: file id → (file name, announced length, uploaded bytes).
    uploads: std::collections::HashMap<String, (String, usize, Option<Vec<u8>>)>,
    /// Whether any upload carried an `Authorization` header.
    upload_saw_token: bool,
    shared_files: Vec<SharedFile>,
    /// Envelopes not acknowledged yet: (id, envelope, deliveries so far).
    pending: Vec<(String, Value, u32)>,
    acked: Vec<String>,
    live: Option<(u64, mpsc::UnboundedSender<ToApp>)>,
    next_conn: u64,
    next_id: u64,
    posted: Vec<PostedMessage>,
    rate_limits: Vec<u64>,
    limited_until: Option<Instant>,
    requests_during_limit: usize,
    connections_opened: usize,
}

struct Shared {
    bot_token: String,
    app_token: String,
    addr: std::net::SocketAddr,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
    /// `Some(error)` when the bearer token is not `expected`.
    fn check(&self, headers: &HeaderMap, expected: &str) -> Option<&'static str> {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if t == expected => None,
            Some(t) if t == self.bot_token || t == self.app_token => Some("not_allowed_token_type"),
            Some(_) => Some("invalid_auth"),
            None => Some("not_authed"),
        }
    }
}

/// The fake Slack. Stops serving when dropped.
pub struct FakeSlack {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl fmt::Debug for FakeSlack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeSlack")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSlack {
    pub async fn start(bot_token: &str, app_token: &str) -> FakeSlack {
        #[allow(clippy::expect_used)] // test double: failing to bind loopback is a broken host
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake Slack: bind 127.0.0.1:0");
        #[allow(clippy::expect_used)] // a bound listener always has a local address
        let addr = listener.local_addr().expect("fake Slack: local address");
        let shared = Arc::new(Shared {
            bot_token: bot_token.to_string(),
            app_token: app_token.to_string(),
            addr,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/api/auth.test", post(auth_test))
            .route("/api/apps.connections.open", post(connections_open))
            .route("/api/chat.postMessage", post(post_message))
            .route("/api/files.getUploadURLExternal", post(upload_url))
            .route("/api/files.completeUploadExternal", post(complete_upload))
            .route("/upload/{id}", post(upload))
            .route("/files/{id}/{name}", get(download))
            .route("/link/", get(link))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake Slack server stopped");
            }
        });
        FakeSlack { shared, server }
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.shared.addr)
    }

    /// The DM channel of a user (`U111` → `DU111`).
    pub fn dm_channel(user: &str) -> String {
        format!("D{user}")
    }

    /// A direct message from `user` (optionally in a thread); returns its `ts`.
    pub fn push_dm(&self, user: &str, text: &str, thread_ts: Option<&str>) -> String {
        let mut inner = self.shared.lock();
        inner.next_id += 1;
        let ts = format!("1700000000.{:06}", inner.next_id);
        let mut event = json!({"type": "message", "channel_type": "im",
            "channel": Self::dm_channel(user), "user": user, "text": text, "ts": ts,
            "event_ts": ts, "team": TEAM_ID});
        if let Some(thread) = thread_ts {
            event["thread_ts"] = json!(thread);
        }
        push_event(&mut inner, event);
        drop(inner);
        self.shared.bump();
        ts
    }

    /// Stores `content` as a Slack file; returns its `url_private_download` on this double.
    pub fn add_file(&self, name: &str, content: Vec<u8>) -> String {
        let mut inner = self.shared.lock();
        inner.next_id += 1;
        let id = format!("F{:06}", inner.next_id);
        inner.files.insert(id.clone(), content);
        format!("http://{}/files/{id}/{name}", self.shared.addr)
    }

    /// The `files[]` entry of a message event for a file at `url`.
    pub fn file_object(url: &str, name: &str, mimetype: &str, size: u64) -> Value {
        json!({"id": "F0", "name": name, "title": name, "mimetype": mimetype,
            "filetype": "auto", "size": size, "mode": "hosted", "is_external": false,
            "url_private": url, "url_private_download": url})
    }

    /// A direct message from `user` sharing `files` (`subtype: "file_share"`); returns its `ts`.
    pub fn push_file_dm(&self, user: &str, text: &str, files: Vec<Value>) -> String {
        let mut inner = self.shared.lock();
        inner.next_id += 1;
        let ts = format!("1700000000.{:06}", inner.next_id);
        let event = json!({"type": "message", "subtype": "file_share", "channel_type": "im",
            "channel": Self::dm_channel(user), "user": user, "text": text, "ts": ts,
            "event_ts": ts, "team": TEAM_ID, "files": files, "upload": false});
        push_event(&mut inner, event);
        drop(inner);
        self.shared.bump();
        ts
    }

    /// Downloads so far: (file id, whether the bot token came with the request).
    pub fn downloads(&self) -> Vec<(String, bool)> {
        self.shared.lock().downloads.clone()
    }

    /// Files the app shared into conversations.
    pub fn shared_files(&self) -> Vec<SharedFile> {
        self.shared.lock().shared_files.clone()
    }

    /// Whether an upload to an upload URL carried a token (it must not: the URL is the
    /// authorisation).
    pub fn upload_saw_token(&self) -> bool {
        self.shared.lock().upload_saw_token
    }

    /// An arbitrary event (a bot message, an edit, an `app_mention`).
    pub fn push_event(&self, event: Value) {
        push_event(&mut self.shared.lock(), event);
        self.shared.bump();
    }

    /// Send a `disconnect` envelope with `reason` and close the connection.
    pub fn disconnect(&self, reason: &str) {
        if let Some((_, live)) = self.shared.lock().live.take() {
            let _ = live.send(ToApp::Frame(
                json!({"type": "disconnect", "reason": reason}),
            ));
            let _ = live.send(ToApp::Close);
        }
    }

    /// The live connection goes silent without closing (see `ToApp::Freeze`); the app must
    /// notice by itself and open a new one.
    pub fn freeze_connection(&self) {
        if let Some((_, live)) = self.shared.lock().live.take() {
            let _ = live.send(ToApp::Freeze);
        }
    }

    /// Drop the connection without a word (a network failure).
    pub fn drop_connection(&self) {
        if let Some((_, live)) = self.shared.lock().live.take() {
            let _ = live.send(ToApp::Close);
        }
    }

    pub fn rate_limit_next(&self, count: usize, retry_after_secs: u64) {
        let mut inner = self.shared.lock();
        for _ in 0..count {
            inner.rate_limits.push(retry_after_secs);
        }
    }

    pub fn is_connected(&self) -> bool {
        self.shared.lock().live.is_some()
    }

    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |i| i.live.is_some()).await
    }

    /// Envelopes the app has not acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.shared.lock().pending.len()
    }

    pub fn acknowledged(&self) -> Vec<String> {
        self.shared.lock().acked.clone()
    }

    pub fn connections_opened(&self) -> usize {
        self.shared.lock().connections_opened
    }

    pub fn requests_during_rate_limit(&self) -> usize {
        self.shared.lock().requests_during_limit
    }

    pub fn posted(&self) -> Vec<PostedMessage> {
        self.shared.lock().posted.clone()
    }

    /// Wait until at least `count` messages were posted to `channel`; their texts.
    pub async fn wait_for_messages(
        &self,
        channel: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, Vec<String>> {
        let texts = |inner: &Inner| -> Vec<String> {
            inner
                .posted
                .iter()
                .filter(|m| m.channel == channel)
                .map(|m| m.text.clone())
                .collect()
        };
        if self.wait_until(timeout, |i| texts(i).len() >= count).await {
            Ok(texts(&self.shared.lock()))
        } else {
            Err(texts(&self.shared.lock()))
        }
    }

    pub async fn wait_until_acknowledged(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |i| i.pending.is_empty()).await
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Inner) -> bool) -> bool {
        let mut changed = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.shared.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return done(&self.shared.lock());
            }
        }
    }
}

fn envelope(id: &str, event: &Value, attempt: u32) -> Value {
    json!({
        "envelope_id": id, "type": "events_api", "accepts_response_payload": false,
        "retry_attempt": attempt, "retry_reason": if attempt > 0 { "timeout" } else { "" },
        "payload": {"token": "verification-token", "team_id": TEAM_ID, "api_app_id": "A0TEST",
            "type": "event_callback", "event_id": format!("Ev{id}"), "event_time": 1_700_000_000,
            "event": event}
    })
}

fn push_event(inner: &mut Inner, event: Value) {
    inner.next_id += 1;
    let id = format!("env-{}", inner.next_id);
    if let Some((_, live)) = &inner.live {
        let _ = live.send(ToApp::Frame(envelope(&id, &event, 0)));
        inner.pending.push((id, event, 1));
    } else {
        inner.pending.push((id, event, 0));
    }
}

fn slack_error(error: &str) -> Response {
    Json(json!({"ok": false, "error": error})).into_response()
}

async fn auth_test(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(error) = shared.check(&headers, &shared.bot_token) {
        return slack_error(error);
    }
    Json(
        json!({"ok": true, "url": "https://test.slack.com/", "team": "Test", "user": "bot",
        "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": "B0TEST"}),
    )
    .into_response()
}

async fn connections_open(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(error) = shared.check(&headers, &shared.app_token) {
        return slack_error(error);
    }
    let ticket = {
        let mut inner = shared.lock();
        inner.connections_opened += 1;
        inner.connections_opened
    };
    Json(json!({"ok": true, "url": format!("ws://{}/link/?ticket={ticket}&app_id=A0TEST", shared.addr)}))
        .into_response()
}

async fn post_message(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(error) = shared.check(&headers, &shared.bot_token) {
        return slack_error(error);
    }
    let now = Instant::now();
    let mut inner = shared.lock();
    if inner.limited_until.is_some_and(|until| now < until) {
        inner.requests_during_limit += 1;
    }
    if !inner.rate_limits.is_empty() {
        let seconds = inner.rate_limits.remove(0);
        inner.limited_until = Some(now + Duration::from_secs(seconds));
        drop(inner);
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response();
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
        return response;
    }
    let channel = body.get("channel").and_then(Value::as_str).unwrap_or("");
    let text = body.get("text").and_then(Value::as_str).unwrap_or("");
    if channel.is_empty() {
        return slack_error("channel_not_found");
    }
    if text.is_empty() {
        return slack_error("no_text");
    }
    if text.chars().count() > 40_000 {
        return slack_error("msg_too_long");
    }
    inner.next_id += 1;
    let ts = format!("1700000001.{:06}", inner.next_id);
    inner.posted.push(PostedMessage {
        channel: channel.to_string(),
        text: text.to_string(),
        thread_ts: body
            .get("thread_ts")
            .and_then(Value::as_str)
            .map(str::to_string),
        at: now,
    });
    drop(inner);
    shared.bump();
    Json(json!({"ok": true, "channel": channel, "ts": ts})).into_response()
}

async fn download(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path((id, _name)): axum::extract::Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let authorised = shared.check(&headers, &shared.bot_token).is_none();
    let mut inner = shared.lock();
    inner.downloads.push((id.clone(), authorised));
    if !authorised {
        // Slack answers an unauthenticated file request with a redirect to its login page.
        return (
            StatusCode::FOUND,
            [("location", "https://slack.com/signin")],
            "",
        )
            .into_response();
    }
    match inner.files.get(&id) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn upload_url(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Form(form): axum::extract::Form<std::collections::HashMap<String, String>>,
) -> Response {
    if let Some(error) = shared.check(&headers, &shared.bot_token) {
        return slack_error(error);
    }
    let (Some(name), Some(length)) = (
        form.get("filename"),
        form.get("length").and_then(|l| l.parse::<usize>().ok()),
    ) else {
        return slack_error("invalid_arguments");
    };
    let mut inner = shared.lock();
    inner.next_id += 1;
    let id = format!("FUP{:06}", inner.next_id);
    inner
        .uploads
        .insert(id.clone(), (name.clone(), length, None));
    Json(json!({"ok": true, "upload_url": format!("http://{}/upload/{id}", shared.addr), "file_id": id}))
        .into_response()
}

async fn upload(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut inner = shared.lock();
    if headers.contains_key("authorization") {
        inner.upload_saw_token = true;
    }
    match inner.uploads.get_mut(&id) {
        Some((_, length, content)) if *length == body.len() => {
            *content = Some(body.to_vec());
            (StatusCode::OK, format!("OK - {}", body.len())).into_response()
        }
        Some(_) => (StatusCode::BAD_REQUEST, "length mismatch").into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn complete_upload(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Form(form): axum::extract::Form<std::collections::HashMap<String, String>>,
) -> Response {
    if let Some(error) = shared.check(&headers, &shared.bot_token) {
        return slack_error(error);
    }
    let files: Vec<Value> = form
        .get("files")
        .and_then(|f| serde_json::from_str(f).ok())
        .unwrap_or_default();
    let Some(channel) = form.get("channel_id").cloned() else {
        return slack_error("invalid_arguments");
    };
    let mut inner = shared.lock();
    for file in &files {
        let id = file.get("id").and_then(Value::as_str).unwrap_or("");
        let title = file.get("title").and_then(Value::as_str).unwrap_or("");
        let Some((name, _, Some(content))) = inner.uploads.remove(id) else {
            return slack_error("file_not_found");
        };
        inner.shared_files.push(SharedFile {
            channel: channel.clone(),
            thread_ts: form.get("thread_ts").cloned(),
            title: title.to_string(),
            file_name: name,
            content,
            comment: form.get("initial_comment").cloned(),
        });
    }
    drop(inner);
    shared.bump();
    Json(json!({"ok": true, "files": files})).into_response()
}

async fn link(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| connection(shared, socket))
}

async fn connection(shared: Arc<Shared>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = {
        let mut inner = shared.lock();
        inner.next_conn += 1;
        let conn = inner.next_conn;
        let _ = tx.send(ToApp::Frame(json!({"type": "hello", "num_connections": 1,
            "connection_info": {"app_id": "A0TEST"}, "debug_info": {"host": "fake"}})));
        // Everything unacknowledged is delivered again.
        for (id, event, deliveries) in inner.pending.iter_mut() {
            let _ = tx.send(ToApp::Frame(envelope(id, event, *deliveries)));
            *deliveries += 1;
        }
        inner.live = Some((conn, tx));
        conn
    };
    shared.bump();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(ToApp::Frame(frame)) => {
                    if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                        break;
                    }
                }
                Some(ToApp::Close) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
                Some(ToApp::Freeze) => {
                    let _silent = socket;
                    std::future::pending::<()>().await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Some(id) = serde_json::from_str::<Value>(text.as_str())
                        .ok()
                        .and_then(|v| v.get("envelope_id").and_then(Value::as_str).map(str::to_string))
                    {
                        {
                            let mut inner = shared.lock();
                            inner.pending.retain(|(p, _, _)| *p != id);
                            inner.acked.push(id);
                        }
                        shared.bump();
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    {
        let mut inner = shared.lock();
        if inner.live.as_ref().is_some_and(|(id, _)| *id == conn) {
            inner.live = None;
        }
    }
    shared.bump();
}

/// Posts Events API requests to a gateway's `/webhooks/slack`, signed like Slack signs them:
/// `X-Slack-Request-Timestamp` and `X-Slack-Signature: v0=` + hex HMAC-SHA256(signing secret,
/// `v0:{timestamp}:{body}`); redeliveries carry `X-Slack-Retry-Num` and `X-Slack-Retry-Reason`.
pub struct EventsSender {
    pub url: String,
    pub signing_secret: String,
    http: reqwest::Client,
    next: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for EventsSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsSender")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// How one Events API request is signed and marked.
#[derive(Debug, Clone, Default)]
pub struct Signing<'a> {
    /// `None`: no signature header at all.
    pub secret: Option<&'a str>,
    /// Seconds to add to the current time (negative: in the past). `None`: no timestamp header.
    pub skew_seconds: Option<i64>,
    /// `X-Slack-Retry-Num`.
    pub retry: Option<u32>,
}

impl EventsSender {
    /// `url` is the gateway's `.../webhooks/slack`.
    pub fn new(url: &str, signing_secret: &str) -> Self {
        EventsSender {
            url: url.to_string(),
            signing_secret: signing_secret.to_string(),
            http: reqwest::Client::new(),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// `v0=<hex>`, Slack's signature of `body` sent at `timestamp`.
    pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            return String::new();
        };
        mac.update(format!("v0:{timestamp}:").as_bytes());
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("v0={hex}")
    }

    /// The signing a correct, fresh first delivery has.
    pub fn good(&self) -> Signing<'_> {
        Signing {
            secret: Some(&self.signing_secret),
            skew_seconds: Some(0),
            retry: None,
        }
    }

    /// An `event_callback` wrapping `event`, as Slack sends it.
    pub fn callback(&self, event: Value) -> Value {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        json!({"token": "deprecated-verification-token", "team_id": TEAM_ID,
            "api_app_id": "A0TEST", "event": event, "type": "event_callback",
            "event_id": format!("Ev0HTTP{n:06}"), "event_time": 1_700_000_000,
            "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": true}]})
    }

    /// A `message.im` event from `user` in their DM with the bot; returns it and its `ts`.
    pub fn dm_event(&self, user: &str, text: &str) -> (Value, String) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ts = format!("1700000100.{n:06}");
        let event = json!({"type": "message", "channel_type": "im",
            "channel": FakeSlack::dm_channel(user), "user": user, "text": text, "ts": ts,
            "event_ts": ts, "team": TEAM_ID});
        (event, ts)
    }

    /// Posts `body` as Slack would with `signing`; returns the status and the answer's body.
    pub async fn post_raw(&self, body: &[u8], signing: &Signing<'_>) -> (u16, String) {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let timestamp = signing.skew_seconds.map(|s| (now + s).to_string());
        if let Some(ts) = &timestamp {
            request = request.header("x-slack-request-timestamp", ts);
        }
        if let Some(secret) = signing.secret {
            let ts = timestamp.clone().unwrap_or_else(|| now.to_string());
            request = request.header("x-slack-signature", Self::sign(secret, &ts, body));
        }
        if let Some(n) = signing.retry {
            request = request
                .header("x-slack-retry-num", n.to_string())
                .header("x-slack-retry-reason", "http_timeout");
        }
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    /// Posts `payload` signed correctly; returns the status.
    pub async fn post(&self, payload: &Value) -> u16 {
        self.post_raw(payload.to_string().as_bytes(), &self.good())
            .await
            .0
    }

    /// A signed DM from `user`; returns the status and the message's `ts`.
    pub async fn post_dm(&self, user: &str, text: &str) -> (u16, String) {
        let (event, ts) = self.dm_event(user, text);
        (self.post(&self.callback(event)).await, ts)
    }

    /// The `url_verification` handshake Slack sends when the Request URL is saved.
    pub async fn url_verification(&self, challenge: &str, signing: &Signing<'_>) -> (u16, String) {
        let body = json!({"token": "deprecated-verification-token", "challenge": challenge,
            "type": "url_verification"});
        self.post_raw(body.to_string().as_bytes(), signing).await
    }
}
