//! A fake Discord (REST API + Gateway websocket) for tests, in-process on `127.0.0.1:0`.
//!
//! It speaks the documented wire protocol for what a DM bot uses:
//! * REST under `/api/v10`: `GET /gateway/bot` (returns this server's websocket URL),
//!   `POST /channels/{id}/messages` (refuses content over 2000 characters, records
//!   `allowed_mentions`), `POST /channels/{id}/typing`; `Authorization: Bot <token>` checked,
//!   a wrong one gets 401. 429s with `retry_after`/`global` can be injected.
//! * Gateway at `/gateway`: Hello (op 10) with a chosen `heartbeat_interval`, Identify (op 2:
//!   token checked, close 4004 when wrong; intents recorded), READY with `session_id` and
//!   `resume_gateway_url`, Heartbeat (op 1) answered with ACK (op 11) unless told not to,
//!   Resume (op 6: replays every event after the given `seq`, then RESUMED; an unknown session
//!   gets Invalid Session op 9 `false`), MESSAGE_CREATE dispatches with increasing `s`.
//!   Like Discord, events of a session are kept while the bot is disconnected and replayed on
//!   resume; a bot that identifies anew gets a new session and never sees the old one's events.
//! * Files: MESSAGE_CREATE carries `attachments[]` objects (`id`, `filename`, `content_type`,
//!   `size`, `url`, `proxy_url`; a voice message has flag `IS_VOICE_MESSAGE` (1 << 13),
//!   `duration_secs` and `waveform`), and the "CDN" serves them at
//!   `/attachments/{channel}/{id}/{filename}?ex=..&is=..&hm=..` (no authentication, like Discord's;
//!   every request and whether it carried an `Authorization` header is recorded). Uploads are
//!   `POST /channels/{id}/messages` as multipart/form-data with `payload_json` and `files[n]`;
//!   more than 10 MiB per file gets 413 `{"code": 40005}` like Discord.

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Discord's message length limit.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// The fake bot's user id.
pub const FAKE_BOT_ID: &str = "4242";

/// Discord's upload limit per file for a bot without boosts.
pub const MAX_UPLOAD_BYTES: usize = 10 << 20;

/// Message flag of a voice message.
pub const IS_VOICE_MESSAGE: u64 = 1 << 13;

/// A file the bot uploaded (`files[n]` of a multipart message creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    pub channel_id: String,
    /// The file name of the `files[n]` part.
    pub file_name: String,
    pub content: Vec<u8>,
    /// `payload_json.content` (the caption).
    pub content_text: String,
    /// `payload_json.attachments`, as sent.
    pub attachments_json: Value,
    pub allowed_mentions: Option<Value>,
}

/// A request to the fake CDN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdnRequest {
    pub path: String,
    /// Whether it carried an `Authorization` header (the bot token must never go there).
    pub had_authorization: bool,
}

/// A message the bot created.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub channel_id: String,
    pub content: String,
    pub allowed_mentions: Option<Value>,
    /// When the fake received it.
    pub at: Instant,
}

/// `wait_for_messages` gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {wanted} message(s) to channel {channel_id}; got {got:?}")]
pub struct WaitTimeout {
    pub channel_id: String,
    pub wanted: usize,
    pub timeout: Duration,
    pub got: Vec<String>,
}

enum ToBot {
    Frame(Value),
    Close(u16),
}

#[derive(Default)]
struct SessionState {
    id: String,
    seq: i64,
    /// Every dispatch of the session, for replay on resume.
    log: Vec<(i64, Value)>,
}

#[derive(Default)]
struct Inner {
    session: Option<SessionState>,
    /// The live connection (id, sender), if the bot is identified or resumed.
    live: Option<(u64, mpsc::UnboundedSender<ToBot>)>,
    next_conn: u64,
    next_message_id: u64,
    sent: Vec<SentMessage>,
    typing: Vec<String>,
    /// Pending 429s for message creation: (retry_after seconds, global).
    rate_limits: Vec<(f64, bool)>,
    /// When a 429 was handed out and for how long.
    limited_until: Option<Instant>,
    /// Requests received while a handed-out rate limit was running.
    requests_during_limit: usize,
    identifies: Vec<u64>,
    resumes: usize,
    heartbeats: usize,
    drop_acks: bool,
    heartbeat_interval_ms: u64,
    /// Events pushed while no session existed: Discord never delivers those.
    lost: usize,
    /// CDN path → content.
    files: std::collections::HashMap<String, Vec<u8>>,
    /// CDN path prefix (`/attachments/{channel}/{id}/`) → `Location` of a 302 instead.
    redirects: std::collections::HashMap<String, String>,
    cdn_requests: Vec<CdnRequest>,
    sent_files: Vec<SentFile>,
}

