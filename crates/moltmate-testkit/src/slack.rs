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

#[derive(Default)]
struct Inner {
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