struct Shared {
    token: String,
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

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bot {}", self.token))
    }
}

/// The fake Discord. Stops serving when dropped.
pub struct FakeDiscord {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl fmt::Debug for FakeDiscord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeDiscord")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeDiscord {
    /// Start serving on an ephemeral loopback port, accepting only `token`.
    pub async fn start(token: &str) -> FakeDiscord {
        #[allow(clippy::expect_used)] // test double: failing to bind loopback is a broken host
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake Discord: bind 127.0.0.1:0");
        #[allow(clippy::expect_used)] // a bound listener always has a local address
        let addr = listener.local_addr().expect("fake Discord: local address");
        let shared = Arc::new(Shared {
            token: token.to_string(),
            addr,
            inner: Mutex::new(Inner {
                next_message_id: 100_000,
                heartbeat_interval_ms: 41_250,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route(
                "/api/v10/channels/{id}/messages",
                post(create_message).layer(DefaultBodyLimit::max(4 * MAX_UPLOAD_BYTES)),
            )
            .route("/attachments/{channel}/{id}/{name}", get(cdn_file))
            .route("/api/v10/channels/{id}/typing", post(typing))
            .route("/gateway", get(gateway))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake Discord server stopped");
            }
        });
        FakeDiscord { shared, server }
    }

    /// The REST base URL for the channel's `api_url`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v10", self.shared.addr)
    }

    /// The DM channel id of a user (the fake gives each user one).
    pub fn dm_channel(user_id: u64) -> String {
        (user_id + 1_000_000).to_string()
    }

    /// Heartbeat interval announced in Hello to connections from now on.
    pub fn set_heartbeat_interval(&self, interval: Duration) {
        self.shared.lock().heartbeat_interval_ms = interval.as_millis() as u64;
    }

    /// Stop (or resume) acknowledging heartbeats.
    pub fn set_drop_acks(&self, drop: bool) {
        self.shared.lock().drop_acks = drop;
    }

    /// The next `count` message creations get a 429 with this `retry_after` (and `global`).
    pub fn rate_limit_next(&self, count: usize, retry_after: f64, global: bool) {
        let mut inner = self.shared.lock();
        for _ in 0..count {
            inner.rate_limits.push((retry_after, global));
        }
    }

    /// Push a direct message from `user_id`; returns its message id. Delivered to the live
    /// connection, kept for a resume while disconnected, lost if the bot has no session.
    pub fn push_dm(&self, user_id: u64, text: &str) -> String {
        self.push_message(user_id, &Self::dm_channel(user_id), None, text, &[])
    }

    /// Push a server message in `channel_id` of `guild_id`, mentioning the bot if `mention`.
    pub fn push_guild(
        &self,
        user_id: u64,
        guild_id: &str,
        channel_id: &str,
        text: &str,
        mention: bool,
    ) -> String {
        let (text, mentions) = if mention {
            (format!("<@{FAKE_BOT_ID}> {text}"), vec![FAKE_BOT_ID])
        } else {
            (text.to_string(), vec![])
        };
        self.push_message(user_id, channel_id, Some(guild_id), &text, &mentions)
    }

    fn push_message(
        &self,
        user_id: u64,
        channel_id: &str,
        guild_id: Option<&str>,
        text: &str,
        mentions: &[&str],
    ) -> String {
        self.push_full(user_id, channel_id, guild_id, text, mentions, vec![], 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_full(
        &self,
        user_id: u64,
        channel_id: &str,
        guild_id: Option<&str>,
        text: &str,
        mentions: &[&str],
        attachments: Vec<Value>,
        flags: u64,
    ) -> String {
        let mut inner = self.shared.lock();
        inner.next_message_id += 1;
        let id = inner.next_message_id.to_string();
        let mut d = json!({
            "id": id, "channel_id": channel_id, "type": 0, "content": text,
            "timestamp": "2026-01-01T00:00:00.000000+00:00", "tts": false,
            "mention_everyone": false, "attachments": attachments, "embeds": [], "pinned": false,
            "flags": flags,
            "author": {"id": user_id.to_string(), "username": format!("user{user_id}"),
                "global_name": format!("User {user_id}"), "discriminator": "0"},
            "mentions": mentions.iter().map(|m| json!({"id": m, "username": "bot", "bot": true})).collect::<Vec<_>>(),
        });
        if let Some(guild) = guild_id {
            d["guild_id"] = json!(guild);
        }
        dispatch(&mut inner, "MESSAGE_CREATE", d);
        drop(inner);
        self.shared.bump();
        id
    }

    /// Store `content` on the fake CDN and return the attachment object Discord would put in a
    /// MESSAGE_CREATE of `user_id`'s DM (tests may edit it: a lying `size`, another `url`).
    pub fn attachment(
        &self,
        user_id: u64,
        filename: &str,
        content_type: Option<&str>,
        content: Vec<u8>,
    ) -> Value {
        let mut inner = self.shared.lock();
        inner.next_message_id += 1;
        let id = inner.next_message_id.to_string();
        let channel = Self::dm_channel(user_id);
        // Like Discord, the URL carries a cleaned name; the object keeps the name as sent.
        let clean: String = filename
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = format!("/attachments/{channel}/{id}/{clean}");
        let query = "?ex=6a000000&is=69f00000&hm=0123456789abcdef&";
        let url = format!("http://{}{path}{query}", self.shared.addr);
        let mut object = json!({
            "id": id, "filename": filename, "size": content.len(), "url": url,
            "proxy_url": url, "ephemeral": false,
        });
        if let Some(content_type) = content_type {
            object["content_type"] = json!(content_type);
        }
        inner.files.insert(path, content);
        object
    }

    /// Push a direct message from `user_id` with `attachments` (objects from
    /// [`FakeDiscord::attachment`]) and message `flags`; returns its message id.
    pub fn push_dm_with_attachments(
        &self,
        user_id: u64,
        text: &str,
        attachments: Vec<Value>,
        flags: u64,
    ) -> String {
        self.push_full(
            user_id,
            &Self::dm_channel(user_id),
            None,
            text,
            &[],
            attachments,
            flags,
        )
    }

    /// Push a voice message (flag `IS_VOICE_MESSAGE`, one `audio/ogg` attachment with
    /// `duration_secs` and `waveform`, no text) from `user_id`.
    pub fn push_voice_message(&self, user_id: u64, ogg: Vec<u8>, duration_secs: f64) -> String {
        let mut attachment = self.attachment(user_id, "voice-message.ogg", Some("audio/ogg"), ogg);
        attachment["duration_secs"] = json!(duration_secs);
        attachment["waveform"] = json!("AAAAAAAAAAAA");
        self.push_dm_with_attachments(user_id, "", vec![attachment], IS_VOICE_MESSAGE)
    }

    /// Push a server message with attachments in `channel_id` of `guild_id`, mentioning the bot
    /// if `mention`.
    pub fn push_guild_with_attachments(
        &self,
        user_id: u64,
        guild_id: &str,
        channel_id: &str,
        text: &str,
        mention: bool,
        attachments: Vec<Value>,
    ) -> String {
        let (text, mentions) = if mention {
            (format!("<@{FAKE_BOT_ID}> {text}"), vec![FAKE_BOT_ID])
        } else {
            (text.to_string(), vec![])
        };
        self.push_full(
            user_id,
            channel_id,
            Some(guild_id),
            &text,
            &mentions,
            attachments,
            0,
        )
    }

    /// Make the CDN answer requests for `attachment` (an object from [`Self::attachment`])
    /// with `302 Found` to `location`.
    pub fn redirect_attachment(&self, attachment: &Value, location: &str) {
        let url = attachment.get("url").and_then(Value::as_str).unwrap_or("");
        let path = url
            .split_once("/attachments/")
            .map(|(_, rest)| rest.split('?').next().unwrap_or(""))
            .unwrap_or("");
        let prefix = match path.rsplit_once('/') {
            Some((dir, _)) => format!("/attachments/{dir}/"),
            None => return,
        };
        self.shared
            .lock()
            .redirects
            .insert(prefix, location.to_string());
    }

    /// Requests the fake CDN received, in order.
    pub fn cdn_requests(&self) -> Vec<CdnRequest> {
        self.shared.lock().cdn_requests.clone()
    }

    /// Files the bot uploaded, in order.
    pub fn sent_files(&self) -> Vec<SentFile> {
        self.shared.lock().sent_files.clone()
    }

    /// Close the live connection with `code` (4000: an ordinary drop, resumable).
    pub fn disconnect(&self, code: u16) {
        if let Some((_, live)) = self.shared.lock().live.take() {
            let _ = live.send(ToBot::Close(code));
        }
    }

    /// Forget the session, as Discord does after it expires: a resume gets op 9.
    pub fn expire_session(&self) {
        self.shared.lock().session = None;
    }

    /// Whether a bot is connected and identified/resumed.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().live.is_some()
    }

    /// Wait until a bot is connected (identified or resumed), at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |inner| inner.live.is_some()).await
    }

    /// The intents of every Identify, in order.
    pub fn identifies(&self) -> Vec<u64> {
        self.shared.lock().identifies.clone()
    }

    /// How many resumes succeeded.
    pub fn resumes(&self) -> usize {
        self.shared.lock().resumes
    }

    pub fn heartbeats(&self) -> usize {
        self.shared.lock().heartbeats
    }

    /// Events pushed while the bot had no session (Discord does not deliver them).
    pub fn lost_events(&self) -> usize {
        self.shared.lock().lost
    }

    pub fn sent_messages(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    pub fn typing_calls(&self) -> Vec<String> {
        self.shared.lock().typing.clone()
    }

    /// Message creations received while a 429 the fake handed out was still running.
    pub fn requests_during_rate_limit(&self) -> usize {
        self.shared.lock().requests_during_limit
    }

    /// Wait until the bot created at least `count` messages in `channel_id`; returns the
    /// contents of all messages in that channel so far.
    pub async fn wait_for_messages(
        &self,
        channel_id: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, WaitTimeout> {
        let texts = |inner: &Inner| -> Vec<String> {
            inner
                .sent
                .iter()
                .filter(|m| m.channel_id == channel_id)
                .map(|m| m.content.clone())
                .collect()
        };
        if self
            .wait_until(timeout, |inner| texts(inner).len() >= count)
            .await
        {
            Ok(texts(&self.shared.lock()))
        } else {
            Err(WaitTimeout {
                channel_id: channel_id.to_string(),
                wanted: count,
                timeout,
                got: texts(&self.shared.lock()),
            })
        }
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

/// Append a dispatch to the session and send it to the live connection.
fn dispatch(inner: &mut Inner, event: &str, d: Value) {
    let Some(session) = inner.session.as_mut() else {
        inner.lost += 1;
        return;
    };
    session.seq += 1;
    let frame = json!({"op": 0, "t": event, "s": session.seq, "d": d});
    session.log.push((session.seq, frame.clone()));
    if let Some((_, live)) = &inner.live {
        let _ = live.send(ToBot::Frame(frame));
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "401: Unauthorized", "code": 0})),
    )
        .into_response()
}

async fn gateway_bot(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !shared.authorized(&headers) {
        return unauthorized();
    }
    Json(json!({
        "url": format!("ws://{}/gateway", shared.addr),
        "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1}
    }))
    .into_response()
}

fn invalid_form() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"message": "Invalid Form Body", "code": 50035})),
    )
        .into_response()
}

/// A `files[n]` part: file name and bytes.
type Upload = (String, Vec<u8>);

/// The body of a message creation: JSON, or multipart with `payload_json` and `files[n]`.
/// `None`: Discord's "Invalid Form Body".
fn message_body(headers: &HeaderMap, raw: &[u8]) -> Option<(Value, Vec<Upload>)> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/json") {
        return serde_json::from_slice(raw).ok().map(|v| (v, Vec::new()));
    }
    let parts = crate::multipart::parse(content_type, raw)?;
    let mut payload = json!({});
    let mut files = Vec::new();
    for part in parts {
        if part.name == "payload_json" {
            payload = serde_json::from_slice(&part.data).ok()?;
        } else if part.name.starts_with("files[") && part.name.ends_with(']') {
            files.push((part.filename?, part.data));
        }
    }
    Some((payload, files))
}

async fn create_message(
    State(shared): State<Arc<Shared>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthorized();
    }
    let Some((body, files)) = message_body(&headers, &raw) else {
        return invalid_form();
    };
    let mut inner = shared.lock();
    let now = Instant::now();
    if inner.limited_until.is_some_and(|until| now < until) {
        inner.requests_during_limit += 1;
    }
    if !inner.rate_limits.is_empty() {
        let (retry_after, global) = inner.rate_limits.remove(0);
        inner.limited_until = Some(now + Duration::from_secs_f64(retry_after));
        drop(inner);
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global})),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(
            "retry-after",
            axum::http::HeaderValue::from(retry_after.ceil() as u64),
        );
        if global {
            headers.insert(
                "x-ratelimit-global",
                axum::http::HeaderValue::from_static("true"),
            );
            headers.insert(
                "x-ratelimit-scope",
                axum::http::HeaderValue::from_static("global"),
            );
        }
        return response;
    }
    let content = body.get("content").and_then(Value::as_str).unwrap_or("");
    if (content.is_empty() && files.is_empty()) || content.chars().count() > MAX_MESSAGE_CHARS {
        return invalid_form();
    }
    if files.iter().any(|(_, data)| data.len() > MAX_UPLOAD_BYTES) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"message": "Request entity too large", "code": 40005})),
        )
            .into_response();
    }
    inner.next_message_id += 1;
    let id = inner.next_message_id.to_string();
    if !files.is_empty() {
        for (file_name, content_bytes) in files {
            inner.sent_files.push(SentFile {
                channel_id: channel_id.clone(),
                file_name,
                content: content_bytes,
                content_text: content.to_string(),
                attachments_json: body.get("attachments").cloned().unwrap_or(Value::Null),
                allowed_mentions: body.get("allowed_mentions").cloned(),
            });
        }
        drop(inner);
        shared.bump();
        return Json(
            json!({"id": id, "channel_id": channel_id, "content": content, "type": 0,
            "author": {"id": FAKE_BOT_ID, "username": "fakebot", "bot": true}}),
        )
        .into_response();
    }
    inner.sent.push(SentMessage {
        channel_id: channel_id.clone(),
        content: content.to_string(),
        allowed_mentions: body.get("allowed_mentions").cloned(),
        at: now,
    });
    drop(inner);
    shared.bump();
    Json(
        json!({"id": id, "channel_id": channel_id, "content": content, "type": 0,
        "author": {"id": FAKE_BOT_ID, "username": "fakebot", "bot": true}}),
    )
    .into_response()
}

/// The fake CDN: serves stored attachments to anyone (Discord's signed URLs need no token).
async fn cdn_file(
    State(shared): State<Arc<Shared>>,
    Path((channel, id, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/attachments/{channel}/{id}/{name}");
    let mut inner = shared.lock();
    inner.cdn_requests.push(CdnRequest {
        path: path.clone(),
        had_authorization: headers.contains_key("authorization"),
    });
    let prefix = format!("/attachments/{channel}/{id}/");
    if let Some(location) = inner.redirects.get(&prefix).cloned() {
        drop(inner);
        shared.bump();
        let mut response = StatusCode::FOUND.into_response();
        if let Ok(value) = axum::http::HeaderValue::from_str(&location) {
            response.headers_mut().insert("location", value);
        }
        return response;
    }
    let found = inner
        .files
        .iter()
        .find(|(p, _)| p.starts_with(&prefix))
        .map(|(_, content)| content.clone());
    drop(inner);
    shared.bump();
    match found {
        Some(content) => (StatusCode::OK, content).into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found").into_response(),
    }
}

async fn typing(
    State(shared): State<Arc<Shared>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthorized();
    }
    shared.lock().typing.push(channel_id);
    shared.bump();
    StatusCode::NO_CONTENT.into_response()
}

async fn gateway(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| connection(shared, socket))
}

async fn send_json(socket: &mut WebSocket, value: &Value) -> bool {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .is_ok()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        })))
        .await;
}

/// The next JSON frame from the bot; `None` when the connection ended.
async fn recv_json(socket: &mut WebSocket) -> Option<Value> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => {
                if let Ok(value) = serde_json::from_str::<Value>(text.as_str()) {
                    return Some(value);
                }
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn connection(shared: Arc<Shared>, mut socket: WebSocket) {
    let interval = shared.lock().heartbeat_interval_ms;
    if !send_json(
        &mut socket,
        &json!({"op": 10, "d": {"heartbeat_interval": interval}}),
    )
    .await
    {
        return;
    }
    let Ok(Some(first)) =
        tokio::time::timeout(Duration::from_secs(10), recv_json(&mut socket)).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = {
        let mut inner = shared.lock();
        inner.next_conn += 1;
        inner.next_conn
    };
    let d = first.get("d").cloned().unwrap_or(Value::Null);
    match first.get("op").and_then(Value::as_u64) {
        Some(2) => {
            if d.get("token").and_then(Value::as_str) != Some(shared.token.as_str()) {
                close(&mut socket, 4004, "Authentication failed.").await;
                return;
            }
            let intents = d.get("intents").and_then(Value::as_u64).unwrap_or(0);
            let mut inner = shared.lock();
            let inner = &mut *inner;
            inner.identifies.push(intents);
            let session_id = format!("session-{conn}");
            inner.session = Some(SessionState {
                id: session_id.clone(),
                ..SessionState::default()
            });
            inner.live = Some((conn, tx));
            let ready = json!({
                "v": 10, "session_id": session_id,
                "resume_gateway_url": format!("ws://{}/gateway", shared.addr),
                "user": {"id": FAKE_BOT_ID, "username": "fakebot", "bot": true},
                "guilds": [], "application": {"id": FAKE_BOT_ID, "flags": 0}
            });
            dispatch(inner, "READY", ready);
        }
        Some(6) => {
            let session_id = d.get("session_id").and_then(Value::as_str).unwrap_or("");
            let seq = d.get("seq").and_then(Value::as_i64).unwrap_or(-1);
            if d.get("token").and_then(Value::as_str) != Some(shared.token.as_str()) {
                close(&mut socket, 4004, "Authentication failed.").await;
                return;
            }
            let resumed = {
                let mut inner = shared.lock();
                let replay: Option<Vec<Value>> = inner
                    .session
                    .as_ref()
                    .filter(|s| s.id == session_id)
                    .map(|s| {
                        s.log
                            .iter()
                            .filter(|(s, _)| *s > seq)
                            .map(|(_, f)| f.clone())
                            .collect()
                    });
                match replay {
                    Some(replay) => {
                        inner.resumes += 1;
                        for frame in replay {
                            let _ = tx.send(ToBot::Frame(frame));
                        }
                        inner.live = Some((conn, tx));
                        dispatch(&mut inner, "RESUMED", json!({}));
                        true
                    }
                    None => false,
                }
            };
            if !resumed {
                let _ = send_json(&mut socket, &json!({"op": 9, "d": false})).await;
                // Discord leaves the connection open for a new Identify; the bot may also
                // reconnect. Wait for it to go.
                while recv_json(&mut socket).await.is_some() {}
                return;
            }
        }
        _ => {
            close(&mut socket, 4003, "Not authenticated.").await;
            return;
        }
    }
    shared.bump();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(ToBot::Frame(frame)) => {
                    if !send_json(&mut socket, &frame).await {
                        break;
                    }
                }
                Some(ToBot::Close(code)) => {
                    close(&mut socket, code, "closed by the test").await;
                    break;
                }
                None => break,
            },
            incoming = recv_json(&mut socket) => match incoming {
                None => break,
                Some(frame) => {
                    if frame.get("op").and_then(Value::as_u64) == Some(1) {
                        let drop_ack = {
                            let mut inner = shared.lock();
                            inner.heartbeats += 1;
                            inner.drop_acks
                        };
                        shared.bump();
                        if !drop_ack && !send_json(&mut socket, &json!({"op": 11})).await {
                            break;
                        }
                    }
                }
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
